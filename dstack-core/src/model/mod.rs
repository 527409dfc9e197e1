//! Runtime records — runs, jobs (job submissions), instances and fleets — and dstack's status
//! enums, termination reasons and the rules that connect them.

mod records;
mod status;

pub use records::*;
pub use status::*;

/// Milliseconds since the Unix epoch, the time unit of every record.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
