//! How a connection to the state file waits for a lock another connection holds (the writer's
//! lock during another process's transaction or a checkpoint, the log during a reader's).

use std::time::Duration;

/// How long a connection waits for a lock at most (a transaction takes well under a
/// millisecond; seconds only when something is wrong).
const WAIT_AT_MOST: Duration = Duration::from_secs(30);

/// How long the checkpoint thread waits at most: it holds the writer's lock while it waits for
/// readers to leave the log, so it gives up soon (and starts the log over another time) rather
/// than hold up the engine behind a reader that takes long.
const CHECKPOINT_WAITS_AT_MOST: Duration = Duration::from_millis(100);

/// Between two of the first tries: short, so that a lock freed after a millisecond or two is
/// taken at once. (SQLite's own busy handler sleeps 1, 2, 5, 10 … 100 ms between tries: a
/// writer held up 2 ms by a checkpoint would wait 3 ms, one held 4 ms would wait 8.)
const RETRY_SOON: Duration = Duration::from_micros(100);

/// How many tries come [`RETRY_SOON`] after each other (10 ms in all); later ones come
/// [`RETRY_LATER`] apart (a reader of another process may hold the log for longer).
const SOON_TRIES: u32 = 100;

/// Between two later tries.
const RETRY_LATER: Duration = Duration::from_millis(1);

/// The busy handler of the connections that read and write a state file: told how many times
/// the lock was tried already, waits before the next try and says whether to try at all.
pub(super) fn retry_soon(tries: i32) -> bool {
    retry(tries, WAIT_AT_MOST)
}

/// The busy handler of the checkpoint thread's connection: as [`retry_soon`], for a shorter
/// time.
pub(super) fn retry_briefly(tries: i32) -> bool {
    retry(tries, CHECKPOINT_WAITS_AT_MOST)
}

/// Waits before try `tries + 1`, unless the tries so far took `at_most`.
fn retry(tries: i32, at_most: Duration) -> bool {
    let tries = u32::try_from(tries).unwrap_or(u32::MAX);
    let later = tries.saturating_sub(SOON_TRIES);
    let waited = RETRY_SOON * tries.min(SOON_TRIES) + RETRY_LATER.saturating_mul(later);
    if waited >= at_most {
        return false;
    }
    std::thread::sleep(if tries < SOON_TRIES {
        RETRY_SOON
    } else {
        RETRY_LATER
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_again_soon_then_less_often_and_gives_up_after_the_longest_wait() {
        let t = std::time::Instant::now();
        assert!(retry_soon(0));
        assert!(retry_soon(SOON_TRIES as i32 - 1));
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        let t = std::time::Instant::now();
        assert!(retry_soon(SOON_TRIES as i32));
        assert!(t.elapsed() >= RETRY_LATER);
        // 10 ms of quick tries, then 1 ms each up to 30 s.
        let last = SOON_TRIES + 29_990;
        assert!(retry_soon(last as i32 - 1));
        assert!(!retry_soon(last as i32));
        assert!(!retry_soon(i32::MAX));
        // The checkpoint thread: 10 ms of quick tries, then 1 ms each up to 100 ms.
        let last = SOON_TRIES + 90;
        assert!(retry_briefly(last as i32 - 1));
        assert!(!retry_briefly(last as i32));
    }
}
