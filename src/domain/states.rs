//! The states an encryption and its versions can be in: vocabulary shared by
//! the store (which persists them) and the domain (which decides on them).

/// Who wraps an encryption's data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The root KEK (itself wrapped by the platform's master key).
    Platform,
    /// A key derived from the client's `X-Master-Key`, which Keyward never keeps.
    Client,
}

impl Mode {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Platform => "platform",
            Mode::Client => "client",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "platform" => Some(Mode::Platform),
            "client" => Some(Mode::Client),
            _ => None,
        }
    }
}

/// The lifecycle state of one key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// The one version encrypt uses by default (exactly one per encryption).
    Active,
    /// An older version: decrypts, and encrypts when named explicitly.
    Enabled,
    /// Decrypts only.
    DecryptOnly,
    /// Reversibly switched off: neither encrypts nor decrypts.
    Disabled,
    /// Key material erased for good; the row stays for the record.
    Destroyed,
}

impl VersionState {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Active => "active",
            VersionState::Enabled => "enabled",
            VersionState::DecryptOnly => "decrypt_only",
            VersionState::Disabled => "disabled",
            VersionState::Destroyed => "destroyed",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<VersionState> {
        match s {
            "active" => Some(VersionState::Active),
            "enabled" => Some(VersionState::Enabled),
            "decrypt_only" => Some(VersionState::DecryptOnly),
            "disabled" => Some(VersionState::Disabled),
            "destroyed" => Some(VersionState::Destroyed),
            _ => None,
        }
    }
}
