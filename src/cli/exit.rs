//! A failure with its own exit status.

/// A failure that ends the process with its own exit status (a documented
/// outcome, such as `audit verify`'s) rather than 1.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitWith {
    /// The exit status.
    pub code: u8,
    /// What to print on standard error.
    pub message: String,
}

impl ExitWith {
    pub(super) fn new(code: u8, message: String) -> ExitWith {
        ExitWith { code, message }
    }
}
