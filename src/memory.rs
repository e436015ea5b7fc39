//! Memory given back when the server goes idle.
//!
//! Under load the process keeps memory it has freed, on purpose: SQLite's
//! page cache (up to 2 MiB per pooled connection), glibc's arenas (SQLite and
//! AWS-LC allocate there, one arena per thread that ever did) and mimalloc's
//! pages are all reused by the next request at no cost. Once the server has
//! been idle for `memory_release_idle_after`, this task gives them back: of
//! the SQLite connections idle in the pool, one drops its page cache (`PRAGMA
//! shrink_memory`) and the others are closed, then the allocators return free
//! pages to the operating system. A server
//! that is busy again refills them as it goes. A server that stays idle
//! releases again once a minute ([`IDLE_RELEASE_AGAIN`]): background work
//! (the metrics refresh, the change feed) reads the database meanwhile,
//! under the CPU share that counts as busy.
//!
//! Idleness is read from the process's own CPU time (`/proc/self/stat`), not
//! from a counter on the request path: the serving path pays nothing for it,
//! and a re-encryption job or any other background work counts as busy too.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// The allocator's own release (the binary's, which may use `unsafe`; the
/// library may not), registered once at start.
static ALLOCATOR_RELEASE: OnceLock<fn()> = OnceLock::new();

/// Registers what gives the allocators' free pages back to the operating
/// system. Called by the `keyward` binary before anything else runs; a second
/// registration is ignored.
pub fn register_allocator_release(release: fn()) {
    let _ = ALLOCATOR_RELEASE.set(release);
}

/// How often a server that stays idle releases again.
const IDLE_RELEASE_AGAIN: Duration = Duration::from_secs(60);

/// The share of one core under which an interval counts as idle: the
/// background tasks (change feed, metrics refresh) stay well below it.
const IDLE_CPU_SHARE: f64 = 0.02;

/// The process's CPU time so far (user and system, all threads), in clock
/// ticks of 1/100 s (Linux's `USER_HZ` for every user-space ABI), or `None`
/// where `/proc` does not exist.
fn process_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; the
    // fields after its closing one are fixed: state is the first, utime the
    // twelfth and stime the thirteenth.
    let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_ascii_whitespace();
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Whether `used` ticks of CPU over `interval` is idle.
fn is_idle(used: u64, interval: Duration) -> bool {
    (used as f64) < interval.as_secs_f64() * 100.0 * IDLE_CPU_SHARE
}

/// Releases memory every time the server has been idle for `after` since it
/// was last busy, and every [`IDLE_RELEASE_AGAIN`] while it stays idle, until
/// `shutdown`.
pub async fn release_when_idle(store: Store, after: Duration, mut shutdown: watch::Receiver<bool>) {
    let Some(mut last) = process_cpu_ticks() else {
        tracing::debug!("no /proc/self/stat: memory is not released when idle");
        return;
    };
    let mut ticker = tokio::time::interval(after);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // When memory was last released in this idle period (`None`: busy since).
    // Counted from the start, as if released then: the first release comes
    // once the server has been busy and idle again, or after a minute idle.
    let mut released = Some(tokio::time::Instant::now());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Some(now) = process_cpu_ticks() else {
            return;
        };
        let used = now.saturating_sub(last);
        last = now;
        if !is_idle(used, after) {
            released = None;
        } else if released.is_none_or(|at| at.elapsed() >= IDLE_RELEASE_AGAIN) {
            release(&store).await;
            released = Some(tokio::time::Instant::now());
            // The release's own CPU time is not activity.
            last = process_cpu_ticks().unwrap_or(last);
        }
    }
}

/// Gives back what can be given back now.
async fn release(store: &Store) {
    let closed = store.release_idle_memory().await;
    if let Some(release) = ALLOCATOR_RELEASE.get() {
        release();
    }
    tracing::debug!(closed_connections = closed, "idle: memory released");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_cpu_time_is_read_and_grows_with_work() {
        let first = process_cpu_ticks().unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        // Work until a tick (10 ms of CPU) shows, for at most 5 s of wall
        // time on a busy machine.
        while process_cpu_ticks().unwrap() == first && start.elapsed() < Duration::from_secs(5) {
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        let second = process_cpu_ticks().unwrap();
        assert!(
            second > first,
            "{first} -> {second} after 5 s of work ({x})"
        );
    }

    #[test]
    fn two_percent_of_a_core_is_the_line_between_idle_and_busy() {
        let interval = Duration::from_secs(2);
        assert!(is_idle(0, interval));
        assert!(is_idle(3, interval));
        assert!(!is_idle(4, interval));
        assert!(!is_idle(200, interval));
    }
}
