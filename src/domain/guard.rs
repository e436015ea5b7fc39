//! Abuse guards in front of authentication: a per-API-key request rate limit
//! (token bucket) and brute-force lockout, per key id and per client address.
//!
//! After `max_failures` failed authentications for one key id (or from one
//! address) within `window`, every further attempt for it, even with the right
//! secret, is refused until the window ends. Failures are not reset by a
//! success: otherwise an attacker could interleave guesses with the real
//! client's requests. Both maps are bounded; in-memory per replica.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most tracked keys or addresses (expired entries are dropped first).
const CAPACITY: usize = 100_000;

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// Settings of the guards.
#[derive(Debug, Clone, Copy)]
pub struct GuardSettings {
    /// Requests per second per API key (0: no limit).
    pub rate_limit: u32,
    /// Failed authentications before a lockout.
    pub max_failures: u32,
    /// Window for counting failures, and lockout length.
    pub window: Duration,
}

/// Why a request is refused before its secret is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed attempts for this key or address; retry after.
    LockedOut(Duration),
    /// Over the per-key rate; retry after.
    RateLimited(Duration),
}

/// The guards.
pub struct AuthGuard {
    settings: GuardSettings,
    by_key: Mutex<HashMap<String, Failures>>,
    by_addr: Mutex<HashMap<IpAddr, Failures>>,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// Whether any failure was ever recorded: until then the lockout check,
    /// which runs on every request, takes no lock.
    any_failure: AtomicBool,
}

impl std::fmt::Debug for AuthGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGuard")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn locked<K, Q>(map: &Mutex<HashMap<K, Failures>>, k: &Q, now: Instant) -> Option<Duration>
where
    K: std::hash::Hash + Eq + Borrow<Q>,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.get(k)
        .and_then(|f| f.locked_until)
        .filter(|until| *until > now)
        .map(|until| until - now)
}

fn fail<K: std::hash::Hash + Eq + Clone>(
    map: &Mutex<HashMap<K, Failures>>,
    k: &K,
    now: Instant,
    s: GuardSettings,
) -> bool {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= CAPACITY && !map.contains_key(k) {
        map.retain(|_, f| {
            now.duration_since(f.window_start) < s.window || f.locked_until.is_some_and(|u| u > now)
        });
        if map.len() >= CAPACITY {
            return false;
        }
    }
    let f = map.entry(k.clone()).or_insert(Failures {
        count: 0,
        window_start: now,
        locked_until: None,
    });
    if now.duration_since(f.window_start) >= s.window && f.locked_until.is_none_or(|u| u <= now) {
        *f = Failures {
            count: 0,
            window_start: now,
            locked_until: None,
        };
    }
    f.count += 1;
    if f.count >= s.max_failures && f.locked_until.is_none_or(|u| u <= now) {
        f.locked_until = Some(now + s.window);
        return true;
    }
    false
}

impl AuthGuard {
    /// Guards with these settings.
    pub fn new(settings: GuardSettings) -> Self {
        AuthGuard {
            settings,
            by_key: Mutex::new(HashMap::new()),
            by_addr: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            any_failure: AtomicBool::new(false),
        }
    }

    /// Refuses a locked-out key id or address, before any secret is checked.
    pub fn check_lockout(&self, key_id: &str, addr: Option<IpAddr>) -> Result<(), Refusal> {
        if !self.any_failure.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = Instant::now();
        let key = locked(&self.by_key, key_id, now);
        let address = addr.and_then(|a| locked(&self.by_addr, &a, now));
        match key.max(address) {
            Some(left) => Err(Refusal::LockedOut(left)),
            None => Ok(()),
        }
    }

    /// Counts a failed authentication; logs when it starts a lockout.
    pub fn record_failure(&self, key_id: &str, addr: Option<IpAddr>) {
        self.any_failure.store(true, Ordering::Relaxed);
        let now = Instant::now();
        // Key ids that are not even well-formed are counted by address only,
        // so that random ids cannot fill the key map.
        if key_id.len() <= 64 && fail(&self.by_key, &key_id.to_string(), now, self.settings) {
            tracing::warn!(
                api_key = key_id,
                "too many failed authentications: API key locked out"
            );
            metrics::counter!("keyward_auth_lockouts_total", "by" => "api_key").increment(1);
        }
        if let Some(a) = addr {
            if fail(&self.by_addr, &a, now, self.settings) {
                tracing::warn!(address = %a, "too many failed authentications: client address locked out");
                metrics::counter!("keyward_auth_lockouts_total", "by" => "address").increment(1);
            }
        }
    }

    /// Takes one token from the key's bucket (burst: one second's worth).
    pub fn check_rate(&self, key_id: &str) -> Result<(), Refusal> {
        let rate = self.settings.rate_limit;
        if rate == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= CAPACITY && !buckets.contains_key(key_id) {
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(1));
        }
        let (tokens, at) = buckets
            .entry(key_id.to_string())
            .or_insert((f64::from(rate), now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * f64::from(rate))
            .min(f64::from(rate));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Refusal::RateLimited(Duration::from_secs_f64(
                (1.0 - *tokens) / f64::from(rate),
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_locked_after_max_failures_even_for_the_right_secret() {
        let g = AuthGuard::new(GuardSettings {
            rate_limit: 0,
            max_failures: 3,
            window: Duration::from_secs(60),
        });
        let addr = Some("10.0.0.1".parse().unwrap());
        for _ in 0..2 {
            g.record_failure("kw_a", addr);
            assert!(g.check_lockout("kw_a", addr).is_ok());
        }
        g.record_failure("kw_a", addr);
        assert!(matches!(
            g.check_lockout("kw_a", None),
            Err(Refusal::LockedOut(_))
        ));
        assert!(
            matches!(
                g.check_lockout("kw_other", addr),
                Err(Refusal::LockedOut(_))
            ),
            "the address too"
        );
        assert!(g
            .check_lockout("kw_other", Some("10.0.0.2".parse().unwrap()))
            .is_ok());
    }

    #[test]
    fn the_rate_limit_refills_over_time() {
        let g = AuthGuard::new(GuardSettings {
            rate_limit: 2,
            max_failures: 10,
            window: Duration::from_secs(60),
        });
        assert!(g.check_rate("k").is_ok());
        assert!(g.check_rate("k").is_ok());
        assert!(matches!(g.check_rate("k"), Err(Refusal::RateLimited(_))));
        assert!(g.check_rate("other").is_ok());
        std::thread::sleep(Duration::from_millis(600));
        assert!(g.check_rate("k").is_ok());
    }
}
