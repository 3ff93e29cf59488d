//! The client task: connect, Hello (following redirects), Watch, publish,
//! refresh; on any failure, back off and start over.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::backoff::{Backoff, os_random_unit};
use super::local::Plan;
use super::view::WatchView;

use super::{ClientError, ClientSnapshot, Config, MAX_REDIRECTS, ServiceEndpoint, Shared};
use crate::proto::server::cluster_client::ClusterClient;
use crate::proto::server::{
    AffiliateDeleteRequest, AffiliateUpdateRequest, HelloRequest, WatchRequest, WatchResponse,
};

/// At most one republish per this interval when our record keeps being
/// overwritten, so a hostile writer cannot make us flood the service.
const REPAIR_INTERVAL: Duration = Duration::from_secs(1);

/// Go gRPC's default keepalive timeout: no ping ack within this closes the
/// connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The transport for one endpoint: TLS with the system roots (plus the extra
/// CA) or h2c, and the Go client's keepalive.
pub(super) fn tonic_endpoint(
    cfg: &Config,
    target: &ServiceEndpoint,
) -> Result<Endpoint, ClientError> {
    let tls_err = |reason: String| ClientError::Tls {
        endpoint: target.to_string(),
        reason,
    };
    let mut ep = Endpoint::from_shared(target.uri())
        .map_err(|e| tls_err(format!("invalid URI {}: {e}", target.uri())))?
        .connect_timeout(cfg.hello_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(cfg.keepalive_interval())
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        // gRPC servers refuse pings on idle connections; we always have a Watch open.
        .keep_alive_while_idle(false);
    if target.tls {
        let base = || {
            let tls = ClientTlsConfig::new().domain_name(target.host.clone());
            match &cfg.extra_ca_pem {
                Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                None => tls,
            }
        };
        ep = match ep.clone().tls_config(base().with_native_roots()) {
            Ok(ep) => ep,
            // A minimal host may have no system roots; the extra CA alone is enough.
            Err(native) if cfg.extra_ca_pem.is_some() => {
                tracing::debug!(error = %error_chain(&native), "system CA roots unavailable; using the extra CA only");
                ep.tls_config(base())
                    .map_err(|e| tls_err(error_chain(&e)))?
            }
            Err(e) => {
                return Err(tls_err(format!(
                    "{} (install the system CA certificates, or configure an extra CA)",
                    error_chain(&e)
                )));
            }
        };
    }
    Ok(ep)
}

/// tonic's transport errors say little at the top level ("transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Go's `netip.Addr` binary form: 4 bytes, 16 bytes, or 16 bytes + zone text.
fn parse_client_ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b)
            .ok()
            .map(|a| Ipv4Addr::from(a).into()),
        n if n >= 16 => <[u8; 16]>::try_from(&b[..16])
            .ok()
            .map(|a| Ipv6Addr::from(a).into()),
        _ => None,
    }
}

fn ttl(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A request carrying the remaining time as `grpc-timeout`, as Go does: the
/// server's rate limiter fails fast instead of holding a call past its deadline.
fn with_deadline<T>(msg: T, deadline: Instant) -> Request<T> {
    let mut req = Request::new(msg);
    let left = deadline.saturating_duration_since(Instant::now());
    req.set_timeout(left.max(Duration::from_millis(1)));
    req
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    // A dropped handle counts as a stop request.
    let _ = stop.wait_for(|s| *s).await;
}

pub(super) struct Runner {
    cfg: Config,
    /// The endpoint in use; redirects replace it for the lifetime of the client.
    endpoint: ServiceEndpoint,
    shared: Arc<Shared>,
    status: watch::Sender<ClientSnapshot>,
    view: WatchView,
    backoff: Backoff,
}

impl Runner {
    pub(super) fn new(
        cfg: Config,
        shared: Arc<Shared>,
        status: watch::Sender<ClientSnapshot>,
    ) -> Self {
        Runner {
            endpoint: cfg.endpoint.clone(),
            view: WatchView::new(cfg.affiliate_id.clone()),
            backoff: Backoff::new(cfg.backoff),
            cfg,
            shared,
            status,
        }
    }

    pub(super) async fn run(mut self, stop: watch::Receiver<bool>) {
        let mut first = true;
        loop {
            if !first {
                let delay = self.backoff.next(os_random_unit());
                tracing::debug!(
                    delay_ms = delay.as_millis() as u64,
                    "waiting before reconnecting"
                );
                tokio::select! {
                    _ = sleep(delay) => {}
                    _ = stopped(stop.clone()) => break,
                }
                self.status.send_modify(|s| s.counters.reconnects += 1);
            }
            first = false;
            let result = tokio::select! {
                r = self.session() => r,
                _ = stopped(stop.clone()) => break,
            };
            if let Err(e) = result {
                tracing::warn!(endpoint = %self.endpoint, error = %e, "discovery service session failed; reconnecting");
                let text = e.to_string();
                self.status.send_modify(|s| {
                    s.connection.connected = false;
                    s.connection.connected_since = None;
                    s.connection.last_error = Some(text);
                });
            }
        }
        self.status.send_modify(|s| {
            s.connection.connected = false;
            s.connection.connected_since = None;
        });
        tracing::debug!("discovery client stopped");
    }

    /// One connection: returns only on failure (a stop cancels it from outside).
    async fn session(&mut self) -> Result<(), ClientError> {
        let mut client = self.hello().await?;
        let deadline = Instant::now() + self.cfg.hello_timeout;
        // No grpc-timeout on Watch: the stream lives as long as the session.
        let watch_req = Request::new(WatchRequest {
            cluster_id: self.cfg.cluster_id.clone(),
        });
        let mut stream = match timeout_at(deadline, client.watch(watch_req)).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => {
                return Err(ClientError::WatchOpen {
                    endpoint: self.endpoint.to_string(),
                    status: Box::new(status),
                });
            }
            Err(_) => {
                return Err(ClientError::WatchOpen {
                    endpoint: self.endpoint.to_string(),
                    status: Box::new(tonic::Status::deadline_exceeded(
                        "no Watch response headers in time",
                    )),
                });
            }
        };
        // Every new session re-publishes: a restarted server without
        // persistence gets our data back.
        let mut published = self.publish(&mut client).await?;
        self.backoff.reset();
        let now = SystemTime::now();
        self.status.send_modify(|s| {
            s.connection.connected = true;
            s.connection.connected_since = Some(now);
        });
        tracing::info!(endpoint = %self.endpoint, "connected to the discovery service");

        let interval = self.cfg.refresh_interval();
        let mut next_refresh = Instant::now() + interval;
        let mut snapshot = true;
        // Set when the service shows our record overwritten: when to publish again.
        let mut repair_at: Option<Instant> = None;
        let mut last_repair: Option<Instant> = None;
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(msg)) => {
                        // The snapshot predates the publish that opened this
                        // session, so only updates can show an overwrite.
                        if !snapshot && repair_at.is_none() && self.own_record_overwritten(&msg) {
                            tracing::warn!(
                                affiliate_id = %self.cfg.affiliate_id,
                                "another client overwrote or deleted this node's record on the discovery service; publishing it again"
                            );
                            let now = Instant::now();
                            repair_at = Some(last_repair.map_or(now, |t| (t + REPAIR_INTERVAL).max(now)));
                        }
                        self.apply(&msg, snapshot);
                        snapshot = false;
                    }
                    Ok(None) => return Err(ClientError::WatchEnded),
                    Err(status) => return Err(ClientError::Watch(Box::new(status))),
                },
                _ = sleep_until(next_refresh) => {
                    published = self.publish(&mut client).await?;
                    next_refresh = Instant::now() + interval;
                }
                _ = sleep_until(repair_at.unwrap_or(next_refresh)), if repair_at.is_some() => {
                    repair_at = None;
                    last_repair = Some(Instant::now());
                    published = self.publish(&mut client).await?;
                    next_refresh = Instant::now() + interval;
                    self.status.send_modify(|s| s.counters.overwrites_repaired += 1);
                }
                _ = self.shared.wake.notified() => {
                    if self.shared.local().generation() != published {
                        published = self.publish(&mut client).await?;
                        next_refresh = Instant::now() + interval;
                    }
                }
            }
        }
    }

    /// Connects and says Hello, following redirects. Hello carries the 10 s
    /// deadline for connection setup and the call together.
    async fn hello(&mut self) -> Result<ClusterClient<Channel>, ClientError> {
        let mut hops = 0;
        loop {
            let endpoint = self.endpoint.clone();
            self.status
                .send_if_modified(|s| replace(&mut s.connection.endpoint, endpoint.clone()));
            let deadline = Instant::now() + self.cfg.hello_timeout;
            let attempt = async {
                let channel = tonic_endpoint(&self.cfg, &endpoint)?
                    .connect()
                    .await
                    .map_err(|e| ClientError::Connect {
                        endpoint: endpoint.to_string(),
                        reason: error_chain(&e),
                    })?;
                let mut client = ClusterClient::new(channel);
                let req = with_deadline(
                    HelloRequest {
                        cluster_id: self.cfg.cluster_id.clone(),
                        client_version: self.cfg.client_version.clone(),
                    },
                    deadline,
                );
                let resp = client
                    .hello(req)
                    .await
                    .map_err(|status| ClientError::Hello {
                        endpoint: endpoint.to_string(),
                        status: Box::new(status),
                    })?
                    .into_inner();
                Ok::<_, ClientError>((client, resp))
            };
            let (client, resp) =
                timeout_at(deadline, attempt)
                    .await
                    .map_err(|_| ClientError::HelloTimeout {
                        endpoint: endpoint.to_string(),
                        timeout: self.cfg.hello_timeout,
                    })??;

            // Recorded even from a redirecting server, like the Go client.
            let public_ip = parse_client_ip(&resp.client_ip);
            self.status
                .send_if_modified(|s| replace(&mut s.public_ip, public_ip));

            // The Go client ignores an empty redirect target.
            let target = match resp.redirect {
                Some(r) if !r.endpoint.is_empty() => r.endpoint,
                _ => return Ok(client),
            };
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(ClientError::RedirectLoop(MAX_REDIRECTS));
            }
            let next = endpoint
                .redirect(&target)
                .map_err(|source| ClientError::Redirect {
                    endpoint: endpoint.to_string(),
                    target: target.clone(),
                    source,
                })?;
            tracing::info!(from = %endpoint, to = %next, "discovery service redirected us");
            self.endpoint = next;
            self.status.send_modify(|s| s.counters.redirects += 1);
            // Dropping `client` closes the connection to the old endpoint.
        }
    }

    /// Sends the current local state; returns the generation it covered.
    async fn publish(&mut self, client: &mut ClusterClient<Channel>) -> Result<u64, ClientError> {
        let (plan, generation) = {
            let local = self.shared.local();
            (local.plan(), local.generation())
        };
        let deadline = Instant::now() + self.cfg.publish_timeout;
        let mut updates = 0u64;
        let mut deletes = 0u64;
        let sent = timeout_at(
            deadline,
            self.send(client, plan, deadline, &mut updates, &mut deletes),
        )
        .await;
        let result = match sent {
            Ok(r) => r,
            Err(_) => Err(ClientError::PublishTimeout(self.cfg.publish_timeout)),
        };
        let now = SystemTime::now();
        let ok = result.is_ok();
        self.status.send_modify(|s| {
            s.counters.updates_sent += updates;
            s.counters.deletes_sent += deletes;
            if ok {
                s.connection.last_refresh = Some(now);
                s.synced_generation = s.synced_generation.max(generation);
            }
        });
        if ok {
            tracing::debug!(
                updates,
                deletes,
                generation,
                "published to the discovery service"
            );
        }
        result.map(|()| generation)
    }

    async fn send(
        &self,
        client: &mut ClusterClient<Channel>,
        plan: Plan,
        deadline: Instant,
        updates: &mut u64,
        deletes: &mut u64,
    ) -> Result<(), ClientError> {
        let cluster_id = &self.cfg.cluster_id;
        match plan {
            Plan::Nothing => Ok(()),
            Plan::Delete => {
                let req = AffiliateDeleteRequest {
                    cluster_id: cluster_id.clone(),
                    affiliate_id: self.cfg.affiliate_id.clone(),
                };
                client
                    .affiliate_delete(with_deadline(req, deadline))
                    .await
                    .map_err(|s| ClientError::Delete(Box::new(s)))?;
                *deletes += 1;
                Ok(())
            }
            Plan::Update {
                data,
                endpoints,
                others,
            } => {
                let own = AffiliateUpdateRequest {
                    cluster_id: cluster_id.clone(),
                    affiliate_id: self.cfg.affiliate_id.clone(),
                    affiliate_data: Some(data),
                    affiliate_endpoints: endpoints,
                    ttl: Some(ttl(self.cfg.ttl)),
                };
                let requests = std::iter::once(own).chain(others.into_iter().map(
                    |(affiliate_id, endpoint): (String, Bytes)| AffiliateUpdateRequest {
                        cluster_id: cluster_id.clone(),
                        affiliate_id,
                        // Absent, not empty: the peer's data must stay untouched.
                        affiliate_data: None,
                        affiliate_endpoints: vec![endpoint],
                        ttl: Some(ttl(self.cfg.ttl)),
                    },
                ));
                for req in requests {
                    let affiliate_id = req.affiliate_id.clone();
                    client
                        .affiliate_update(with_deadline(req, deadline))
                        .await
                        .map_err(|status| ClientError::Update {
                            affiliate_id,
                            status: Box::new(status),
                        })?;
                    *updates += 1;
                }
                Ok(())
            }
        }
    }

    /// Whether `msg` shows our own record holding something other than what we
    /// publish: another client (a hostile one that knows the cluster ID, or a
    /// second host with the same node ID) wrote or deleted it under our ID.
    fn own_record_overwritten(&self, msg: &WatchResponse) -> bool {
        let Plan::Update { data, .. } = self.shared.local().plan() else {
            return false;
        };
        msg.affiliates
            .iter()
            .any(|a| a.id == self.cfg.affiliate_id && (msg.deleted || a.data != data))
    }

    fn apply(&mut self, msg: &WatchResponse, snapshot: bool) {
        let applied = self.view.apply(msg, snapshot, &self.cfg.cipher);
        let view = &self.view;
        // Always notify: consumers learn about every message, like the Go client.
        self.status.send_modify(|s| {
            let c = &mut s.counters;
            c.watch_messages += 1;
            c.watch_snapshots += u64::from(snapshot);
            c.skipped_decrypt += applied.skipped_decrypt;
            c.skipped_decode += applied.skipped_decode;
            c.endpoints_dropped += applied.endpoints_dropped;
            if applied.changed {
                s.affiliates = view.affiliates().to_vec();
            }
        });
    }
}

/// `send_if_modified` helper: assigns and reports whether the value changed.
fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        return false;
    }
    *slot = value;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_forms() {
        assert_eq!(
            parse_client_ip(&[127, 0, 0, 1]),
            Some("127.0.0.1".parse().unwrap())
        );
        let mut v6 = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        assert_eq!(parse_client_ip(&v6), Some("2001:db8::1".parse().unwrap()));
        v6.extend_from_slice(b"eth0");
        assert_eq!(parse_client_ip(&v6), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_client_ip(&[]), None);
        assert_eq!(parse_client_ip(&[1, 2, 3]), None);
        assert_eq!(parse_client_ip(&[0; 8]), None);
    }

    #[test]
    fn ttl_encoding_matches_go() {
        use prost::Message;
        let d = ttl(Duration::from_secs(30 * 60));
        assert_eq!(d.encode_to_vec(), [0x08, 0x88, 0x0e]);
        let d = ttl(Duration::from_millis(1500));
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
    }
}
