//! What `/readyz` says about the server certificate Keyward obtains itself
//! (ACME): when it expires, and whether its renewal is failing. Written by
//! the renewal task, read by the readiness probe.

use std::sync::Mutex;

/// The server certificate's state, as last seen by the renewal task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertState {
    /// The certificate served now: its notAfter (Unix ms), if any.
    pub not_after: Option<i64>,
    /// When its renewal is due (Unix ms).
    pub renew_at: Option<i64>,
    /// Failed orders since the last success (shared by the replicas).
    pub failures: i64,
    /// The last failure (an ACME problem or a connection error; no secrets).
    pub last_error: Option<String>,
    /// When the next order will be tried (Unix ms), after a failure.
    pub next_attempt: Option<i64>,
}

/// Shared [`CertState`]; `None` until the renewal task first reports, and
/// for ever when no certificate is managed.
#[derive(Debug, Default)]
pub struct CertStatus(Mutex<Option<CertState>>);

impl CertStatus {
    /// Replaces the state.
    pub fn set(&self, state: CertState) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    /// The state, if a managed certificate exists.
    pub fn get(&self) -> Option<CertState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
