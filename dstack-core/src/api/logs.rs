//! dstack's log page (`JobSubmissionLogs`, the answer to `logs/poll`) and error body.

use serde_json::{json, Value};

use super::{base64, iso_time};

/// The stream a log event came from (dstack's `LogEventSource`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One piece of a job's output.
#[derive(Clone, Copy, Debug)]
pub struct LogEvent<'a> {
    /// When it was written (Unix ms).
    pub timestamp_ms: u64,
    /// Where it was written.
    pub source: LogSource,
    /// The bytes, as written (any encoding).
    pub message: &'a [u8],
}

/// dstack's `JobSubmissionLogs`: the events (messages base64-encoded, as dstack sends them)
/// and the token that continues after them (`None`: nothing more now).
pub fn log_page(events: &[LogEvent<'_>], next_token: Option<&str>) -> Value {
    let logs: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "timestamp": iso_time(e.timestamp_ms),
                "log_source": match e.source {
                    LogSource::Stdout => "stdout",
                    LogSource::Stderr => "stderr",
                },
                "message": base64(e.message),
            })
        })
        .collect();
    json!({"logs": logs, "next_token": next_token, "external_url": Value::Null})
}

/// dstack's error codes (`ServerClientErrorCode`): dstack's clients raise the matching error
/// class for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Any other error (`error`).
    Error,
    /// The resource already exists (`resource_exists`).
    ResourceExists,
    /// The resource does not exist (`resource_not_exists`).
    ResourceNotExists,
    /// Bad backend credentials (`invalid_credentials`).
    InvalidCredentials,
    /// The backend cannot be used (`backend_not_available`).
    BackendNotAvailable,
    /// The repo is unknown (`repo_does_not_exist`).
    RepoDoesNotExist,
    /// A gateway failed (`gateway_error`).
    GatewayError,
}

impl ErrorCode {
    /// The code as dstack writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Error => "error",
            ErrorCode::ResourceExists => "resource_exists",
            ErrorCode::ResourceNotExists => "resource_not_exists",
            ErrorCode::InvalidCredentials => "invalid_credentials",
            ErrorCode::BackendNotAvailable => "backend_not_available",
            ErrorCode::RepoDoesNotExist => "repo_does_not_exist",
            ErrorCode::GatewayError => "gateway_error",
        }
    }
}

/// dstack's body of an HTTP 400 answer: `{"detail": [{"code": …, "msg": …}]}`. dstack's
/// clients raise the error class of `code` with `msg` (only when `detail` holds one entry, as
/// here).
pub fn error_body(code: ErrorCode, msg: &str) -> Value {
    json!({"detail": [{"code": code.as_str(), "msg": msg}]})
}
