//! kubespan: a KubeSpan-compatible WireGuard mesh daemon and discovery service.
//!
//! The pure core (no sockets, no clocks: `now` is passed in) lives in [`core`] and
//! [`kubespan`]; I/O adapters and the async shell sit around it.

pub mod api;
pub mod client;
pub mod config;
pub mod core;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod generate;
pub mod identity;
pub mod kubespan;
pub mod proto;
pub mod util;
