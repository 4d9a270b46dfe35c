//! One module per command group.

pub mod agent;
pub mod cluster;
pub mod container;
pub mod events;
pub mod image;
pub mod network;
pub mod node;
pub mod output;
pub mod runtime;
pub mod secret;
pub mod service;
pub mod stack;
pub mod system;
pub mod volume;
