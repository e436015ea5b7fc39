//! The versioned key object's vocabulary, kept under its old path:
//! [`Mode`] and [`VersionState`] live in [`super::states`], below the store
//! that records them.

pub use super::states::{Mode, VersionState};
