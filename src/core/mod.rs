//! The pure protocol core: no sockets, no netlink, no clock reads.

pub mod types;
