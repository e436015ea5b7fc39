//! Wall-clock helpers. Timestamps are stored as Unix milliseconds (an integer type
//! both SQLite and PostgreSQL share) and shown as RFC 3339 in the API.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds as an RFC 3339 UTC timestamp with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    let mut out = String::new();
    write_rfc3339(ms, &mut out);
    out
}

/// [`rfc3339`] into `out`, which is cleared first: no allocation once `out`
/// has room (the audit writer formats one per record).
pub fn write_rfc3339(ms: i64, out: &mut String) {
    use std::fmt::Write;
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    out.clear();
    // Writing to a `String` cannot fail.
    let _ = write!(out, "{}", humantime::format_rfc3339_millis(t));
}
