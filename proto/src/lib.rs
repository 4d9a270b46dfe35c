//! shoal gRPC protocol (generated).
