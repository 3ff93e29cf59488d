//! The KubeSpan address, routing table 180 and the fwmark rules (spec §4.2, §4.3),
//! over rtnetlink.
//!
//! Every `ensure` reads what the kernel has first and only changes the difference,
//! so running it again, or after a crash left things behind, adds nothing twice.
//! `remove` deletes exactly what `ensure` would have created and nothing else:
//! rules are recognised by priority + fwmark/mask + table (and no other selector),
//! routes by table + default destination + our link.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{IpVersion, RouteMessageBuilder};

use super::netlink::{self, Netlink};
use super::{FORCE_FWMARK, FWMARK_MASK, ROUTE_METRIC, ROUTING_TABLE, RULE_PRIORITY};

/// The KubeSpan ULA is assigned with the subnet's prefix length, so the kernel adds
/// the on-link `/64` route through the link (spec §4.2).
pub const ADDRESS_PREFIX_LEN: u8 = 64;

/// What the routing adapter programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingSpec {
    pub link_name: String,
    /// This node's KubeSpan ULA.
    pub address: Ipv6Addr,
    /// Route MTU of the table-180 default routes (= link MTU).
    pub mtu: u32,
}

/// What an `ensure` or `remove` changed; all zero when nothing was needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingSummary {
    pub addresses_added: usize,
    pub addresses_removed: usize,
    pub routes_added: usize,
    pub routes_removed: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
}

impl RoutingSummary {
    pub fn is_noop(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("link {name} does not exist: the WireGuard link must be created before its routing")]
    NoLink { name: String },
    #[error("netlink {op} failed: {source}{hint}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
        hint: &'static str,
    },
}

fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let op = op.into();
    move |source| {
        let hint = match netlink::errno(&source) {
            Some(nix::libc::EPERM) => " (are we root, with CAP_NET_ADMIN?)",
            Some(nix::libc::EACCES) => {
                " (is IPv6 disabled on this link? see sysctl net.ipv6.conf.<link>.disable_ipv6)"
            }
            _ => "",
        };
        RoutingError::Netlink { op, source, hint }
    }
}

/// The routing adapter the data plane talks to.
pub trait RoutingBackend: Send + Sync {
    fn ensure(
        &self,
        spec: &RoutingSpec,
    ) -> impl Future<Output = Result<RoutingSummary, RoutingError>> + Send;

    /// Removes one address from the link (a KubeSpan ULA that changed); no-op
    /// when the link or the address is gone.
    fn remove_address(
        &self,
        link_name: &str,
        address: Ipv6Addr,
    ) -> impl Future<Output = Result<RoutingSummary, RoutingError>> + Send;

    /// Removes our rules, our table-180 routes on `link_name`, and `address` from it
    /// (when given and the link still exists).
    fn remove(
        &self,
        link_name: &str,
        address: Option<Ipv6Addr>,
    ) -> impl Future<Output = Result<RoutingSummary, RoutingError>> + Send;
}

/// The real thing.
#[derive(Clone, Debug)]
pub struct NetlinkRouting {
    nl: Netlink,
}

impl NetlinkRouting {
    pub fn new(nl: Netlink) -> Self {
        Self { nl }
    }
}

impl RoutingBackend for NetlinkRouting {
    async fn ensure(&self, spec: &RoutingSpec) -> Result<RoutingSummary, RoutingError> {
        let link = netlink::get_link(&self.nl, &spec.link_name)
            .await
            .map_err(nl_err("link lookup"))?
            .ok_or_else(|| RoutingError::NoLink {
                name: spec.link_name.clone(),
            })?;
        let mut summary = RoutingSummary::default();
        ensure_address(&self.nl, link.index, spec.address, &mut summary).await?;
        for family in [Family::V4, Family::V6] {
            ensure_default_route(&self.nl, family, link.index, spec.mtu, &mut summary).await?;
        }
        // Rules last: marked traffic is steered into table 180 only once it has routes.
        for family in [Family::V4, Family::V6] {
            ensure_rule(&self.nl, family, &mut summary).await?;
        }
        if summary.is_noop() {
            tracing::debug!(link = %spec.link_name, "routing already up to date");
        } else {
            tracing::info!(link = %spec.link_name, ?summary, "routing updated");
        }
        Ok(summary)
    }

    async fn remove_address(
        &self,
        link_name: &str,
        address: Ipv6Addr,
    ) -> Result<RoutingSummary, RoutingError> {
        let mut summary = RoutingSummary::default();
        if let Some(link) = netlink::get_link(&self.nl, link_name)
            .await
            .map_err(nl_err("link lookup"))?
        {
            remove_address(&self.nl, link.index, address, &mut summary).await?;
        }
        Ok(summary)
    }

    async fn remove(
        &self,
        link_name: &str,
        address: Option<Ipv6Addr>,
    ) -> Result<RoutingSummary, RoutingError> {
        let mut summary = RoutingSummary::default();
        for family in [Family::V4, Family::V6] {
            remove_rules(&self.nl, family, &mut summary).await?;
        }
        // Routes and addresses die with the link; only a live link needs cleaning.
        if let Some(link) = netlink::get_link(&self.nl, link_name)
            .await
            .map_err(nl_err("link lookup"))?
        {
            for family in [Family::V4, Family::V6] {
                remove_default_routes(&self.nl, family, link.index, &mut summary).await?;
            }
            if let Some(address) = address {
                remove_address(&self.nl, link.index, address, &mut summary).await?;
            }
        }
        tracing::info!(link = link_name, ?summary, "routing removed");
        Ok(summary)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    fn ip_version(self) -> IpVersion {
        match self {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        }
    }
}

// ---------------------------------------------------------------------------
// Address
// ---------------------------------------------------------------------------

/// An address as the kernel reports it, reduced to what we compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressInfo {
    pub address: IpAddr,
    pub prefix_len: u8,
}

fn address_info(msg: &AddressMessage) -> Option<AddressInfo> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(AddressInfo {
            address: *ip,
            prefix_len: msg.header.prefix_len,
        }),
        _ => None,
    })
}

async fn link_addresses(
    nl: &Netlink,
    index: u32,
) -> Result<Vec<(AddressMessage, AddressInfo)>, RoutingError> {
    let mut out = Vec::new();
    let mut stream = nl
        .handle()
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = stream.try_next().await.map_err(nl_err("address dump"))? {
        if msg.header.index != index {
            continue;
        }
        if let Some(info) = address_info(&msg) {
            out.push((msg, info));
        }
    }
    Ok(out)
}

async fn ensure_address(
    nl: &Netlink,
    index: u32,
    address: Ipv6Addr,
    summary: &mut RoutingSummary,
) -> Result<(), RoutingError> {
    let existing = link_addresses(nl, index).await?;
    let mut present = false;
    for (msg, info) in existing {
        if info.address != IpAddr::V6(address) {
            continue;
        }
        if info.prefix_len == ADDRESS_PREFIX_LEN {
            present = true;
        } else {
            // Same address, wrong prefix (e.g. a /128 from another tool): the /64
            // on-link route would be missing, so replace it.
            nl.handle()
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(nl_err(format!(
                    "delete address {address}/{}",
                    info.prefix_len
                )))?;
            summary.addresses_removed += 1;
        }
    }
    if !present {
        nl.handle()
            .address()
            .add(index, IpAddr::V6(address), ADDRESS_PREFIX_LEN)
            .execute()
            .await
            .map_err(nl_err(format!(
                "add address {address}/{ADDRESS_PREFIX_LEN}"
            )))?;
        summary.addresses_added += 1;
    }
    Ok(())
}

async fn remove_address(
    nl: &Netlink,
    index: u32,
    address: Ipv6Addr,
    summary: &mut RoutingSummary,
) -> Result<(), RoutingError> {
    for (msg, info) in link_addresses(nl, index).await? {
        if info.address == IpAddr::V6(address) {
            match nl.handle().address().del(msg).execute().await {
                Err(e) if netlink::errno(&e) == Some(nix::libc::EADDRNOTAVAIL) => {}
                other => other.map_err(nl_err(format!("delete address {address}")))?,
            }
            summary.addresses_removed += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Table 180 default routes
// ---------------------------------------------------------------------------

/// A route as the kernel reports it, reduced to what we compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub table: u32,
    pub destination_prefix_len: u8,
    pub has_destination: bool,
    pub oif: Option<u32>,
    pub has_gateway: bool,
    pub metric: u32,
    pub mtu: Option<u32>,
    pub protocol: RouteProtocol,
    pub scope: RouteScope,
    pub kind: RouteType,
}

pub fn route_info(msg: &RouteMessage) -> RouteInfo {
    let mut info = RouteInfo {
        table: u32::from(msg.header.table),
        destination_prefix_len: msg.header.destination_prefix_length,
        has_destination: false,
        oif: None,
        has_gateway: false,
        metric: 0,
        mtu: None,
        protocol: msg.header.protocol,
        scope: msg.header.scope,
        kind: msg.header.kind,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => info.table = *t,
            RouteAttribute::Destination(_) => info.has_destination = true,
            RouteAttribute::Oif(i) => info.oif = Some(*i),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_) => {
                info.has_gateway = true
            }
            RouteAttribute::Priority(p) => info.metric = *p,
            RouteAttribute::Metrics(metrics) => {
                for m in metrics {
                    if let RouteMetric::Mtu(mtu) = m {
                        info.mtu = Some(*mtu);
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// One of ours: a default route in table 180 through our link.
pub fn is_our_route(route: &RouteInfo, link_index: u32) -> bool {
    route.table == ROUTING_TABLE
        && route.destination_prefix_len == 0
        && route.oif == Some(link_index)
        && !route.has_gateway
}

/// Exactly the route `ensure` wants.
pub fn is_desired_route(route: &RouteInfo, link_index: u32, mtu: u32) -> bool {
    is_our_route(route, link_index)
        && route.metric == ROUTE_METRIC
        && route.mtu == Some(mtu)
        && route.protocol == RouteProtocol::Static
        && route.scope == RouteScope::Universe
        && route.kind == RouteType::Unicast
}

fn desired_route(family: Family, link_index: u32, mtu: u32) -> RouteMessage {
    let message = match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(ROUTING_TABLE)
            .output_interface(link_index)
            .priority(ROUTE_METRIC)
            .protocol(RouteProtocol::Static)
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(ROUTING_TABLE)
            .output_interface(link_index)
            .priority(ROUTE_METRIC)
            .protocol(RouteProtocol::Static)
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast)
            .build(),
    };
    let mut message = message;
    message
        .attributes
        .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    message
}

async fn table_routes(
    nl: &Netlink,
    family: Family,
) -> Result<Vec<(RouteMessage, RouteInfo)>, RoutingError> {
    let mut query = RouteMessage::default();
    query.header.address_family = family.address_family();
    let mut stream = nl.handle().route().get(query).execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(nl_err("route dump"))? {
        let info = route_info(&msg);
        if info.table == ROUTING_TABLE {
            out.push((msg, info));
        }
    }
    Ok(out)
}

async fn ensure_default_route(
    nl: &Netlink,
    family: Family,
    link_index: u32,
    mtu: u32,
    summary: &mut RoutingSummary,
) -> Result<(), RoutingError> {
    let routes = table_routes(nl, family).await?;
    if !routes
        .iter()
        .any(|(_, r)| is_desired_route(r, link_index, mtu))
    {
        // Replace, not add: a route with the same key but an old MTU is updated in
        // place, so marked traffic never finds table 180 empty.
        nl.handle()
            .route()
            .add(desired_route(family, link_index, mtu))
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!(
                "add {family:?} default route to table {ROUTING_TABLE}"
            )))?;
        summary.routes_added += 1;
    }
    // Then drop our leftovers with other metrics (an older configuration, a crash).
    for (msg, route) in table_routes(nl, family).await? {
        if is_our_route(&route, link_index) && !is_desired_route(&route, link_index, mtu) {
            delete_route(nl, msg, family).await?;
            summary.routes_removed += 1;
        }
    }
    Ok(())
}

async fn delete_route(nl: &Netlink, msg: RouteMessage, family: Family) -> Result<(), RoutingError> {
    match nl.handle().route().del(msg).execute().await {
        Err(e) if netlink::errno(&e) == Some(nix::libc::ESRCH) => Ok(()),
        other => other.map_err(nl_err(format!(
            "delete {family:?} route from table {ROUTING_TABLE}"
        ))),
    }
}

async fn remove_default_routes(
    nl: &Netlink,
    family: Family,
    link_index: u32,
    summary: &mut RoutingSummary,
) -> Result<(), RoutingError> {
    for (msg, route) in table_routes(nl, family).await? {
        if is_our_route(&route, link_index) {
            delete_route(nl, msg, family).await?;
            summary.routes_removed += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

/// A rule as the kernel reports it, reduced to what we compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub priority: u32,
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
    pub table: u32,
    pub action: RuleAction,
    /// Any selector or modifier besides the mark (from/to, iif/oif, tos, invert,
    /// suppress_prefixlength, ...).
    pub other_selectors: bool,
}

pub fn rule_info(msg: &RuleMessage) -> RuleInfo {
    let mut info = RuleInfo {
        priority: 0,
        fwmark: None,
        fwmask: None,
        table: u32::from(msg.header.table),
        action: msg.header.action,
        other_selectors: msg.header.src_len != 0
            || msg.header.dst_len != 0
            || msg.header.tos != 0
            || msg.header.flags.contains(RuleFlags::Invert),
    };
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => info.priority = *p,
            RuleAttribute::FwMark(m) => info.fwmark = Some(*m),
            RuleAttribute::FwMask(m) => info.fwmask = Some(*m),
            RuleAttribute::Table(t) => info.table = *t,
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_) => info.other_selectors = true,
            // The kernel reports these on every rule; -1 / 0 / false mean "not set".
            RuleAttribute::SuppressPrefixLen(v) | RuleAttribute::SuppressIfGroup(v)
                if *v != u32::MAX =>
            {
                info.other_selectors = true
            }
            RuleAttribute::TunId(v) if *v != 0 => info.other_selectors = true,
            RuleAttribute::L3MDev(true) => info.other_selectors = true,
            _ => {}
        }
    }
    info
}

/// `32500: from all fwmark 0x40/0x60 lookup 180`, and nothing else. The protocol
/// is not part of the identity, so a rule left by anyone (`ip rule add`, an older
/// version) is adopted.
pub fn is_our_rule(rule: &RuleInfo) -> bool {
    rule.priority == RULE_PRIORITY
        && rule.fwmark == Some(FORCE_FWMARK)
        && rule.fwmask == Some(FWMARK_MASK)
        && rule.table == ROUTING_TABLE
        && rule.action == RuleAction::ToTable
        && !rule.other_selectors
}

async fn our_rules(nl: &Netlink, family: Family) -> Result<Vec<RuleMessage>, RoutingError> {
    let mut stream = nl.handle().rule().get(family.ip_version()).execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(nl_err("rule dump"))? {
        if msg.header.family == family.address_family() && is_our_rule(&rule_info(&msg)) {
            out.push(msg);
        }
    }
    Ok(out)
}

async fn delete_rule(nl: &Netlink, msg: RuleMessage, family: Family) -> Result<(), RoutingError> {
    match nl.handle().rule().del(msg).execute().await {
        Err(e) if netlink::errno(&e) == Some(nix::libc::ENOENT) => Ok(()),
        other => other.map_err(nl_err(format!("delete {family:?} rule {RULE_PRIORITY}"))),
    }
}

async fn ensure_rule(
    nl: &Netlink,
    family: Family,
    summary: &mut RoutingSummary,
) -> Result<(), RoutingError> {
    let mut existing = our_rules(nl, family).await?.into_iter();
    if existing.next().is_none() {
        add_rule(nl, family).await?;
        summary.rules_added += 1;
    }
    // Without NLM_F_EXCL the kernel accepts identical rules (ours, or a crashed
    // run's, or a racing one's); keep one.
    for duplicate in existing {
        delete_rule(nl, duplicate, family).await?;
        summary.rules_removed += 1;
    }
    Ok(())
}

async fn remove_rules(
    nl: &Netlink,
    family: Family,
    summary: &mut RoutingSummary,
) -> Result<(), RoutingError> {
    for rule in our_rules(nl, family).await? {
        delete_rule(nl, rule, family).await?;
        summary.rules_removed += 1;
    }
    Ok(())
}

fn our_rule_message(family: Family) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = family.address_family();
    msg.header.table = ROUTING_TABLE as u8;
    msg.header.action = RuleAction::ToTable;
    msg.attributes = vec![
        RuleAttribute::Priority(RULE_PRIORITY),
        RuleAttribute::FwMark(FORCE_FWMARK),
        RuleAttribute::FwMask(FWMARK_MASK),
        RuleAttribute::Table(ROUTING_TABLE),
        // A tag the kernel can match on delete: its rule lookup ignores selectors
        // the request lacks, so without it deleting ours could remove a foreign
        // `from X fwmark 0x40/0x60 lookup 180` that sits before it at our priority.
        RuleAttribute::Protocol(RouteProtocol::Static),
    ];
    msg
}

/// Adds our rule with `NLM_F_CREATE` but without `NLM_F_EXCL`. We have already
/// established that none of ours exists; the kernel's own duplicate check
/// (`rule_exists`) ignores selectors the request does not carry, so a foreign
/// `from 2001:db8::/32 fwmark 0x40/0x60 lookup 180` at our priority would make an
/// exclusive add fail with EEXIST although our rule is missing.
async fn add_rule(nl: &Netlink, family: Family) -> Result<(), RoutingError> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewRule(our_rule_message(family)));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
    let op = || format!("add {family:?} rule {RULE_PRIORITY}");
    let mut handle = nl.handle().clone();
    let mut response = handle.request(req).map_err(nl_err(op()))?;
    while let Some(msg) = response.next().await {
        if let NetlinkPayload::Error(e) = msg.payload
            && e.code.is_some()
        {
            return Err(nl_err(op())(rtnetlink::Error::NetlinkError(e)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn our_rule() -> RuleInfo {
        RuleInfo {
            priority: RULE_PRIORITY,
            fwmark: Some(FORCE_FWMARK),
            fwmask: Some(FWMARK_MASK),
            table: ROUTING_TABLE,
            action: RuleAction::ToTable,
            other_selectors: false,
        }
    }

    #[test]
    fn rule_identity_needs_priority_mark_mask_table_and_nothing_else() {
        assert!(is_our_rule(&our_rule()));
        let variants = [
            RuleInfo {
                priority: 32501,
                ..our_rule()
            },
            RuleInfo {
                fwmark: Some(0x80),
                ..our_rule()
            },
            RuleInfo {
                fwmark: None,
                ..our_rule()
            },
            RuleInfo {
                fwmask: Some(0xff),
                ..our_rule()
            },
            RuleInfo {
                fwmask: None,
                ..our_rule()
            },
            RuleInfo {
                table: 181,
                ..our_rule()
            },
            RuleInfo {
                action: RuleAction::Blackhole,
                ..our_rule()
            },
            RuleInfo {
                other_selectors: true,
                ..our_rule()
            },
        ];
        for rule in variants {
            assert!(!is_our_rule(&rule), "{rule:?} must not be ours");
        }
    }

    #[test]
    fn parses_rule_messages_including_table_attribute() {
        let mut msg = RuleMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.table = 180;
        msg.header.action = RuleAction::ToTable;
        msg.attributes = vec![
            RuleAttribute::Priority(RULE_PRIORITY),
            RuleAttribute::FwMark(0x40),
            RuleAttribute::FwMask(0x60),
            RuleAttribute::Table(180),
        ];
        assert!(is_our_rule(&rule_info(&msg)));
        // What Linux 6.x actually dumps for `ip rule add priority 32500 fwmark
        // 0x40/0x60 lookup 180`: unset suppressors come back as -1.
        msg.attributes = vec![
            RuleAttribute::Table(180),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Protocol(RouteProtocol::Unspec),
            RuleAttribute::Priority(32500),
            RuleAttribute::FwMark(64),
            RuleAttribute::FwMask(96),
        ];
        assert!(is_our_rule(&rule_info(&msg)));
        msg.attributes.push(RuleAttribute::SuppressPrefixLen(0));
        assert!(
            !is_our_rule(&rule_info(&msg)),
            "suppress_prefixlength 0 is foreign"
        );
        msg.attributes.pop();
        msg.attributes.push(RuleAttribute::Iifname("eth0".into()));
        assert!(
            !is_our_rule(&rule_info(&msg)),
            "an iif selector makes it foreign"
        );
        msg.attributes.pop();
        msg.header.flags = RuleFlags::Invert;
        assert!(!is_our_rule(&rule_info(&msg)), "`not fwmark` is foreign");
    }

    #[test]
    fn the_rule_we_add_is_recognised_as_ours() {
        for family in [Family::V4, Family::V6] {
            assert!(is_our_rule(&rule_info(&our_rule_message(family))));
        }
    }

    fn our_route() -> RouteInfo {
        RouteInfo {
            table: ROUTING_TABLE,
            destination_prefix_len: 0,
            has_destination: false,
            oif: Some(7),
            has_gateway: false,
            metric: 1,
            mtu: Some(1420),
            protocol: RouteProtocol::Static,
            scope: RouteScope::Universe,
            kind: RouteType::Unicast,
        }
    }

    #[test]
    fn route_ownership_and_desired_shape() {
        assert!(is_desired_route(&our_route(), 7, 1420));
        assert!(!is_desired_route(&our_route(), 7, 1380), "MTU differs");
        let stale_metric = RouteInfo {
            metric: 5,
            ..our_route()
        };
        assert!(is_our_route(&stale_metric, 7) && !is_desired_route(&stale_metric, 7, 1420));
        for foreign in [
            RouteInfo {
                table: 254,
                ..our_route()
            },
            RouteInfo {
                oif: Some(8),
                ..our_route()
            },
            RouteInfo {
                destination_prefix_len: 24,
                ..our_route()
            },
            RouteInfo {
                has_gateway: true,
                ..our_route()
            },
        ] {
            assert!(!is_our_route(&foreign, 7), "{foreign:?} must not be ours");
        }
    }

    #[test]
    fn desired_route_message_round_trips_through_route_info() {
        for family in [Family::V4, Family::V6] {
            let msg = desired_route(family, 7, 1420);
            let info = route_info(&msg);
            assert!(is_desired_route(&info, 7, 1420), "{family:?}: {info:?}");
        }
    }
}
