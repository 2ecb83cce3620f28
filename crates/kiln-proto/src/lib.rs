//! The wire: gRPC code generated from `proto/kiln/v1`, its codec, and the one conversion
//! between these messages and Kiln's own types ([`convert`]), used by both ends.

pub mod codec;
pub mod convert;
mod status;
pub mod tls;

pub use status::{LEADER_HEADER, Redirect, kind_of, not_leader, redirect_of, status};

/// HTTP/2 flow-control windows of Kiln's connections: large enough that streaming a
/// context or a blob is not held back by a round trip every 64 KiB.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// The whole connection's window.
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// The largest message any Kiln stream encodes or decodes, set on every client and server.
/// Build requests carry context manifests (about 150 bytes a file) and worker assignments
/// carry a step's environment (at most 16 MiB after conversion), secrets and manifests; an
/// assignment over this size fails its own job instead of breaking the worker's session.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The encoded size of a message (to check it against a stream's limit before sending).
pub fn encoded_len(message: &impl prost::Message) -> usize {
    message.encoded_len()
}

/// `kiln.v1`: the control, worker and blob services.
// Generated: prost's oneofs hold messages inline (a vertex record is the largest).
#[allow(missing_docs, clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}
