//! `kubespan discovery-service`: a drop-in replacement for the upstream server,
//! with the upstream flag names where the option exists.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::ArgAction;

use super::ratelimit::RateConfig;
use super::server::{self, Config, SnapshotConfig};
use super::service::ServiceOptions;
use super::state::Limits;
use crate::util::{ListenAddr, parse_duration};

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn non_negative_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !r.is_finite() || r < 0.0 {
        return Err("must be a number >= 0 (0 disables rate limiting)".into());
    }
    Ok(r)
}

#[derive(clap::Args, Debug)]
#[command(about = "Run a discovery service (sidero.discovery.server.Cluster gRPC API)")]
pub struct Args {
    /// gRPC listen address (`:port` for every address; empty disables).
    #[arg(long, default_value = ":3000")]
    pub addr: ListenAddr,

    /// Landing page and /stats listen address (empty disables).
    #[arg(long, default_value = ":3001")]
    pub landing_addr: ListenAddr,

    /// Prometheus /metrics listen address (empty disables).
    #[arg(long, default_value = ":2122")]
    pub metrics_addr: ListenAddr,

    /// How often expired affiliates and endpoints are collected.
    #[arg(long, default_value = "1m", value_parser = positive_duration)]
    pub gc_interval: Duration,

    /// Redirect every client to this gRPC endpoint (`host:port`) in Hello.
    #[arg(long, default_value = "")]
    pub redirect_endpoint: String,

    /// Save state snapshots and load them at start-up.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", require_equals = true)]
    pub snapshots_enabled: bool,

    /// Snapshot file.
    #[arg(long, default_value = "/var/discovery-service/state.binpb")]
    pub snapshot_path: PathBuf,

    /// How often a snapshot is saved (one is also saved on shutdown).
    #[arg(long, default_value = "10m", value_parser = positive_duration)]
    pub snapshot_interval: Duration,

    /// TLS certificate (PEM); with --key-path serves TLS instead of plaintext h2c.
    #[arg(long, requires = "key_path")]
    pub certificate_path: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, requires = "certificate_path")]
    pub key_path: Option<PathBuf>,

    /// Requests per second allowed per client IP (0 disables rate limiting).
    #[arg(long, default_value = "15", value_parser = non_negative_rate, allow_negative_numbers = true)]
    pub rate_limit: f64,

    /// Burst of requests allowed per client IP.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,

    /// Take the client IP from X-Real-IP / X-Forwarded-For. Only behind a reverse
    /// proxy that sets them: otherwise clients can spoof their IP and rate limit.
    #[arg(long)]
    pub trust_proxy_headers: bool,

    /// Do not report the client's IP in Hello responses.
    #[arg(long)]
    pub disable_client_ip_reporting: bool,

    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Verbose (debug) logging.
    #[arg(long)]
    pub debug: bool,
}

impl Args {
    pub fn into_config(self) -> Config {
        let redirect = self.redirect_endpoint.trim().to_owned();
        Config {
            addr: self.addr.0,
            landing_addr: self.landing_addr.0,
            metrics_addr: self.metrics_addr.0,
            gc_interval: self.gc_interval,
            snapshot: self.snapshots_enabled.then_some(SnapshotConfig {
                path: self.snapshot_path,
                interval: self.snapshot_interval,
            }),
            tls: self.certificate_path.zip(self.key_path),
            rate: RateConfig {
                rate: self.rate_limit,
                burst: self.rate_burst,
            },
            options: ServiceOptions {
                redirect_endpoint: (!redirect.is_empty()).then_some(redirect),
                trust_proxy_headers: self.trust_proxy_headers,
                disable_client_ip_reporting: self.disable_client_ip_reporting,
            },
            limits: Limits::default(),
        }
    }
}

/// Sets up `tracing` for the process: `text` or `json`, `RUST_LOG` overrides.
pub fn init_logging(format: &str, debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: under systemd, stderr goes to the journal,
    // where escape codes would garble every line.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    init_logging(&args.log_format, args.debug);
    let cfg = args.into_config();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut server = server::start(cfg).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            e = server.failed() => return Err(e),
        }
        server.shutdown().await?;
        tracing::info!("stopped");
        Ok(())
    })
}
