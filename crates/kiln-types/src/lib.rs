//! Kiln's shared vocabulary: content digests, platforms and image references.
//!
//! Everything here is plain data with parsing and formatting; no IO, no async.

/// Implements serde for a type as its `Display` string, parsed back with `FromStr`.
macro_rules! serde_as_string {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

mod digest;
mod media;
mod platform;
mod reference;
mod time;

pub use digest::{Digest, DigestError, Sha256Writer};
pub use media::MediaTypes;
pub use platform::{Platform, PlatformError};
pub use reference::{ImageReference, ReferenceError};
pub use time::{elapsed_ms, now_ms, parse_go_duration, rfc3339_millis};
