//! Table 180, the fwmark rules and the KubeSpan address, over rtnetlink
//! (spec `kubespan.md` §4.2, §4.3). Every operation is idempotent: `ensure`
//! adopts what a crashed run left behind instead of duplicating it, and
//! `remove` deletes exactly what is ours.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::Ipv6Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMetric, RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

pub const TABLE: u32 = 180;
pub const RULE_PRIORITY: u32 = 32500;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("link {0} not found")]
    NoLink(String),
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let op = op.into();
    move |source| RoutingError::Netlink { op, source }
}

/// Our rule: `fwmark <mark>/<mask> lookup 180` at priority 32500.
#[derive(Debug, Clone, Copy)]
pub struct RuleSpec {
    pub fwmark: u32,
    pub mask: u32,
}

pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, RoutingError> {
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(nl("list links"))? {
        let is = msg
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name));
        if is {
            return Ok(Some(msg.header.index));
        }
    }
    Ok(None)
}

/// The KubeSpan address with its /64 on the link (no DAD: nothing else can
/// hold an address derived from our own MAC, and DAD would delay the mesh).
pub async fn ensure_address(
    handle: &Handle,
    index: u32,
    addr: Ipv6Net,
) -> Result<(), RoutingError> {
    let mut req = handle
        .address()
        .add(index, IpAddr::V6(addr.addr()), addr.prefix_len())
        .replace();
    req.message_mut().attributes.push(AddressAttribute::Flags(
        AddressFlags::Nodad | AddressFlags::Permanent,
    ));
    req.execute().await.map_err(nl("add the KubeSpan address"))
}

/// Table 180: IPv4 and IPv6 default routes through the link, metric 1, route
/// MTU = KubeSpan MTU. `replace` makes a repeat a no-op.
pub async fn ensure_routes(handle: &Handle, index: u32, mtu: u32) -> Result<(), RoutingError> {
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(index)
        .table_id(TABLE)
        .priority(1)
        .protocol(RouteProtocol::Static)
        .scope(RouteScope::Universe);
    let mut v4 = v4.build();
    v4.attributes
        .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    handle
        .route()
        .add(v4)
        .replace()
        .execute()
        .await
        .map_err(nl("add the IPv4 default route to table 180"))?;
    let mut v6 = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
        .output_interface(index)
        .table_id(TABLE)
        .priority(1)
        .protocol(RouteProtocol::Static)
        .scope(RouteScope::Universe)
        .build();
    v6.attributes
        .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    handle
        .route()
        .add(v6)
        .replace()
        .execute()
        .await
        .map_err(nl("add the IPv6 default route to table 180"))
}

fn is_ours(msg: &RuleMessage, spec: RuleSpec) -> bool {
    let mut prio = None;
    let mut mark = None;
    let mut fmask = None;
    let mut table = u32::from(msg.header.table);
    for a in &msg.attributes {
        match a {
            RuleAttribute::Priority(p) => prio = Some(*p),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => fmask = Some(*m),
            RuleAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    prio == Some(RULE_PRIORITY)
        && mark == Some(spec.fwmark)
        && fmask == Some(spec.mask)
        && table == TABLE
}

async fn our_rules(
    handle: &Handle,
    v: IpVersion,
    spec: RuleSpec,
) -> Result<Vec<RuleMessage>, RoutingError> {
    let mut out = Vec::new();
    let mut rules = handle.rule().get(v).execute();
    while let Some(msg) = rules.try_next().await.map_err(nl("list rules"))? {
        if is_ours(&msg, spec) {
            out.push(msg);
        }
    }
    Ok(out)
}

/// One rule per family; extra copies (from a crash mid-apply) are removed.
pub async fn ensure_rules(handle: &Handle, spec: RuleSpec) -> Result<(), RoutingError> {
    for v in [IpVersion::V4, IpVersion::V6] {
        let existing = our_rules(handle, v.clone(), spec).await?;
        for dup in existing.iter().skip(1) {
            handle
                .rule()
                .del(dup.clone())
                .execute()
                .await
                .map_err(nl("remove a duplicate fwmark rule"))?;
        }
        if existing.is_empty() {
            let req = handle
                .rule()
                .add()
                .priority(RULE_PRIORITY)
                .table_id(TABLE)
                .action(RuleAction::ToTable);
            let added = match v {
                IpVersion::V4 => {
                    let mut r = req.v4();
                    r.message_mut()
                        .attributes
                        .push(RuleAttribute::FwMark(spec.fwmark));
                    r.message_mut()
                        .attributes
                        .push(RuleAttribute::FwMask(spec.mask));
                    r.execute().await
                }
                IpVersion::V6 => {
                    let mut r = req.v6();
                    r.message_mut()
                        .attributes
                        .push(RuleAttribute::FwMark(spec.fwmark));
                    r.message_mut()
                        .attributes
                        .push(RuleAttribute::FwMask(spec.mask));
                    r.execute().await
                }
            };
            added.map_err(nl("add the fwmark rule"))?;
        }
    }
    Ok(())
}

pub async fn remove_rules(handle: &Handle, spec: RuleSpec) -> Result<(), RoutingError> {
    for v in [IpVersion::V4, IpVersion::V6] {
        for r in our_rules(handle, v, spec).await? {
            match handle.rule().del(r).execute().await {
                Err(e) if !already_gone(&e) => return Err(nl("remove the fwmark rule")(e)),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Removes every route of table 180 (all of them are ours: they point at our
/// link, which is removed too).
pub async fn remove_routes(handle: &Handle) -> Result<(), RoutingError> {
    for v in [IpVersion::V4, IpVersion::V6] {
        let filter = match v {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(TABLE)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(TABLE)
                .build(),
        };
        let mut routes = handle.route().get(filter).execute();
        let mut ours = Vec::new();
        while let Some(r) = routes.try_next().await.map_err(nl("list routes"))? {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table == TABLE {
                ours.push(r);
            }
        }
        for r in ours {
            match handle.route().del(r).execute().await {
                // The route may already be gone with its link.
                Err(e) if !already_gone(&e) => return Err(nl("remove a route of table 180")(e)),
                _ => {}
            }
        }
    }
    Ok(())
}

/// True for "no such device/entry": whatever we wanted deleted is gone already.
fn already_gone(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if [nix::libc::ENODEV, nix::libc::ENOENT, nix::libc::ESRCH].contains(&-m.raw_code()))
}

/// Deletes the link if it exists. A userspace device's link disappears on its
/// own while its threads wind down, so it may vanish between the lookup and
/// the delete: that is success, not an error.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<(), RoutingError> {
    if let Some(index) = link_index(handle, name).await? {
        match handle.link().del(index).execute().await {
            Err(e) if !already_gone(&e) => return Err(nl(format!("delete link {name}"))(e)),
            _ => {}
        }
    }
    Ok(())
}

/// Whether the kernel can create WireGuard links: creates and deletes a
/// throwaway one (this also loads the module where it is available).
pub async fn kernel_wireguard_available(handle: &Handle) -> bool {
    let name = format!("kswgprobe{}", std::process::id() % 100_000);
    let ok = handle
        .link()
        .add(rtnetlink::LinkWireguard::new(&name).build())
        .execute()
        .await
        .is_ok();
    if ok {
        let _ = delete_link(handle, &name).await;
    }
    ok
}
