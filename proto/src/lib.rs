//! shoal's gRPC protocol: the generated prost messages and tonic services of `shoal/v1/*.proto`.

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("shoal.v1");
}
