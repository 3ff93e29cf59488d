//! The pure protocol core: no sockets, no netlink, no clock reads.

pub mod base62;
pub mod types;
pub mod ula;
