//! Bounds on what a configuration may hold, so that no input can exhaust the stack, the memory
//! or the time of the process reading it (issue 22, point 5), nor make the engine allocate,
//! truncate or overflow on a count or a duration (point 6).
//!
//! dstack itself sets none of these: each is far above anything a real configuration needs
//! (the configurations of dstack's documentation nest 5 levels deep, hold under 100 nodes and
//! 2 KB), and every value beyond one is refused with a located error that names the limit.

use std::io::Read;

use serde_json::Value;

use super::de::Path;
use super::error::{ConfigError, ErrorCode};
use super::yaml::Mark;

/// The largest configuration text read, in bytes (4 MiB).
pub const MAX_TEXT_BYTES: usize = 4 << 20;

/// The most lists and mappings nested one in another, the document's own mapping included.
pub const MAX_DEPTH: usize = 64;

/// The most values (scalars, lists and mappings, keys included) a document may hold once its
/// aliases are expanded.
pub const MAX_NODES: usize = 100_000;

/// The most bytes of scalar text a document may hold once its aliases are expanded (an alias
/// copies the text of its anchor).
pub const MAX_SCALAR_BYTES: usize = 2 * MAX_TEXT_BYTES;

/// The most errors reported for one configuration; past it they are only counted.
pub const MAX_ERRORS: usize = 100;

/// The most nodes of a task (`nodes:`, or the sum of its `groups`), replicas of a service, or
/// instances of a fleet.
pub const MAX_NODE_COUNT: i64 = 1000;

/// The most GPUs one job may ask for (`resources.gpu` count).
pub const MAX_GPU_COUNT: i64 = 1024;

/// The most CPUs one job may ask for (`resources.cpu` count).
pub const MAX_CPU_COUNT: i64 = 65_536;

/// The longest duration, in seconds: 100 years of 365.25 days (36,525 days). In milliseconds
/// it fits `i64` and `u64` with room to spare, and added to any clock's "now" it stays
/// representable.
pub const MAX_DURATION_SECS: i64 = 36_525 * 86_400;

/// Why a text was not read: larger than [`MAX_TEXT_BYTES`], not UTF-8, or an I/O error.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The text is longer than the limit.
    #[error("the configuration is larger than {MAX_TEXT_BYTES} bytes (the limit)")]
    TooLarge,
    /// The bytes are not UTF-8.
    #[error("the file is not UTF-8 text")]
    NotUtf8,
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ReadError {
    /// [`ErrorCode::Limit`] for a text over the limit, [`ErrorCode::Io`] otherwise.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReadError::TooLarge => ErrorCode::Limit,
            ReadError::NotUtf8 | ReadError::Io(_) => ErrorCode::Io,
        }
    }
}

/// Reads a configuration text from `source`, reading no more than [`MAX_TEXT_BYTES`] + 1 bytes
/// (so a huge file or an endless stream costs no more than the limit).
pub fn read_text(source: impl Read) -> Result<String, ReadError> {
    let mut bytes = Vec::new();
    let most = u64::try_from(MAX_TEXT_BYTES + 1).unwrap_or(u64::MAX);
    source.take(most).read_to_end(&mut bytes)?;
    if bytes.len() > MAX_TEXT_BYTES {
        return Err(ReadError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|_| ReadError::NotUtf8)
}

/// The error for a value nested deeper than [`MAX_DEPTH`], at field `path` (of data, so with
/// no line: a value that contains itself ends here too).
pub fn too_deep(path: String) -> ConfigError {
    ConfigError {
        mark: Mark::default(),
        path,
        code: ErrorCode::Limit,
        message: format!(
            "lists and mappings nested more than {MAX_DEPTH} levels deep (the limit; does a value contain itself?)"
        ),
    }
}

/// Checks a configuration given as data against [`MAX_DEPTH`], [`MAX_NODES`] and
/// [`MAX_SCALAR_BYTES`], as [`super::yaml::load`] checks a text. Recursion stops at the depth
/// limit.
pub fn check_value(value: &Value) -> Result<(), ConfigError> {
    let mut cost = (0usize, 0usize);
    check_within(value, 0, &Path::ROOT, &mut cost)
}

fn check_within(
    value: &Value,
    depth: usize,
    path: &Path<'_>,
    cost: &mut (usize, usize),
) -> Result<(), ConfigError> {
    cost.0 += 1;
    if let Value::String(s) = value {
        cost.1 += s.len();
    }
    if cost.0 > MAX_NODES || cost.1 > MAX_SCALAR_BYTES {
        return Err(ConfigError {
            mark: Mark::default(),
            path: path.render(),
            code: ErrorCode::Limit,
            message: format!(
                "the configuration holds more than {MAX_NODES} values or {MAX_SCALAR_BYTES} bytes of text (the limit)"
            ),
        });
    }
    let nested = matches!(value, Value::Array(_) | Value::Object(_));
    if nested && depth >= MAX_DEPTH {
        return Err(too_deep(path.render()));
    }
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_within(item, depth + 1, &path.index(i), cost)?;
            }
        }
        Value::Object(entries) => {
            for (key, item) in entries {
                cost.1 += key.len();
                check_within(item, depth + 1, &path.key(key), cost)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duration_limit_is_a_century_and_safe_in_milliseconds() {
        assert_eq!(MAX_DURATION_SECS, 3_155_760_000);
        assert!(MAX_DURATION_SECS.checked_mul(1000).is_some());
    }

    #[test]
    fn data_nested_too_deep_is_refused_at_its_path() {
        let mut value = serde_json::json!(1);
        for _ in 0..=MAX_DEPTH {
            value = serde_json::json!({ "a": value });
        }
        let error = check_value(&value).unwrap_err();
        assert_eq!(error.code, ErrorCode::Limit);
        assert_eq!(error.path, vec!["a"; MAX_DEPTH].join("."));
        let within = value["a"].clone();
        assert!(check_value(&within).is_ok());
    }

    #[test]
    fn reading_stops_after_the_limit() {
        let endless = std::io::repeat(b'a');
        assert!(matches!(read_text(endless), Err(ReadError::TooLarge)));
        let exact = vec![b'a'; MAX_TEXT_BYTES];
        assert_eq!(read_text(&exact[..]).unwrap().len(), MAX_TEXT_BYTES);
        assert!(matches!(read_text(&[0xff][..]), Err(ReadError::NotUtf8)));
    }
}
