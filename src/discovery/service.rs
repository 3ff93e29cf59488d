//! The `sidero.discovery.server.Cluster` gRPC service over [`State`].

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};

use super::metrics::Metrics;
use super::ratelimit::{Admission, IpRateLimiter};
use super::state::{State, StateError, Subscription, Update};
use super::version::version_label;
use crate::proto::server::cluster_server::Cluster;
use crate::proto::server::{
    AffiliateDeleteRequest, AffiliateDeleteResponse, AffiliateUpdateRequest,
    AffiliateUpdateResponse, HelloRequest, HelloResponse, ListRequest, ListResponse,
    RedirectMessage, WatchRequest, WatchResponse,
};

/// Options of the service that are not state limits.
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    /// Sent in every Hello response when set (`host:port`).
    pub redirect_endpoint: Option<String>,
    /// Trust `X-Real-IP` / first `X-Forwarded-For` (only behind a reverse proxy).
    pub trust_proxy_headers: bool,
    /// Leave `client_ip` out of Hello responses.
    pub disable_client_ip_reporting: bool,
}

pub struct DiscoveryService {
    state: Arc<State>,
    limiter: Arc<IpRateLimiter>,
    metrics: Arc<Metrics>,
    options: ServiceOptions,
    shutdown: watch::Receiver<bool>,
}

impl From<StateError> for Status {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Invalid(m) => Status::invalid_argument(m),
            StateError::Exhausted(m) => Status::resource_exhausted(m),
        }
    }
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of H M S m u n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn header<'a, T>(req: &'a Request<T>, name: &str) -> Option<&'a str> {
    req.metadata().get(name).and_then(|v| v.to_str().ok())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

impl DiscoveryService {
    pub fn new(
        state: Arc<State>,
        limiter: Arc<IpRateLimiter>,
        metrics: Arc<Metrics>,
        options: ServiceOptions,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        DiscoveryService {
            state,
            limiter,
            metrics,
            options,
            shutdown,
        }
    }

    /// The client's IP: a proxy header when trusted, else the TCP peer. IPv4
    /// clients of a dual-stack listener arrive as `::ffff:a.b.c.d`: report the
    /// IPv4 address, which is what the client really has.
    fn client_ip<T>(&self, req: &Request<T>) -> Option<IpAddr> {
        if self.options.trust_proxy_headers {
            if let Some(ip) = header(req, "x-real-ip").and_then(|v| v.trim().parse().ok()) {
                return Some(ip);
            }
            if let Some(ip) = header(req, "x-forwarded-for")
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok())
            {
                return Some(ip);
            }
        }
        req.remote_addr().map(|a| a.ip().to_canonical())
    }

    async fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if !self.limiter.enabled() {
            return Ok(());
        }
        let Some(ip) = self.client_ip(req) else {
            return Ok(());
        };
        let deadline = header(req, "grpc-timeout").and_then(parse_grpc_timeout);
        match self.limiter.admit(ip, Instant::now(), deadline) {
            Admission::Now => Ok(()),
            Admission::After(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Admission::Refused => {
                self.metrics.record_rate_limited();
                Err(Status::resource_exhausted(
                    "rate limit exceeds request timeout",
                ))
            }
        }
    }

    /// Runs a unary handler with rate limiting and RPC metrics.
    async fn unary<T, R>(
        &self,
        method: &'static str,
        req: Request<T>,
        handler: impl FnOnce(&Self, Request<T>) -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        let started = Instant::now();
        self.metrics.rpc_started(method, "unary");
        let result = match self.admit(&req).await {
            Ok(()) => handler(self, req),
            Err(s) => Err(s),
        };
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        if code == Code::Ok {
            self.metrics.rpc_sent(method, "unary");
        }
        self.metrics
            .rpc_handled(method, "unary", code, started.elapsed());
        result.map(Response::new)
    }

    fn watch_stream(&self, sub: Subscription) -> WatchStream {
        enum Phase {
            Snapshot(Subscription),
            Live(Subscription),
            Done,
        }
        let metrics = self.metrics.clone();
        let shutdown = self.shutdown.clone();
        let started = Instant::now();
        let stream = futures_util::stream::unfold(
            (Phase::Snapshot(sub), shutdown),
            move |(phase, mut shutdown)| {
                let metrics = metrics.clone();
                async move {
                    let finish = |code| {
                        metrics.rpc_handled("Watch", "server_stream", code, started.elapsed())
                    };
                    match phase {
                        Phase::Snapshot(mut sub) => {
                            let msg = WatchResponse {
                                affiliates: std::mem::take(&mut sub.snapshot),
                                deleted: false,
                            };
                            metrics.rpc_sent("Watch", "server_stream");
                            Some((Ok(msg), (Phase::Live(sub), shutdown)))
                        }
                        Phase::Live(mut sub) => {
                            let next = tokio::select! {
                                m = sub.rx.recv() => m,
                                _ = shutdown.wait_for(|stop| *stop) => None,
                            };
                            match next {
                                Some(msg) => {
                                    metrics.rpc_sent("Watch", "server_stream");
                                    Some((Ok(msg), (Phase::Live(sub), shutdown)))
                                }
                                None if sub.lost_update() => {
                                    finish(Code::Aborted);
                                    let status =
                                        Status::aborted("subscription canceled: lost update");
                                    Some((Err(status), (Phase::Done, shutdown)))
                                }
                                None => {
                                    finish(Code::Ok);
                                    None
                                }
                            }
                        }
                        Phase::Done => None,
                    }
                }
            },
        );
        Box::pin(stream)
    }
}

#[tonic::async_trait]
impl Cluster for DiscoveryService {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        self.unary("Hello", req, |svc, req| {
            let ip = svc.client_ip(&req);
            let r = req.into_inner();
            super::state::validate_cluster_id(svc.state.limits(), &r.cluster_id)?;
            svc.metrics
                .hello_requests
                .get_or_create(&vec![("client_version", version_label(&r.client_version))])
                .inc();
            let client_ip = match (ip, svc.options.disable_client_ip_reporting) {
                (Some(IpAddr::V4(v4)), false) => v4.octets().to_vec().into(),
                (Some(IpAddr::V6(v6)), false) => v6.octets().to_vec().into(),
                _ => Default::default(),
            };
            Ok(HelloResponse {
                redirect: svc
                    .options
                    .redirect_endpoint
                    .clone()
                    .map(|endpoint| RedirectMessage { endpoint }),
                client_ip,
            })
        })
        .await
    }

    async fn affiliate_update(
        &self,
        req: Request<AffiliateUpdateRequest>,
    ) -> Result<Response<AffiliateUpdateResponse>, Status> {
        self.unary("AffiliateUpdate", req, |svc, req| {
            let r = req.into_inner();
            // A negative or malformed TTL is as good as none: it expires at once.
            let ttl = r
                .ttl
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default();
            let update = Update {
                affiliate_id: r.affiliate_id,
                data: r.affiliate_data,
                endpoints: r.affiliate_endpoints,
                ttl,
            };
            svc.state.update(&r.cluster_id, update, Instant::now())?;
            Ok(AffiliateUpdateResponse {})
        })
        .await
    }

    async fn affiliate_delete(
        &self,
        req: Request<AffiliateDeleteRequest>,
    ) -> Result<Response<AffiliateDeleteResponse>, Status> {
        self.unary("AffiliateDelete", req, |svc, req| {
            let r = req.into_inner();
            svc.state.delete(&r.cluster_id, &r.affiliate_id)?;
            Ok(AffiliateDeleteResponse {})
        })
        .await
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.unary("List", req, |svc, req| {
            let affiliates = svc.state.list(&req.into_inner().cluster_id)?;
            Ok(ListResponse { affiliates })
        })
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        self.metrics.rpc_started("Watch", "server_stream");
        let started = Instant::now();
        if let Err(s) = self.admit(&req).await {
            self.metrics
                .rpc_handled("Watch", "server_stream", s.code(), started.elapsed());
            return Err(s);
        }
        match self.state.subscribe(&req.into_inner().cluster_id) {
            Ok(sub) => Ok(Response::new(self.watch_stream(sub))),
            Err(e) => {
                // Reported as the stream's final status on the first receive, as the
                // upstream server does, not as a failure to open the stream.
                let status = Status::from(e);
                self.metrics.rpc_handled(
                    "Watch",
                    "server_stream",
                    status.code(),
                    started.elapsed(),
                );
                let s: WatchStream =
                    Box::pin(futures_util::stream::once(async move { Err(status) }));
                Ok(Response::new(s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_grpc_timeout;
    use std::time::Duration;

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99999999))
        );
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
