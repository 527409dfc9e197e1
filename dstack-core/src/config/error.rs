//! Located configuration errors: `FILE:LINE:COL: field.path: message [code]`.

use std::fmt;

use super::yaml::Mark;

/// A stable, machine-readable class of configuration error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The file is not well-formed YAML.
    Syntax,
    /// The top-level `type` (or a volume's `backend`) is missing or unknown.
    UnknownType,
    /// A value has the wrong YAML type (a list where a string is expected, …).
    InvalidType,
    /// A required field is absent.
    MissingField,
    /// A key that the model does not define (a typo, usually).
    UnknownField,
    /// A value of the right type that breaks a rule of its field (grammar, enum, format).
    InvalidValue,
    /// A number outside the allowed bounds, or a range whose ends are inverted.
    OutOfRange,
    /// Two fields (or two parts of one value) that cannot be combined.
    Conflict,
    /// The file could not be read.
    Io,
    /// The document, or a count or duration in it, is beyond one of this parser's limits
    /// ([`super::limits`]): size, nesting, values, alias expansion, nodes, GPUs, durations.
    Limit,
    /// A field dstack honours that this project cannot honour (yet): refused when the
    /// configuration is applied rather than ignored ([`super::support`]).
    Unsupported,
}

impl ErrorCode {
    /// The code as written in messages and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Syntax => "syntax",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidType => "invalid_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Io => "io",
            ErrorCode::Limit => "limit",
            ErrorCode::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem in a configuration, with the place it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the file (1-based line and column).
    pub mark: Mark,
    /// The field path, e.g. `resources.gpu` or `ports[0]`; empty for the document itself.
    pub path: String,
    /// The class of error.
    pub code: ErrorCode,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(root)"
        } else {
            &self.path
        };
        if self.mark.line > 0 {
            write!(f, "{}:{}: ", self.mark.line, self.mark.col)?;
        }
        write!(f, "{}: {} [{}]", path, self.message, self.code)
    }
}

/// Every problem found in one configuration file, in document order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file name used as the prefix of every line (`<string>` for in-memory text).
    pub file: String,
    /// The problems, sorted by position.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let sep = if e.mark.line > 0 { ":" } else { ": " };
            write!(f, "{}{sep}{e}", self.file)?;
        }
        Ok(())
    }
}
