//! Host facts from rtnetlink: links (name, MAC, kind, up) and addresses, plus a
//! stream of change events so address changes are picked up when they happen.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkLayerType,
};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::mpsc;

use super::local::HostAddress;
use crate::identity::LinkInfo;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink request failed: {0}")]
    Netlink(#[from] rtnetlink::Error),
}

/// A link with its index and state.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub up: bool,
    pub info: LinkInfo,
}

pub struct Host {
    handle: Handle,
}

impl Host {
    /// Connects to rtnetlink. The returned receiver yields one item per
    /// link/address change notification (coalesce them before acting).
    pub fn connect() -> Result<(Host, mpsc::Receiver<()>), HostError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let (mconn, _mhandle, mut messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])?;
        tokio::spawn(mconn);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while futures_util::StreamExt::next(&mut messages).await.is_some() {
                // A full channel already holds a pending "something changed".
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(()) {
                    break;
                }
            }
        });
        Ok((Host { handle }, rx))
    }

    pub async fn links(&self) -> Result<Vec<Link>, HostError> {
        let mut out = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(msg) = stream.try_next().await? {
            let mut info = LinkInfo {
                name: String::new(),
                mac: Vec::new(),
                ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
                kind: None,
            };
            for attr in &msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => info.name = n.clone(),
                    LinkAttribute::Address(a) => info.mac = a.clone(),
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let NlLinkInfo::Kind(k) = i {
                                info.kind = Some(k.to_string());
                            }
                        }
                    }
                    _ => {}
                }
            }
            let flags = msg.header.flags;
            out.push(Link {
                index: msg.header.index,
                up: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::Running),
                info,
            });
        }
        Ok(out)
    }

    /// Every address on the host, with whether its link is up.
    pub async fn addresses(&self, links: &[Link]) -> Result<Vec<HostAddress>, HostError> {
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream.try_next().await? {
            let up = links
                .iter()
                .find(|l| l.index == msg.header.index)
                .is_some_and(|l| l.up);
            // IFA_LOCAL is the address itself on point-to-point links; IFA_ADDRESS
            // elsewhere.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(addr) {
                out.push(HostAddress {
                    ip: ip.to_canonical(),
                    link_up: up,
                });
            }
        }
        Ok(out)
    }
}
