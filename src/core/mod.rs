//! The pure protocol core: no sockets, no netlink, no clock reads.

pub mod base62;
pub mod cipher;
pub mod payload;
pub mod types;
pub mod ula;
