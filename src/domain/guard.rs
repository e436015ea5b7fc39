//! Abuse guards in front of authentication, all in memory per replica and
//! bounded:
//!
//! - **Lockout per client address**, never per key id. After `max_failures`
//!   refused secrets from one address within `window`, every further attempt
//!   from that address, even with a right secret, is refused until the window
//!   ends. Failures are not reset by a success: otherwise a guesser could
//!   interleave its guesses with a real client's requests.
//!
//!   Why not per key id: a key id is not a secret (it is in logs, audit
//!   records, configuration), and counting failures against it lets anyone
//!   who knows it lock its holder out from anywhere: a lockout aimed at
//!   someone else. Counting per key id buys nothing against guessing either:
//!   secrets are 256 random bits, so no number of guesses matters; what needs
//!   bounding is how much noise one source can make, which is per address.
//!   A right secret keeps working for its holder from any other address.
//!
//!   IPv6 addresses are counted per /64 (one host usually holds a whole /64,
//!   so counting single addresses would let it rotate past any limit).
//! - **A request rate per API key** (token bucket, one second of burst).
//! - **A request rate per address for requests without credentials**
//!   (missing or malformed headers; token bucket, [`UNAUTHENTICATED_BURST`]
//!   seconds of burst).
//! - **Sampling of refused requests' audit records**: per address, the first
//!   `audit_refused_per_minute` refused requests of each minute are recorded
//!   in full, the rest only counted (metric and a log line), and all addresses
//!   together at most [`AUDIT_REFUSED_TOTAL_FACTOR`] times as many; see
//!   `docs/audit.md`.
//!
//! [`FailureCounter`] is also what bounds wrong client keys per encryption.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client_addr::TrustedProxies;

/// Most tracked keys or addresses per map (expired entries are dropped first).
const CAPACITY: usize = 100_000;

/// Seconds' worth of tokens an address's bucket for requests without
/// credentials holds (a client that starts without its credentials
/// configured retries a few times; a flood drains it).
pub const UNAUTHENTICATED_BURST: u32 = 5;

/// All addresses together may have this many times `audit_refused_per_minute`
/// refused requests recorded in full per minute (an attacker with many
/// addresses, such as an IPv6 range, cannot flood the audit either).
pub const AUDIT_REFUSED_TOTAL_FACTOR: u32 = 100;

/// The window of audit sampling.
const AUDIT_WINDOW: Duration = Duration::from_secs(60);

/// The key an address is counted under: IPv4 as is, IPv6 by its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    /// The key of `addr`.
    pub fn of(addr: IpAddr) -> AddrKey {
        match addr {
            IpAddr::V4(_) => AddrKey(addr),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    AddrKey(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// Failures counted per `K` within a window: at `max_failures`, `K` is locked
/// for one window. Bounded to [`CAPACITY`] entries; when full of live
/// entries, new ones are not counted (and logged once).
pub struct FailureCounter<K> {
    max_failures: u32,
    window: Duration,
    map: Mutex<HashMap<K, Failures>>,
    /// When the last lockout ends, in milliseconds since `base` (0: none
    /// yet). Outside a lockout [`Self::locked`], which runs on every request,
    /// takes no lock.
    locks_end_ms: AtomicU64,
    base: Instant,
}

impl<K> std::fmt::Debug for FailureCounter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureCounter")
            .field("max_failures", &self.max_failures)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> FailureCounter<K> {
    /// A counter locking after `max_failures` failures within `window`, for
    /// one `window`.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        FailureCounter {
            max_failures: max_failures.max(1),
            window,
            map: Mutex::new(HashMap::new()),
            locks_end_ms: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    fn ms_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    /// How long `k` stays locked, if it is.
    pub fn locked<Q>(&self, k: &Q) -> Option<Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = Instant::now();
        if self.ms_since_base(now) >= self.locks_end_ms.load(Ordering::Acquire) {
            return None;
        }
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(k)
            .and_then(|f| f.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Counts a failure of `k`; true when it starts a lockout.
    pub fn fail(&self, k: &K) -> bool {
        let now = Instant::now();
        let window = self.window;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CAPACITY && !map.contains_key(k) {
            map.retain(|_, f| {
                now.duration_since(f.window_start) < window
                    || f.locked_until.is_some_and(|u| u > now)
            });
            if map.len() >= CAPACITY {
                metrics::counter!("keyward_guard_capacity_reached_total").increment(1);
                return false;
            }
        }
        let f = map.entry(k.clone()).or_insert(Failures {
            count: 0,
            window_start: now,
            locked_until: None,
        });
        if now.duration_since(f.window_start) >= window && f.locked_until.is_none_or(|u| u <= now) {
            *f = Failures {
                count: 0,
                window_start: now,
                locked_until: None,
            };
        }
        f.count = f.count.saturating_add(1);
        if f.count >= self.max_failures && f.locked_until.is_none_or(|u| u <= now) {
            let until = now + window;
            f.locked_until = Some(until);
            // Rounded up, so the fast path never misses the lockout's end.
            let until_ms = self.ms_since_base(until).saturating_add(1);
            self.locks_end_ms.fetch_max(until_ms, Ordering::AcqRel);
            return true;
        }
        false
    }
}

/// Token buckets per `K`: `rate` per second, holding `burst` seconds' worth.
struct Buckets<K> {
    rate: u32,
    burst: u32,
    map: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: u32, burst: u32) -> Self {
        Buckets {
            rate,
            burst: burst.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `k`'s bucket, or says how long until one is there.
    fn take<Q>(&self, k: &Q) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if self.rate == 0 {
            return Ok(());
        }
        let rate = f64::from(self.rate);
        let full = rate * f64::from(self.burst);
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CAPACITY && !map.contains_key(k) {
            let refill = Duration::from_secs(u64::from(self.burst));
            map.retain(|_, (_, at)| now.duration_since(*at) < refill);
            if map.len() >= CAPACITY {
                // Full of live buckets: the newcomer is refused rather than
                // let the map grow (the refusal ends as buckets refill).
                return Err(Duration::from_secs(1));
            }
        }
        // One lookup for a known key (every request of a busy key); a new
        // key is inserted (and its id copied) once.
        let (tokens, at) = match map.get_mut(k) {
            Some(bucket) => bucket,
            None => map.entry(k.to_owned()).or_insert((full, now)),
        };
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(full);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// Refused requests per address in the current audit window.
struct AuditSample {
    window_start: Instant,
    total: u32,
    by_addr: HashMap<AddrKey, u32>,
}

/// Settings of the guards.
#[derive(Debug, Clone, Copy)]
pub struct GuardSettings {
    /// Requests per second per API key (0: no limit).
    pub rate_limit: u32,
    /// Failed authentications from one address before it is locked out.
    pub max_failures: u32,
    /// Window for counting failures, and lockout length.
    pub window: Duration,
    /// Requests without credentials per second per address (0: no limit).
    pub unauthenticated_rate_limit: u32,
    /// Refused requests recorded in full in the audit per address per minute.
    pub audit_refused_per_minute: u32,
}

/// Why a request is refused before its secret is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed attempts from this address; retry after.
    LockedOut(Duration),
    /// Over the per-key or per-address rate; retry after.
    RateLimited(Duration),
}

/// The guards.
pub struct AuthGuard {
    settings: GuardSettings,
    by_addr: FailureCounter<AddrKey>,
    key_buckets: Buckets<String>,
    unauthenticated: Buckets<AddrKey>,
    audit: Mutex<AuditSample>,
    proxies: TrustedProxies,
}

impl std::fmt::Debug for AuthGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGuard")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AuthGuard {
    /// Guards with these settings.
    pub fn new(settings: GuardSettings) -> Self {
        AuthGuard {
            settings,
            by_addr: FailureCounter::new(settings.max_failures, settings.window),
            key_buckets: Buckets::new(settings.rate_limit, 1),
            unauthenticated: Buckets::new(
                settings.unauthenticated_rate_limit,
                UNAUTHENTICATED_BURST,
            ),
            audit: Mutex::new(AuditSample {
                window_start: Instant::now(),
                total: 0,
                by_addr: HashMap::new(),
            }),
            proxies: TrustedProxies::default(),
        }
    }

    /// Believes the forwarding headers of these proxies (see
    /// [`TrustedProxies`]).
    pub fn with_trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// The proxies whose forwarding headers are believed.
    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.proxies
    }

    /// Refuses a locked-out address, before any secret is checked. The key id
    /// plays no part: see the module docs.
    pub fn check_lockout(&self, addr: Option<IpAddr>) -> Result<(), Refusal> {
        match addr.and_then(|a| self.by_addr.locked(&AddrKey::of(a))) {
            Some(left) => Err(Refusal::LockedOut(left)),
            None => Ok(()),
        }
    }

    /// Counts a refused secret against the address it came from; logs when
    /// it starts a lockout.
    pub fn record_failure(&self, addr: Option<IpAddr>) {
        let Some(a) = addr else { return };
        let key = AddrKey::of(a);
        if self.by_addr.fail(&key) {
            tracing::warn!(address = %key, "too many failed authentications: client address locked out");
            // The label stays for dashboards made when key ids were locked
            // out too; addresses are all that is locked out now.
            metrics::counter!("keyward_auth_lockouts_total", "by" => "address").increment(1);
        }
    }

    /// Takes one token from the bucket of `addr` for a request without
    /// (well-formed) credentials.
    pub fn check_unauthenticated(&self, addr: Option<IpAddr>) -> Result<(), Refusal> {
        let Some(a) = addr else { return Ok(()) };
        self.unauthenticated
            .take(&AddrKey::of(a))
            .map_err(Refusal::RateLimited)
    }

    /// Takes one token from the key's bucket (burst: one second's worth).
    pub fn check_rate(&self, key_id: &str) -> Result<(), Refusal> {
        self.key_buckets.take(key_id).map_err(Refusal::RateLimited)
    }

    /// Whether the audit record of a request refused for its credentials
    /// (missing, invalid, locked out or rate limited) from `addr` is written
    /// in full; otherwise it is only counted.
    pub fn audit_refused(&self, addr: Option<IpAddr>) -> bool {
        let per_addr = self.settings.audit_refused_per_minute;
        let now = Instant::now();
        let mut sample = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(sample.window_start) >= AUDIT_WINDOW {
            sample.window_start = now;
            sample.total = 0;
            sample.by_addr.clear();
        }
        let total_cap = per_addr.saturating_mul(AUDIT_REFUSED_TOTAL_FACTOR);
        if sample.total >= total_cap {
            if sample.total == total_cap {
                sample.total += 1;
                tracing::warn!(
                    limit = total_cap,
                    "more refused requests this minute than the audit records in full; the rest are counted in keyward_audit_refused_unrecorded_total"
                );
            }
            metrics::counter!("keyward_audit_refused_unrecorded_total").increment(1);
            return false;
        }
        let key = addr.map(AddrKey::of);
        let n = match key {
            Some(k) if sample.by_addr.len() < CAPACITY || sample.by_addr.contains_key(&k) => {
                let n = sample.by_addr.entry(k).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            _ => 1,
        };
        if n > per_addr {
            if n == per_addr + 1 {
                tracing::warn!(
                    address = %key.map(|k| k.to_string()).unwrap_or_default(),
                    limit = per_addr,
                    "more refused requests from one address this minute than the audit records in full; the rest are counted in keyward_audit_refused_unrecorded_total"
                );
            }
            metrics::counter!("keyward_audit_refused_unrecorded_total").increment(1);
            return false;
        }
        sample.total += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GuardSettings {
        GuardSettings {
            rate_limit: 0,
            max_failures: 3,
            window: Duration::from_secs(60),
            unauthenticated_rate_limit: 0,
            audit_refused_per_minute: 2,
        }
    }

    #[test]
    fn an_address_is_locked_after_max_failures_and_no_key_id_ever_is() {
        let g = AuthGuard::new(settings());
        let addr = Some("10.0.0.1".parse().unwrap());
        for _ in 0..2 {
            g.record_failure(addr);
            assert!(g.check_lockout(addr).is_ok());
        }
        g.record_failure(addr);
        assert!(matches!(g.check_lockout(addr), Err(Refusal::LockedOut(_))));
        assert!(g.check_lockout(Some("10.0.0.2".parse().unwrap())).is_ok());
        assert!(g.check_lockout(None).is_ok());
    }

    #[test]
    fn a_lockout_ends_after_its_window() {
        let c = FailureCounter::new(2, Duration::from_millis(200));
        assert!(!c.fail(&1u8));
        assert!(c.locked(&1).is_none());
        assert!(c.fail(&1));
        assert!(c.locked(&1).is_some() && c.locked(&2).is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert!(c.locked(&1).is_none());
    }

    #[test]
    fn ipv6_addresses_are_counted_per_64() {
        let g = AuthGuard::new(settings());
        for i in 1..=3 {
            g.record_failure(Some(format!("2001:db8:1:2::{i}").parse().unwrap()));
        }
        let same_64 = Some("2001:db8:1:2:ffff::9".parse().unwrap());
        assert!(g.check_lockout(same_64).is_err());
        assert!(g
            .check_lockout(Some("2001:db8:1:3::1".parse().unwrap()))
            .is_ok());
        assert_eq!(
            AddrKey::of("::ffff:10.1.2.3".parse().unwrap()),
            AddrKey::of("10.1.2.3".parse().unwrap())
        );
    }

    #[test]
    fn the_rate_limit_refills_over_time() {
        let g = AuthGuard::new(GuardSettings {
            rate_limit: 2,
            ..settings()
        });
        assert!(g.check_rate("k").is_ok());
        assert!(g.check_rate("k").is_ok());
        assert!(matches!(g.check_rate("k"), Err(Refusal::RateLimited(_))));
        assert!(g.check_rate("other").is_ok());
        std::thread::sleep(Duration::from_millis(600));
        assert!(g.check_rate("k").is_ok());
    }

    #[test]
    fn requests_without_credentials_have_a_bucket_per_address() {
        let g = AuthGuard::new(GuardSettings {
            unauthenticated_rate_limit: 1,
            ..settings()
        });
        let a = Some("10.0.0.1".parse().unwrap());
        for _ in 0..UNAUTHENTICATED_BURST {
            assert!(g.check_unauthenticated(a).is_ok());
        }
        assert!(g.check_unauthenticated(a).is_err());
        assert!(g
            .check_unauthenticated(Some("10.0.0.2".parse().unwrap()))
            .is_ok());
    }

    #[test]
    fn refused_requests_are_sampled_per_address_and_in_total() {
        let g = AuthGuard::new(settings());
        let a = Some("10.0.0.1".parse().unwrap());
        assert!(g.audit_refused(a));
        assert!(g.audit_refused(a));
        assert!(!g.audit_refused(a));
        assert!(g.audit_refused(Some("10.0.0.2".parse().unwrap())));
        // 2 per address, 200 in all.
        let mut recorded = 3;
        for i in 0..1000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            recorded += u32::from(g.audit_refused(Some(addr)));
        }
        assert_eq!(recorded, 200);
    }
}
