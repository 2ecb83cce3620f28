//! Generated gRPC code only; `kiln-api` converts between these types and Kiln's own.
#![allow(missing_docs)]

pub mod codec;

/// The encoded size of a message (to check it against a stream's limit before sending).
pub fn encoded_len(message: &impl prost::Message) -> usize {
    message.encoded_len()
}

/// `kiln.v1`: the control, worker and blob services.
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}
