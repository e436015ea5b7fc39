//! Parsers of single setting values: each takes the trimmed text and returns
//! the value or a reason that never repeats a secret.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use zeroize::Zeroizing;

use crate::crypto::DataKey;

pub(super) fn non_empty(v: &str) -> Result<String, String> {
    if v.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(v.to_string())
    }
}

pub(super) fn url(v: &str) -> Result<String, String> {
    if v.starts_with("http://") || v.starts_with("https://") {
        Ok(v.trim_end_matches('/').to_string())
    } else {
        Err("must be a URL starting with http:// or https://".into())
    }
}

pub(super) fn positive(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("must be a positive integer".into()),
    }
}

pub(super) fn duration(v: &str) -> Result<Duration, String> {
    match humantime::parse_duration(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err("must be a positive duration like `500ms`, `2s` or `5m`".into()),
    }
}

pub(super) fn readable_file(v: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("`{v}` is not a readable file"))
    }
}

/// Parses base64 of exactly 32 bytes. The error never contains the value.
pub fn parse_master_key(v: &str) -> Result<DataKey, String> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .map_err(|_| "must be base64 of 32 random bytes (not valid base64)".to_string())?,
    );
    DataKey::from_slice(&bytes).ok_or_else(|| {
        format!(
            "must be base64 of exactly 32 random bytes (decodes to {} bytes)",
            bytes.len()
        )
    })
}
