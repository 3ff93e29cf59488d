//! `kubespan run` and `kubespan leave`.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::watch;

use super::host::Host;
use super::linux::{LinuxDataPlane, backend_choice};
use super::local::HostAddress;
use super::plan::Polling;
use super::run::{HostFacts, Node, NodeSetup, Stop};
use crate::client::endpoint::ServiceEndpoint;
use crate::client::{self, DiscoveryClient};
use crate::config::{DEFAULT_CONFIG_PATH, Settings};
use crate::core::cipher::ClusterCipher;
use crate::identity;
use crate::kubespan::peerstate::Timing;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Configuration file (`kubespan gen config` prints an example).
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Verbose (debug) logging.
    #[arg(long)]
    pub debug: bool,
}

#[derive(clap::Args, Debug)]
pub struct LeaveArgs {
    /// Configuration file of the node that leaves.
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// How long to wait for the discovery service to confirm the deletion.
    #[arg(long, default_value = "15s", value_parser = crate::util::parse_duration)]
    pub timeout: Duration,
}

pub const PID_FILE: &str = "kubespan.pid";

/// Host facts from rtnetlink.
struct NetlinkHost(Host);

impl HostFacts for NetlinkHost {
    async fn addresses(&mut self) -> anyhow::Result<Vec<HostAddress>> {
        let links = self.0.links().await?;
        Ok(self.0.addresses(&links).await?)
    }
}

/// Holds the state directory's pid file locked for the daemon's lifetime, so
/// two daemons never share a state directory (and `leave` can find us).
struct PidLock(#[allow(dead_code)] Flock<std::fs::File>);

fn lock_pid_file(state_dir: &Path) -> anyhow::Result<PidLock> {
    identity::ensure_state_dir(state_dir)?;
    let path = state_dir.join(PID_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, _)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            anyhow::bail!(
                "another kubespan (pid {}) is running with state directory {}",
                pid.trim(),
                state_dir.display()
            );
        }
    };
    lock.set_len(0)?;
    lock.rewind()?;
    write!(lock, "{}", std::process::id())?;
    lock.flush()?;
    Ok(PidLock(lock))
}

fn hostname(settings: &Settings) -> String {
    settings.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    })
}

fn discovery_client(settings: &Settings, node_id: &str) -> anyhow::Result<Option<DiscoveryClient>> {
    let Some(endpoint) = &settings.discovery_endpoint else {
        tracing::warn!("discovery is disabled: only peers from the state directory are known");
        return Ok(None);
    };
    let cfg = client::Config::new(
        ServiceEndpoint::parse(endpoint)?,
        settings.cluster_id.clone(),
        node_id.to_owned(),
        ClusterCipher::new(&settings.cluster_key)?,
    );
    Ok(Some(DiscoveryClient::spawn(cfg)?))
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&args.config)?;
    crate::discovery::cli::init_logging(&args.log_format, args.debug);
    if !settings.kubespan_enabled {
        anyhow::bail!(
            "kubespan.enabled is false in {}: nothing to run",
            args.config.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_node(settings))
}

async fn run_node(settings: Settings) -> anyhow::Result<()> {
    let _pid = lock_pid_file(&settings.state_dir)?;
    let node_id = identity::node_id(&settings.state_dir)?;
    let keys = identity::kubespan_keys(&settings.state_dir)?;
    let (host, host_events) = Host::connect()?;
    let links = host.links().await?;
    let infos: Vec<identity::LinkInfo> = links.iter().map(|l| l.info.clone()).collect();
    let link = identity::address_link(&infos, settings.address_link.as_deref())?;
    let kubespan_address = identity::kubespan_address(&settings.cluster_id, link)?;

    // Builds the backend (`auto` probes kernel WireGuard in a throwaway
    // namespace); what a crashed run left behind is adopted by the first apply.
    let dp = LinuxDataPlane::new(backend_choice(settings.backend), &settings.interface)?;
    tracing::info!(
        node_id = %node_id,
        public_key = %keys.public_key,
        address = %kubespan_address,
        address_link = %link.name,
        backend = ?dp.backend(),
        "starting"
    );
    let client = discovery_client(&settings, &node_id)?;
    let os = super::local::operating_system(
        &std::fs::read_to_string("/etc/os-release").unwrap_or_default(),
    );
    let setup = NodeSetup {
        hostname: hostname(&settings),
        operating_system: os,
        node_id,
        keys,
        kubespan_address,
        timing: Timing {
            endpoint_connect_timeout: settings.endpoint_connect_timeout,
            ..Timing::default()
        },
        polling: Polling::default(),
        retain_grace: Duration::from_secs(300),
        backend: format!("{:?}", dp.backend()).to_lowercase(),
        settings,
    };
    let private_key = setup.keys.private_key.clone();
    let api_socket = setup.settings.api_socket.clone();
    let metrics_address = setup.settings.metrics_address;
    let (node, view) = Node::new(setup, dp, NetlinkHost(host), client)?;
    // Metrics first: a busy metrics address must fail before the API socket
    // exists, so a failed start leaves no file behind.
    let (metrics_stop, metrics_stop_rx) = watch::channel(false);
    let metrics = match metrics_address {
        Some(addr) => Some(super::metrics::serve(addr, view.clone(), metrics_stop_rx).await?),
        None => None,
    };
    let api = crate::api::server::start(&api_socket, view, private_key)?;
    let (stop_tx, stop_rx) = watch::channel(None);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        }
        let _ = stop_tx.send(Some(Stop::Shutdown));
    });
    let result = node.run(host_events, stop_rx).await;
    api.shutdown().await;
    let _ = metrics_stop.send(true);
    if let Some(m) = metrics {
        let _ = m.await;
    }
    result?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Stops a running daemon of this state directory (if any) and waits for it.
fn stop_running_daemon(state_dir: &Path, within: Duration) -> anyhow::Result<bool> {
    let path = state_dir.join(PID_FILE);
    let Ok(file) = std::fs::File::open(&path) else {
        return Ok(false);
    };
    let Err((mut file, _)) = Flock::lock(file, FlockArg::LockSharedNonblock) else {
        return Ok(false); // not locked: no daemon running
    };
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", path.display()))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("cannot signal the running daemon (pid {pid})"))?;
    let deadline = std::time::Instant::now() + within;
    loop {
        let f = std::fs::File::open(&path)?;
        if Flock::lock(f, FlockArg::LockSharedNonblock).is_ok() {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the daemon (pid {pid}) did not stop within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&args.config)?;
    crate::discovery::cli::init_logging("text", false);
    let id_path = settings.state_dir.join(identity::NODE_IDENTITY_FILE);
    if !id_path.exists() {
        anyhow::bail!(
            "{} does not exist: this node never joined",
            id_path.display()
        );
    }
    let node_id = identity::node_id(&settings.state_dir)?;
    if stop_running_daemon(&settings.state_dir, Duration::from_secs(30))? {
        eprintln!("stopped the running daemon");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = discovery_client(&settings, &node_id)?
            .context("discovery is disabled in the config: there is nothing to leave")?;
        client.delete_local();
        let r = tokio::time::timeout(args.timeout, client.wait_synced()).await;
        client.shutdown().await;
        match r {
            Ok(Ok(())) => {
                eprintln!("node {node_id} deleted from the discovery service");
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => anyhow::bail!(
                "the discovery service did not confirm the deletion within {:?}",
                args.timeout
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_lock_excludes_a_second_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_pid_file(dir.path()).unwrap();
        let err = lock_pid_file(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        lock_pid_file(dir.path()).unwrap();
        // No daemon holds the lock: nothing to stop.
        assert!(!stop_running_daemon(dir.path(), Duration::from_secs(1)).unwrap());
    }
}
