//! shoal's node-local container runtime.
