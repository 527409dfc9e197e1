//! Durations: `90`, `"30s"`, `"5m"`, `"2 h"`, `"1d"`, `"1w"`, and their `off` variants.

use serde::{Serialize, Serializer};

use super::de::{Cx, Decode, Path};
use super::error::ErrorCode;
use super::limits;
use super::yaml::{Node, NodeKind};

/// A number of seconds, written as an integer, a float (truncated), a numeric string or
/// `<int><unit>` with unit `s m h d w` (spaces allowed before the unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Duration(pub i64);

impl Duration {
    /// The number of seconds.
    pub fn seconds(self) -> i64 {
        self.0
    }

    /// Parses the string form; `None` when it is not a duration.
    pub fn parse_str(s: &str) -> Option<Duration> {
        let s = s.trim();
        if let Ok(n) = s.parse::<i64>() {
            return Some(Duration(n));
        }
        let unit = s.chars().last()?;
        let multiplier = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        let number = s[..s.len() - 1].trim_end();
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        number
            .parse::<i64>()
            .ok()?
            .checked_mul(multiplier)
            .map(Duration)
    }
}

const DURATION_HINT: &str =
    "expected a duration such as 90, \"30s\", \"5m\", \"2h\", \"1d\" or \"1w\"";

impl Decode for Duration {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let parsed = match &node.kind {
            NodeKind::Int(i) => Some(Duration(*i)),
            NodeKind::Float(f) if f.is_finite() => Some(Duration(f.trunc() as i64)),
            NodeKind::Str(s) => Duration::parse_str(s),
            _ => None,
        };
        let Some(duration) = parsed else {
            let message = format!("invalid duration {}; {DURATION_HINT}", node.preview());
            cx.error(node.mark, path, ErrorCode::InvalidValue, message);
            return None;
        };
        if duration.0.unsigned_abs() > limits::MAX_DURATION_SECS.unsigned_abs() {
            let message = format!(
                "{} seconds is longer than the limit of {} seconds (100 years)",
                duration.0,
                limits::MAX_DURATION_SECS
            );
            cx.error(node.mark, path, ErrorCode::Limit, message);
            return None;
        }
        Some(duration)
    }
}

/// A duration that can be turned off (`max_duration`, `stop_duration`).
///
/// `"off"` and `false` mean off; `true` or omission mean "use the default" and are not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffableDuration {
    /// Explicitly off.
    Off,
    /// A limit in seconds.
    Seconds(Duration),
}

impl Serialize for OffableDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            OffableDuration::Off => s.serialize_str("off"),
            OffableDuration::Seconds(d) => s.serialize_i64(d.0),
        }
    }
}

/// Decodes an offable duration; `Ok(None)` stands for `true` (the default).
pub fn decode_offable(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<OffableDuration> {
    match &node.kind {
        NodeKind::Bool(false) => Some(OffableDuration::Off),
        NodeKind::Bool(true) => None,
        NodeKind::Str(s) if s == "off" => Some(OffableDuration::Off),
        _ => {
            let d = Duration::decode(node, cx, path)?;
            if d.0 < 0 {
                let message = format!("must not be negative, got {}; use \"off\" to disable", d.0);
                cx.error(node.mark, path, ErrorCode::OutOfRange, message);
                return None;
            }
            Some(OffableDuration::Seconds(d))
        }
    }
}

/// Decodes an idle duration (`idle_duration`, `auto_cleanup_duration`): `"off"`, `false` and
/// `-1` become `-1` (off); `true` is the default (`None`); other negatives are kept.
pub fn decode_idle(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Duration> {
    match &node.kind {
        NodeKind::Bool(false) => Some(Duration(-1)),
        NodeKind::Bool(true) => None,
        NodeKind::Str(s) if s == "off" => Some(Duration(-1)),
        _ => Duration::decode(node, cx, path),
    }
}

/// Decodes `inactivity_duration`: `"off"` and `false` mean unlimited (`None`).
pub fn decode_inactivity(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Duration> {
    match &node.kind {
        NodeKind::Bool(false) => None,
        NodeKind::Str(s) if s == "off" => None,
        NodeKind::Bool(true) => {
            cx.invalid(
                node,
                path,
                format!("expected a duration or \"off\", found true; {DURATION_HINT}"),
            );
            None
        }
        _ => {
            let d = Duration::decode(node, cx, path)?;
            if d.0 < 0 {
                cx.error(
                    node.mark,
                    path,
                    ErrorCode::OutOfRange,
                    "must not be negative",
                );
                return None;
            }
            Some(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    fn with<T>(text: &str, f: impl Fn(&Node, &mut Cx) -> Option<T>) -> (Option<T>, bool) {
        let doc = load(&format!("v: {text}")).unwrap();
        let mut cx = Cx::default();
        let v = f(doc.get("v").unwrap(), &mut cx);
        (v, cx.has_errors())
    }

    #[test]
    fn duration_vectors() {
        let d = |t| {
            with(t, |n, cx| Duration::decode(n, cx, &Path::ROOT))
                .0
                .map(|d| d.0)
        };
        assert_eq!(d("90"), Some(90));
        assert_eq!(d("'90'"), Some(90));
        assert_eq!(d("1.9"), Some(1));
        assert_eq!(d("30s"), Some(30));
        assert_eq!(d("5m"), Some(300));
        assert_eq!(d("2h"), Some(7200));
        assert_eq!(d("2 h"), Some(7200));
        assert_eq!(d("1d"), Some(86400));
        assert_eq!(d("1w"), Some(604800));
        assert_eq!(d("3155760000"), Some(limits::MAX_DURATION_SECS));
        for bad in [
            "bogus",
            "2y",
            "h2",
            "''",
            "3155760001",
            "9223372036854775807",
            "1.0e+300",
        ] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn offable_and_idle_vectors() {
        let off = |t| with(t, |n, cx| decode_offable(n, cx, &Path::ROOT));
        assert_eq!(off("off"), (Some(OffableDuration::Off), false));
        assert_eq!(off("false"), (Some(OffableDuration::Off), false));
        assert_eq!(off("true"), (None, false));
        assert_eq!(
            off("'90'"),
            (Some(OffableDuration::Seconds(Duration(90))), false)
        );
        assert_eq!(off("-1"), (None, true));
        assert_eq!(off("'-1'"), (None, true));
        let idle = |t| with(t, |n, cx| decode_idle(n, cx, &Path::ROOT));
        assert_eq!(idle("off"), (Some(Duration(-1)), false));
        assert_eq!(idle("false"), (Some(Duration(-1)), false));
        assert_eq!(idle("-1"), (Some(Duration(-1)), false));
        assert_eq!(idle("-300"), (Some(Duration(-300)), false));
        assert_eq!(idle("true"), (None, false));
        assert_eq!(idle("1h"), (Some(Duration(3600)), false));
        assert_eq!(idle("-9223372036854775808"), (None, true));
        assert_eq!(idle("9223372036854775807"), (None, true));
        assert_eq!(off("1000000000000w"), (None, true));
    }
}
