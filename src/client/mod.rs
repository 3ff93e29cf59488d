//! Discovery service client, wire-compatible with siderolabs/discovery-client
//! as Talos uses it (spec `discovery-protocol.md` §1, §3, §5).
//!
//! Pure parts: [`endpoint`] (Talos endpoint URLs), [`backoff`] (reconnect
//! schedule), [`view`] (applying Watch messages), [`local`] (what we publish).
//! The async shell in `runner` connects, says Hello (following redirects),
//! watches, publishes and refreshes.
//!
//! Deliberate differences from the Go client, none of them visible on the wire:
//! * a failed refresh reconnects right away (with backoff) instead of idling until
//!   the next TTL/2 tick;
//! * the first connection and redirect hops are not delayed by the backoff;
//! * the refresh timer restarts after every full publish instead of ticking from
//!   start-up;
//! * endpoints with a bogus length byte are dropped instead of panicking;
//! * local data the server would reject (over 2 KiB encrypted, over 64
//!   endpoints) is refused by [`DiscoveryClient::set_local`].

pub mod backoff;
pub mod endpoint;
pub mod local;
mod runner;
pub mod view;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use backoff::{Backoff, BackoffConfig};
pub use endpoint::{EndpointError, ServiceEndpoint};
pub use view::{DiscoveredAffiliate, WatchView};

use crate::core::cipher::{CipherError, ClusterCipher};
use crate::core::types::AffiliateSpec;
use local::{LocalState, MAX_ID_LEN};

/// Talos' TTL, and the server's maximum.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
/// Deadline of each Hello (the Go client's value), including connection setup.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for one publish round (all AffiliateUpdates together), as in Go.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Redirect hops followed in one connection attempt before backing off.
pub const MAX_REDIRECTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cluster ID must be 1 to 256 bytes, got {0}; set cluster.id")]
    ClusterId(usize),
    #[error("affiliate ID must be 1 to 256 bytes, got {0}")]
    AffiliateId(usize),
    #[error(
        "local affiliate node_id {node_id:?} differs from the client's affiliate ID \
         {affiliate_id:?}; peers would see two identities"
    )]
    NodeIdMismatch {
        node_id: String,
        affiliate_id: String,
    },
    #[error("TTL must be more than zero and at most 30 minutes (the server's limit), got {0:?}")]
    Ttl(Duration),
    #[error(
        "refresh interval must be more than zero and shorter than the TTL ({ttl:?}), got \
         {refresh:?}; otherwise published data expires between refreshes"
    )]
    RefreshInterval { refresh: Duration, ttl: Duration },
    #[error("the extra CA bundle holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    ExtraCa,
    #[error("TLS setup for {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("encrypting local data: {0}")]
    Cipher(#[from] CipherError),
    #[error(
        "encrypted affiliate data is {0} bytes; the discovery service accepts at most 2048 \
         (publish fewer addresses or networks)"
    )]
    DataTooLarge(usize),
    #[error("{0} endpoints; the discovery service accepts at most 64 per affiliate")]
    TooManyEndpoints(usize),
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("Hello to {endpoint} failed: {status}")]
    Hello {
        endpoint: String,
        status: Box<tonic::Status>,
    },
    #[error("no Hello answer from {endpoint} within {timeout:?}")]
    HelloTimeout { endpoint: String, timeout: Duration },
    #[error("{endpoint} redirected to {target:?}, which is not a usable address: {source}")]
    Redirect {
        endpoint: String,
        target: String,
        source: EndpointError,
    },
    #[error("more than {0} redirects in a row; check the discovery services' --redirect-endpoint")]
    RedirectLoop(usize),
    #[error("opening Watch on {endpoint} failed: {status}")]
    WatchOpen {
        endpoint: String,
        status: Box<tonic::Status>,
    },
    #[error("Watch stream failed: {0}")]
    Watch(Box<tonic::Status>),
    #[error("Watch stream ended (server shutting down or restarting)")]
    WatchEnded,
    #[error("publishing affiliate {affiliate_id:?} failed: {status}")]
    Update {
        affiliate_id: String,
        status: Box<tonic::Status>,
    },
    #[error("deleting the local affiliate failed: {0}")]
    Delete(Box<tonic::Status>),
    #[error("publishing did not finish within {0:?}")]
    PublishTimeout(Duration),
    #[error("the discovery client has stopped")]
    Stopped,
}

/// Client settings. [`Config::new`] fills in Talos' defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: ServiceEndpoint,
    /// Talos `cluster.id`, sent verbatim.
    pub cluster_id: String,
    /// This node's ID; also the affiliate ID.
    pub affiliate_id: String,
    /// From the Talos `cluster.secret`.
    pub cipher: ClusterCipher,
    /// Sent in Hello; only feeds a server metric label.
    pub client_version: String,
    /// TTL of everything we publish (Talos: 30 min).
    pub ttl: Duration,
    /// Full re-publish period; `None` means TTL/2 like Talos.
    pub refresh_interval: Option<Duration>,
    /// Extra trusted CA certificates (PEM) for TLS endpoints, on top of the
    /// system roots (self-hosted services, tests).
    pub extra_ca_pem: Option<Vec<u8>>,
    pub backoff: BackoffConfig,
    pub hello_timeout: Duration,
    pub publish_timeout: Duration,
}

impl Config {
    pub fn new(
        endpoint: ServiceEndpoint,
        cluster_id: impl Into<String>,
        affiliate_id: impl Into<String>,
        cipher: ClusterCipher,
    ) -> Self {
        Config {
            endpoint,
            cluster_id: cluster_id.into(),
            affiliate_id: affiliate_id.into(),
            cipher,
            client_version: concat!("kubespan/", env!("CARGO_PKG_VERSION")).to_string(),
            ttl: DEFAULT_TTL,
            refresh_interval: None,
            extra_ca_pem: None,
            backoff: BackoffConfig::default(),
            hello_timeout: HELLO_TIMEOUT,
            publish_timeout: PUBLISH_TIMEOUT,
        }
    }

    pub fn refresh_interval(&self) -> Duration {
        self.refresh_interval.unwrap_or(self.ttl / 2)
    }

    /// HTTP/2 keepalive ping period: max(10 s, TTL/10), as the Go client (the
    /// server refuses pings more often than every 10 s).
    pub fn keepalive_interval(&self) -> Duration {
        (self.ttl / 10).max(Duration::from_secs(10))
    }

    fn validate(&self) -> Result<(), ClientError> {
        if self.cluster_id.is_empty() || self.cluster_id.len() > MAX_ID_LEN {
            return Err(ClientError::ClusterId(self.cluster_id.len()));
        }
        if self.affiliate_id.is_empty() || self.affiliate_id.len() > MAX_ID_LEN {
            return Err(ClientError::AffiliateId(self.affiliate_id.len()));
        }
        if self.ttl.is_zero() || self.ttl > DEFAULT_TTL {
            return Err(ClientError::Ttl(self.ttl));
        }
        if let Some(pem) = &self.extra_ca_pem {
            // tonic silently accepts a bundle without certificates.
            let marker = b"-----BEGIN CERTIFICATE-----";
            if !pem.windows(marker.len()).any(|w| w == marker) {
                return Err(ClientError::ExtraCa);
            }
        }
        let refresh = self.refresh_interval();
        if refresh.is_zero() || refresh >= self.ttl {
            return Err(ClientError::RefreshInterval {
                refresh,
                ttl: self.ttl,
            });
        }
        Ok(())
    }
}

/// Connection state, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionState {
    /// Hello, Watch and the first publish of the current session succeeded.
    pub connected: bool,
    /// The endpoint in use (after redirects).
    pub endpoint: ServiceEndpoint,
    pub connected_since: Option<SystemTime>,
    /// Last time a publish round (or delete) was acknowledged.
    pub last_refresh: Option<SystemTime>,
    /// The most recent failure, kept after recovery for diagnosis.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Acknowledged AffiliateUpdate calls (own data and harvested endpoints).
    pub updates_sent: u64,
    /// Acknowledged AffiliateDelete calls.
    pub deletes_sent: u64,
    pub watch_messages: u64,
    /// Watch snapshots applied (one per established session).
    pub watch_snapshots: u64,
    /// Affiliates skipped because their data did not authenticate.
    pub skipped_decrypt: u64,
    /// Affiliates skipped because their decrypted data did not decode.
    pub skipped_decode: u64,
    pub endpoints_dropped: u64,
    /// Connection attempts after a failure or a lost session.
    pub reconnects: u64,
    /// Hello redirects followed.
    pub redirects: u64,
    /// Times our record was found overwritten (or deleted) by another client
    /// and published again.
    pub overwrites_repaired: u64,
}

/// Everything the client knows, published on every change and every Watch message.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSnapshot {
    /// Discovered affiliates (without ourselves), in server order.
    pub affiliates: Vec<DiscoveredAffiliate>,
    /// Our address as the service saw it in the last Hello.
    pub public_ip: Option<IpAddr>,
    pub connection: ConnectionState,
    pub counters: Counters,
    /// Local generation the server has acknowledged (see [`DiscoveryClient::wait_synced`]).
    synced_generation: u64,
}

impl ClientSnapshot {
    pub fn get(&self, id: &str) -> Option<&DiscoveredAffiliate> {
        self.affiliates.iter().find(|a| a.id == id)
    }
}

/// State shared by the handle and the task.
struct Shared {
    local: Mutex<LocalState>,
    /// Wakes the task after a local change; a permit is stored if it is busy.
    wake: Notify,
}

impl Shared {
    fn local(&self) -> MutexGuard<'_, LocalState> {
        // Nothing in LocalState can be left half-updated by a panic that matters.
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to a running discovery client. Dropping it stops the client.
pub struct DiscoveryClient {
    shared: Arc<Shared>,
    cipher: ClusterCipher,
    affiliate_id: String,
    status: watch::Receiver<ClientSnapshot>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DiscoveryClient {
    /// Validates the configuration and starts the client task; it connects
    /// right away. Must be called within a Tokio runtime.
    pub fn spawn(config: Config) -> Result<Self, ClientError> {
        config.validate()?;
        // Fail now on an unusable CA bundle or a host without system roots.
        runner::tonic_endpoint(&config, &config.endpoint)?;
        let shared = Arc::new(Shared {
            local: Mutex::new(LocalState::default()),
            wake: Notify::new(),
        });
        let (status_tx, status) = watch::channel(ClientSnapshot {
            affiliates: Vec::new(),
            public_ip: None,
            connection: ConnectionState {
                connected: false,
                endpoint: config.endpoint.clone(),
                connected_since: None,
                last_refresh: None,
                last_error: None,
            },
            counters: Counters::default(),
            synced_generation: 0,
        });
        let (stop, stop_rx) = watch::channel(false);
        let cipher = config.cipher.clone();
        let affiliate_id = config.affiliate_id.clone();
        let task =
            tokio::spawn(runner::Runner::new(config, shared.clone(), status_tx).run(stop_rx));
        Ok(DiscoveryClient {
            shared,
            cipher,
            affiliate_id,
            status,
            stop,
            task,
        })
    }

    /// Sets the local affiliate (its KubeSpan endpoints included) and publishes
    /// it. Returns `false` without sending anything when it equals the current data.
    pub fn set_local(&self, spec: AffiliateSpec) -> Result<bool, ClientError> {
        if spec.node_id != self.affiliate_id {
            return Err(ClientError::NodeIdMismatch {
                node_id: spec.node_id,
                affiliate_id: self.affiliate_id.clone(),
            });
        }
        let changed = self.shared.local().set_local(&self.cipher, spec)?;
        if changed {
            self.shared.wake.notify_one();
        }
        Ok(changed)
    }

    /// Sets the harvested endpoints: (peer affiliate ID, endpoint we observed for
    /// it). Each is pushed under the peer's ID with every publish of our own data.
    /// Returns `false` when unchanged.
    pub fn set_other_endpoints(
        &self,
        endpoints: Vec<(String, SocketAddr)>,
    ) -> Result<bool, ClientError> {
        let changed = self.shared.local().set_others(&self.cipher, endpoints)?;
        if changed {
            self.shared.wake.notify_one();
        }
        Ok(changed)
    }

    /// Withdraws the local affiliate: the next publish (right away when
    /// connected) is an AffiliateDelete. Await [`Self::wait_synced`] to know it
    /// reached the server.
    pub fn delete_local(&self) {
        self.shared.local().delete();
        self.shared.wake.notify_one();
    }

    /// Waits until the server has acknowledged the local state as of this call
    /// (the data set, or the deletion). Wrap it in a timeout: it waits through
    /// reconnects.
    pub async fn wait_synced(&self) -> Result<(), ClientError> {
        let target = self.shared.local().generation();
        let mut rx = self.status.clone();
        rx.wait_for(|s| s.synced_generation >= target)
            .await
            .map(|_| ())
            .map_err(|_| ClientError::Stopped)
    }

    /// A receiver of snapshots; it is notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<ClientSnapshot> {
        self.status.clone()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> ClientSnapshot {
        self.status.borrow().clone()
    }

    /// Stops the client and waits for its task to finish. Published data stays
    /// on the server until its TTL runs out (use [`Self::delete_local`] first to
    /// withdraw it).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            tracing::error!(error = %e, "discovery client task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(
            ServiceEndpoint::parse("https://discovery.talos.dev/").unwrap(),
            "cluster",
            "node",
            ClusterCipher::new(&[0u8; 32]).unwrap(),
        )
    }

    #[test]
    fn talos_defaults() {
        let c = config();
        assert_eq!(c.ttl, Duration::from_secs(1800));
        assert_eq!(c.refresh_interval(), Duration::from_secs(900));
        assert_eq!(c.keepalive_interval(), Duration::from_secs(180));
        assert_eq!(
            c.client_version,
            format!("kubespan/{}", env!("CARGO_PKG_VERSION"))
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn keepalive_never_below_ten_seconds() {
        let mut c = config();
        c.ttl = Duration::from_secs(60);
        assert_eq!(c.keepalive_interval(), Duration::from_secs(10));
        assert_eq!(c.refresh_interval(), Duration::from_secs(30));
    }

    #[test]
    fn validation() {
        let mut c = config();
        c.affiliate_id = "x".repeat(257);
        assert!(matches!(c.validate(), Err(ClientError::AffiliateId(257))));
        let mut c = config();
        c.cluster_id = "x".repeat(256);
        assert!(c.validate().is_ok());
        c.cluster_id.push('x');
        assert!(matches!(c.validate(), Err(ClientError::ClusterId(257))));
        let mut c = config();
        c.ttl = Duration::ZERO;
        assert!(matches!(c.validate(), Err(ClientError::Ttl(_))));
        let mut c = config();
        c.refresh_interval = Some(Duration::ZERO);
        assert!(matches!(
            c.validate(),
            Err(ClientError::RefreshInterval { .. })
        ));
        let mut c = config();
        c.extra_ca_pem = Some(b"junk".to_vec());
        assert!(matches!(c.validate(), Err(ClientError::ExtraCa)));
    }
}
