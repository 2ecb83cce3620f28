//! Kiln's shared vocabulary: content digests, platforms and image references.
//!
//! Everything here is plain data with parsing and formatting; no IO, no async.

mod digest;
mod platform;
mod reference;

pub use digest::{Digest, DigestError, Sha256Writer};
pub use platform::{Platform, PlatformError};
pub use reference::{ImageReference, ReferenceError};
