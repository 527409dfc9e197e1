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

/// Whether more than `secs` seconds have passed from `since_ms` to `now_ms`. The arithmetic is
/// checked: a time too long to count in milliseconds has not passed (never wraps into "at
/// once").
pub fn longer_than(now_ms: u64, since_ms: u64, secs: u64) -> bool {
    secs.checked_mul(1000)
        .is_some_and(|limit_ms| now_ms.saturating_sub(since_ms) > limit_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_too_long_to_count_never_passes() {
        assert!(longer_than(10_001, 0, 10));
        assert!(!longer_than(10_000, 0, 10));
        assert!(!longer_than(u64::MAX, 0, u64::MAX / 10));
        assert!(!longer_than(u64::MAX, 0, u64::MAX));
    }
}
