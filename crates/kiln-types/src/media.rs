//! Which family of media types an image's documents use.

/// Which family of media types documents use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaTypes {
    /// OCI image spec types.
    Oci,
    /// Docker schema 2 types (what `docker pull` has always read).
    Docker,
}
