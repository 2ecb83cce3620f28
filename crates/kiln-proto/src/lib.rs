//! Generated gRPC code only; `kiln-api` converts between these types and Kiln's own.
#![allow(missing_docs)]

pub mod codec;

/// `kiln.v1`: the control, worker and blob services.
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}
