//! `kubespan run`: the node daemon.

pub mod local;
pub mod plan;
