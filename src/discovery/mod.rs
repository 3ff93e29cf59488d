//! The discovery service: state, gRPC API, persistence, metrics.

pub mod cli;
pub mod metrics;
pub mod ratelimit;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod state;
pub mod version;
