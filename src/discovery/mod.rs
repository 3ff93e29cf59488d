//! The discovery service: state, gRPC API, persistence, metrics.

pub mod cli;
