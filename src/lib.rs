//! kubespan: a KubeSpan-compatible WireGuard mesh daemon and discovery service.
//!
//! The pure core (no sockets, no clocks: `now` is passed in) lives in [`core`] and
//! the policy modules; I/O adapters and the async shell sit around it.

pub mod core;
pub mod dataplane;
pub mod discovery;
pub mod proto;
pub mod util;
