//! The states things can be in: an encryption's mode, a key version's state,
//! a root KEK's state, a job's state. Vocabulary shared by the store (which
//! persists each as its name) and the domain (which decides on them).

/// Declares an enum whose variants are stored and shown by name, with
/// `as_str` and `parse` between them (one table, so the two cannot drift).
macro_rules! named_states {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stored and displayed name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// Parses a stored or requested name.
            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_states!(
    /// Who wraps an encryption's data keys.
    Mode {
        /// The root KEK (itself wrapped by the platform's master key).
        Platform = "platform",
        /// A key derived from the client's `X-Master-Key`, which Keyward never keeps.
        Client = "client",
    }
);

named_states!(
    /// The lifecycle state of one key version.
    VersionState {
        /// The one version encrypt uses by default (exactly one per encryption).
        Active = "active",
        /// An older version: decrypts, and encrypts when named explicitly.
        Enabled = "enabled",
        /// Decrypts only.
        DecryptOnly = "decrypt_only",
        /// Reversibly switched off: neither encrypts nor decrypts.
        Disabled = "disabled",
        /// Key material erased for good; the row stays for the record.
        Destroyed = "destroyed",
    }
);

named_states!(
    /// The state of a root KEK.
    KekState {
        /// Wraps every new key version (exactly one KEK is active).
        Active = "active",
        /// Replaced by a newer KEK; still unwraps the versions not yet
        /// re-wrapped, and is deleted once none names it.
        Retiring = "retiring",
    }
);

named_states!(
    /// The state of a re-encryption job.
    JobState {
        /// Waiting for a runner.
        Queued = "queued",
        /// Held by a runner's lease.
        Running = "running",
        /// Walked its table; `remainingByVersion` says what is left.
        Succeeded = "succeeded",
        /// Stopped on an error it names.
        Failed = "failed",
        /// Cancelled by its tenant; rows already moved stay moved.
        Cancelled = "cancelled",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_name_parses_back_to_itself() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.as_str()), Some(*m));
        }
        for v in VersionState::ALL {
            assert_eq!(VersionState::parse(v.as_str()), Some(*v));
        }
        for k in KekState::ALL {
            assert_eq!(KekState::parse(k.as_str()), Some(*k));
        }
        for j in JobState::ALL {
            assert_eq!(JobState::parse(j.as_str()), Some(*j));
        }
        assert_eq!(VersionState::parse("Active"), None);
    }
}
