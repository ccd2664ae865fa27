//! The `protodino.v1` gRPC contract: generated message types, clients and servers for
//! `JobService` (users) and `WorkerService` (workers), plus the encoded file-descriptor set that
//! the coordinator registers with server reflection so that `grpcurl list/describe` work with no
//! `.proto` files at hand.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("protodino.v1");
}

/// Encoded `FileDescriptorSet` of `protodino.v1` (for tonic-reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("protodino_descriptor");
