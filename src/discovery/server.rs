//! Starting and stopping a discovery service: listeners, background loops
//! (GC, snapshots, limiter GC), landing and metrics pages, graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use super::metrics::Metrics;
use super::ratelimit::{IpRateLimiter, RateConfig};
use super::service::{DiscoveryService, ServiceOptions};
use super::snapshot;
use super::state::{Limits, State};
use crate::proto::server::cluster_server::ClusterServer;

#[derive(Clone, Debug)]
pub struct Config {
    pub addr: Option<SocketAddr>,
    pub landing_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub gc_interval: Duration,
    pub snapshot: Option<SnapshotConfig>,
    /// PEM certificate and key: serve TLS instead of plaintext h2c.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub rate: RateConfig,
    pub options: ServiceOptions,
    pub limits: Limits,
}

#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    pub path: PathBuf,
    pub interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: Some("[::]:3000".parse().expect("valid")),
            landing_addr: Some("[::]:3001".parse().expect("valid")),
            metrics_addr: Some("[::]:2122".parse().expect("valid")),
            gc_interval: Duration::from_secs(60),
            snapshot: Some(SnapshotConfig {
                path: "/var/discovery-service/state.binpb".into(),
                interval: Duration::from_secs(600),
            }),
            tls: None,
            rate: RateConfig {
                rate: 15.0,
                burst: 60,
            },
            options: ServiceOptions::default(),
            limits: Limits::default(),
        }
    }
}

/// A running service. Call [`RunningServer::shutdown`] to stop it cleanly.
pub struct RunningServer {
    pub grpc_addr: Option<SocketAddr>,
    pub landing_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub state: Arc<State>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
    snapshot: Option<SnapshotConfig>,
}

fn save_snapshot(state: &State, metrics: &Metrics, cfg: &SnapshotConfig) {
    let started = Instant::now();
    let r = snapshot::save(state, &cfg.path, Instant::now(), SystemTime::now());
    metrics.record_storage(
        "save",
        r.as_ref().map(|s| *s).map_err(|_| ()),
        started.elapsed(),
    );
    match r {
        Ok(s) => tracing::debug!(
            path = %cfg.path.display(),
            clusters = s.clusters,
            affiliates = s.affiliates,
            bytes = s.bytes,
            "snapshot saved"
        ),
        Err(e) => tracing::error!("saving snapshot failed: {e}"),
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Binds every listener, loads the snapshot and starts serving.
pub async fn start(cfg: Config) -> anyhow::Result<RunningServer> {
    let state = Arc::new(State::new(cfg.limits.clone()));
    let metrics = Arc::new(Metrics::new());
    let limiter = Arc::new(IpRateLimiter::new(cfg.rate));
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    if let Some(snap) = &cfg.snapshot {
        let started = Instant::now();
        match snapshot::load(&state, &snap.path, Instant::now(), SystemTime::now()) {
            Ok(Some(s)) => {
                metrics.record_storage("load", Ok(s), started.elapsed());
                tracing::info!(
                    path = %snap.path.display(),
                    clusters = s.clusters,
                    affiliates = s.affiliates,
                    "snapshot loaded"
                );
            }
            Ok(None) => {
                tracing::info!(path = %snap.path.display(), "no snapshot yet, starting empty")
            }
            Err(e) => {
                metrics.record_storage("load", Err(()), started.elapsed());
                tracing::error!("{e}; starting empty");
            }
        }
    }

    let mut grpc_addr = None;
    if let Some(addr) = cfg.addr {
        let listener = crate::util::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--addr)"))?;
        grpc_addr = Some(listener.local_addr()?);
        let svc = DiscoveryService::new(
            state.clone(),
            limiter.clone(),
            metrics.clone(),
            cfg.options.clone(),
            stop_rx.clone(),
        );
        let mut builder = Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some((cert, key)) = &cfg.tls {
            let cert_pem = std::fs::read(cert)
                .with_context(|| format!("cannot read certificate {}", cert.display()))?;
            let key_pem =
                std::fs::read(key).with_context(|| format!("cannot read key {}", key.display()))?;
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
                .context("invalid TLS certificate or key")?;
        }
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let router = builder.add_service(ClusterServer::new(svc));
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, stopped(stop))
                .await
                .context("gRPC server failed")
        });
    }

    let mut landing_addr = None;
    if let Some(addr) = cfg.landing_addr {
        let listener = crate::util::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--landing-addr)"))?;
        landing_addr = Some(listener.local_addr()?);
        let st = state.clone();
        let app = Router::new()
            .route("/", get(|| async { Html(LANDING) }))
            .route(
                "/stats",
                get(move || {
                    let affiliates = st.stats().affiliates;
                    async move {
                        (
                            [
                                (header::CONTENT_TYPE, "application/json"),
                                (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
                            ],
                            format!("{{\"affiliates\":{affiliates}}}"),
                        )
                    }
                }),
            );
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped(stop))
                .await
                .context("landing server failed")
        });
    }

    let mut metrics_addr = None;
    if let Some(addr) = cfg.metrics_addr {
        let listener = crate::util::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--metrics-addr)"))?;
        metrics_addr = Some(listener.local_addr()?);
        let (st, m) = (state.clone(), metrics.clone());
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let body = m.render(&st);
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response()
                }
            }),
        );
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped(stop))
                .await
                .context("metrics server failed")
        });
    }

    {
        let (st, m, lim, stop) = (
            state.clone(),
            metrics.clone(),
            limiter.clone(),
            stop_rx.clone(),
        );
        let every = cfg.gc_interval.max(Duration::from_millis(10));
        tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped(stop.clone()) => return Ok(()),
                }
                let now = Instant::now();
                let r = st.gc(now);
                m.record_gc(r);
                lim.gc(now);
                if r != Default::default() {
                    tracing::debug!(
                        clusters = r.clusters,
                        affiliates = r.affiliates,
                        endpoints = r.endpoints,
                        "gc"
                    );
                }
            }
        });
    }

    if let Some(snap) = cfg.snapshot.clone() {
        let (st, m, stop) = (state.clone(), metrics.clone(), stop_rx.clone());
        tasks.spawn(async move {
            let every = snap.interval.max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped(stop.clone()) => return Ok(()),
                }
                let (st2, m2, snap2) = (st.clone(), m.clone(), snap.clone());
                // File I/O and fsync off the async workers.
                let _ = tokio::task::spawn_blocking(move || save_snapshot(&st2, &m2, &snap2)).await;
            }
        });
    }

    tracing::info!(
        grpc = ?grpc_addr,
        landing = ?landing_addr,
        metrics = ?metrics_addr,
        tls = cfg.tls.is_some(),
        "discovery service listening"
    );
    Ok(RunningServer {
        grpc_addr,
        landing_addr,
        metrics_addr,
        state,
        metrics,
        stop,
        tasks,
        snapshot: cfg.snapshot,
    })
}

impl RunningServer {
    /// Ends Watch streams cleanly (status OK), stops the listeners and saves a
    /// final snapshot.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.state.close_subscriptions();
        let mut first_err = None;
        let drain = async {
            while let Some(r) = self.tasks.join_next().await {
                match r {
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e.into());
                    }
                    Ok(Ok(())) => {}
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within 10 s; stopping anyway");
            self.tasks.abort_all();
        }
        if let Some(snap) = &self.snapshot {
            let (st, m, snap) = (self.state.clone(), self.metrics.clone(), snap.clone());
            tokio::task::spawn_blocking(move || save_snapshot(&st, &m, &snap)).await?;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until a background task fails (a listener died); returns its error.
    pub async fn failed(&mut self) -> anyhow::Error {
        loop {
            match self.tasks.join_next().await {
                Some(Ok(Err(e))) => return e,
                Some(Err(e)) => return e.into(),
                Some(Ok(Ok(()))) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }
}

const LANDING: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>kubespan discovery service</title></head>
<body>
<h1>kubespan discovery service</h1>
<p>This server speaks the <code>sidero.discovery.server.Cluster</code> gRPC API used by
Talos Linux and kubespan nodes to find each other. Node data is encrypted by the nodes
with their cluster secret: this server only stores opaque blobs.</p>
<p>Affiliate count: <a href="/stats">/stats</a>.</p>
</body></html>
"#;
