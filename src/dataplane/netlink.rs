//! A route-netlink connection and the link operations both WireGuard backends and
//! the routing adapter need.

use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard};

/// A route-netlink socket bound to the network namespace of the thread that opened
/// it. Cheap to clone; every clone talks through the same socket.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn connect() -> std::io::Result<Self> {
        let (connection, handle, _messages) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// The negative errno a netlink request failed with, if it was a kernel error.
pub(crate) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What we need to know about an existing link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    /// `rtnl_link_ops` kind: `wireguard`, `tun`, `veth`... `None` for physical NICs.
    pub kind: Option<String>,
    pub mtu: u32,
    pub up: bool,
}

impl LinkState {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut state = LinkState {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => state.name = name.clone(),
                LinkAttribute::Mtu(mtu) => state.mtu = *mtu,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            state.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        state
    }

    pub fn is_wireguard(&self) -> bool {
        self.kind.as_deref() == Some(&InfoKind::Wireguard.to_string())
    }
}

/// Looks a link up by name; `Ok(None)` when there is none.
pub async fn get_link(nl: &Netlink, name: &str) -> Result<Option<LinkState>, rtnetlink::Error> {
    let mut links = nl.handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(LinkState::from_message(&msg))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(nix::libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets the MTU and admin-up state if they differ; returns whether anything changed.
pub async fn ensure_mtu_up(
    nl: &Netlink,
    link: &LinkState,
    mtu: u32,
) -> Result<bool, rtnetlink::Error> {
    if link.mtu == mtu && link.up {
        return Ok(false);
    }
    let msg = LinkUnspec::new_with_index(link.index).mtu(mtu).up().build();
    nl.handle.link().set(msg).execute().await?;
    Ok(true)
}

/// Creates a kernel WireGuard link, up, with the given MTU.
pub async fn create_wireguard_link(
    nl: &Netlink,
    name: &str,
    mtu: u32,
) -> Result<(), rtnetlink::Error> {
    let msg = LinkWireguard::new(name).mtu(mtu).up().build();
    nl.handle.link().add(msg).execute().await
}

/// Deletes a link by index; a link that is already gone counts as deleted.
pub async fn delete_link(nl: &Netlink, index: u32) -> Result<(), rtnetlink::Error> {
    match nl.handle.link().del(index).execute().await {
        Err(e) if errno(&e) == Some(nix::libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// Polls until no link has this name. A userspace device's TUN disappears only
/// after boringtun's worker threads have exited and closed their queues.
pub async fn wait_link_gone(
    nl: &Netlink,
    name: &str,
    timeout: Duration,
) -> Result<bool, rtnetlink::Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if get_link(nl, name).await?.is_none() {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
