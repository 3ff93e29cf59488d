//! `kubespan run`: the node daemon.

pub mod cli;
pub mod host;
pub mod linux;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod retain;
pub mod run;
pub mod store;
