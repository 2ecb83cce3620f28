//! OCI distribution for Kiln: the only crate that talks to registries (over `oci-client`),
//! and the one that downloads `ADD <url>` sources (over reqwest, the same HTTP stack).
//!
//! Invariants:
//! - Manifests and configs keep the registry's exact bytes; their digests are checked against
//!   the digest that named them, and blobs go into the blob store only after their digest and
//!   size match the descriptor.
//! - Transient failures (5xx, 429, connection errors, timeouts) are retried with backoff;
//!   everything else fails at once with an error naming the reference and what was done.
//! - Picking a platform out of an index is exact (normalised os/arch/variant); there is no
//!   fallback to another platform.

mod assemble;
mod auth;
mod client;
mod error;
mod http;
mod image;
mod layout;
mod sink;

pub use assemble::{
    ArchiveError, ArchiveFormat, History, MediaTypes, NewImage, NewLayer, store_image, store_index, write_archive,
};
pub use auth::{Credentials, CredentialsError};
pub use client::{RegistryClient, RegistryOptions};
pub use error::{ErrorKind, RegistryError};
pub use http::Download;
pub use image::{
    ACCEPTED_MANIFESTS, ConfigFile, DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
    Descriptor, Index, Manifest, ManifestKind, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, PlatformField, ResolvedImage,
    RootFs, offered_platforms, select_platform,
};
pub use layout::{LayoutError, REF_NAME, read_layout, write_layout};
