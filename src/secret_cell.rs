//! A secret value shared by the one client that needs it and by whatever may
//! replace it while the process runs: a `file://` secret reference is re-read
//! on SIGHUP (see `config::SecretFiles`), and the provider or pool holding the
//! cell sees the new value the next time it logs in or connects. Zeroed on
//! drop, never printed; a generation counter tells a holder that the value
//! changed, so that it logs in again with the new one.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A secret that a reload may replace. Clones share the value.
#[derive(Clone)]
pub struct SecretCell(Arc<Inner>);

struct Inner {
    value: RwLock<Zeroizing<String>>,
    generation: AtomicU64,
}

impl SecretCell {
    /// A cell holding `value`.
    pub fn new(value: Zeroizing<String>) -> SecretCell {
        SecretCell(Arc::new(Inner {
            value: RwLock::new(value),
            generation: AtomicU64::new(0),
        }))
    }

    /// The current value, copied into zeroizing memory for the one call that
    /// needs it.
    pub fn get(&self) -> Zeroizing<String> {
        // A writer never panics while holding the lock (it only swaps a
        // value), so a poisoned lock still holds a whole value.
        let guard = self.0.value.read().unwrap_or_else(|e| e.into_inner());
        Zeroizing::new(guard.as_str().to_string())
    }

    /// How many times the value has changed since the cell was made.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// Replaces the value; true when it differs from the old one (compared in
    /// constant time), which bumps the generation.
    pub fn replace(&self, value: Zeroizing<String>) -> bool {
        let mut guard = self.0.value.write().unwrap_or_else(|e| e.into_inner());
        let same: bool = guard.as_bytes().ct_eq(value.as_bytes()).into();
        if same {
            return false;
        }
        *guard = value;
        self.0.generation.fetch_add(1, Ordering::AcqRel);
        true
    }
}

impl fmt::Debug for SecretCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretCell(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_value_is_seen_by_every_clone_and_bumps_the_generation_once() {
        let a = SecretCell::new(Zeroizing::new("one".into()));
        let b = a.clone();
        assert!(!a.replace(Zeroizing::new("one".into())));
        assert_eq!(b.generation(), 0);
        assert!(a.replace(Zeroizing::new("two".into())));
        assert_eq!((b.get().as_str(), b.generation()), ("two", 1));
        assert_eq!(format!("{b:?}"), "SecretCell(<redacted>)");
    }
}
