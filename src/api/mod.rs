//! The daemon's local API (`kubespan get`, `kubespan status`): the resources
//! and the status report (pure), the server on a Unix socket, and the CLI.

pub mod cli;
pub mod resources;
pub mod server;
pub mod status;

/// Where the daemon serves its API unless `node.apiSocket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kubespan/kubespan.sock";
