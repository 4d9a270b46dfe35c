//! shoal manager.
