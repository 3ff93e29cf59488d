//! Prometheus metrics of the discovery service, under the upstream names so
//! existing dashboards keep working.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::snapshot::SnapshotSummary;
use super::state::{GcReport, State};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub hello_requests: Family<Labels, Counter>,
    clusters: Gauge,
    affiliates: Gauge,
    endpoints: Gauge,
    subscriptions: Gauge,
    gc_runs: Counter,
    gc_clusters: Counter,
    gc_affiliates: Counter,
    storage_ops: Family<Labels, Counter>,
    storage_size: Family<Labels, Gauge>,
    storage_clusters: Family<Labels, Gauge>,
    storage_affiliates: Family<Labels, Gauge>,
    storage_endpoints: Family<Labels, Gauge>,
    storage_duration: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    rate_limited: Counter,
    grpc_started: Family<Labels, Counter>,
    grpc_handled: Family<Labels, Counter>,
    grpc_received: Family<Labels, Counter>,
    grpc_sent: Family<Labels, Counter>,
    grpc_seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

fn handling_histogram() -> Histogram {
    Histogram::new([0.01, 0.1, 0.25, 0.5, 1.0, 2.5])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            hello_requests: Family::default(),
            clusters: Gauge::default(),
            affiliates: Gauge::default(),
            endpoints: Gauge::default(),
            subscriptions: Gauge::default(),
            gc_runs: Counter::default(),
            gc_clusters: Counter::default(),
            gc_affiliates: Counter::default(),
            storage_ops: Family::default(),
            storage_size: Family::default(),
            storage_clusters: Family::default(),
            storage_affiliates: Family::default(),
            storage_endpoints: Family::default(),
            storage_duration: Family::default(),
            rate_limited: Counter::default(),
            grpc_started: Family::default(),
            grpc_handled: Family::default(),
            grpc_received: Family::default(),
            grpc_sent: Family::default(),
            grpc_seconds: Family::new_with_constructor(handling_histogram),
        };
        let r = &mut m.registry;
        // prometheus-client appends `_total` to counters itself.
        r.register(
            "discovery_server_hello_requests",
            "Hello requests by client version",
            m.hello_requests.clone(),
        );
        r.register(
            "discovery_state_clusters",
            "Clusters held",
            m.clusters.clone(),
        );
        r.register(
            "discovery_state_affiliates",
            "Affiliates held",
            m.affiliates.clone(),
        );
        r.register(
            "discovery_state_endpoints",
            "Endpoints held",
            m.endpoints.clone(),
        );
        r.register(
            "discovery_state_subscriptions",
            "Open Watch streams",
            m.subscriptions.clone(),
        );
        r.register("discovery_state_gc_runs", "GC passes", m.gc_runs.clone());
        r.register(
            "discovery_state_gc_clusters",
            "Clusters removed by GC",
            m.gc_clusters.clone(),
        );
        r.register(
            "discovery_state_gc_affiliates",
            "Affiliates expired by GC",
            m.gc_affiliates.clone(),
        );
        r.register(
            "discovery_storage_operations",
            "Snapshot saves and loads by status",
            m.storage_ops.clone(),
        );
        r.register(
            "discovery_storage_last_snapshot_size_bytes",
            "Size of the last snapshot",
            m.storage_size.clone(),
        );
        r.register(
            "discovery_storage_last_operation_clusters",
            "Clusters in the last snapshot operation",
            m.storage_clusters.clone(),
        );
        r.register(
            "discovery_storage_last_operation_affiliates",
            "Affiliates in the last snapshot operation",
            m.storage_affiliates.clone(),
        );
        r.register(
            "discovery_storage_last_operation_endpoints",
            "Endpoints in the last snapshot operation",
            m.storage_endpoints.clone(),
        );
        r.register(
            "discovery_storage_last_operation_duration_seconds",
            "Duration of the last snapshot operation",
            m.storage_duration.clone(),
        );
        r.register(
            "discovery_ratelimit_rejected",
            "Requests refused by the per-IP rate limiter",
            m.rate_limited.clone(),
        );
        r.register(
            "grpc_server_started",
            "RPCs started",
            m.grpc_started.clone(),
        );
        r.register(
            "grpc_server_handled",
            "RPCs completed",
            m.grpc_handled.clone(),
        );
        r.register(
            "grpc_server_msg_received",
            "Messages received",
            m.grpc_received.clone(),
        );
        r.register("grpc_server_msg_sent", "Messages sent", m.grpc_sent.clone());
        r.register(
            "grpc_server_handling_seconds",
            "RPC handling time (streams: until the stream ends)",
            m.grpc_seconds.clone(),
        );
        m
    }

    pub fn record_gc(&self, r: GcReport) {
        self.gc_runs.inc();
        self.gc_clusters.inc_by(r.clusters as u64);
        self.gc_affiliates.inc_by(r.affiliates as u64);
    }

    pub fn record_storage(
        &self,
        op: &'static str,
        result: Result<SnapshotSummary, ()>,
        took: Duration,
    ) {
        let status = if result.is_ok() { "success" } else { "error" };
        self.storage_ops
            .get_or_create(&vec![("operation", op.into()), ("status", status.into())])
            .inc();
        if let Ok(s) = result {
            let l = vec![("operation", op.to_string())];
            self.storage_size.get_or_create(&l).set(s.bytes as i64);
            self.storage_clusters
                .get_or_create(&l)
                .set(s.clusters as i64);
            self.storage_affiliates
                .get_or_create(&l)
                .set(s.affiliates as i64);
            self.storage_endpoints
                .get_or_create(&l)
                .set(s.endpoints as i64);
            self.storage_duration
                .get_or_create(&l)
                .set(took.as_secs_f64());
        }
    }

    pub fn record_rate_limited(&self) {
        self.rate_limited.inc();
    }

    fn rpc_labels(method: &'static str, kind: &'static str) -> Labels {
        vec![
            ("grpc_method", method.into()),
            ("grpc_service", "sidero.discovery.server.Cluster".into()),
            ("grpc_type", kind.into()),
        ]
    }

    pub fn rpc_started(&self, method: &'static str, kind: &'static str) {
        let l = Self::rpc_labels(method, kind);
        self.grpc_started.get_or_create(&l).inc();
        self.grpc_received.get_or_create(&l).inc();
    }

    pub fn rpc_sent(&self, method: &'static str, kind: &'static str) {
        self.grpc_sent
            .get_or_create(&Self::rpc_labels(method, kind))
            .inc();
    }

    pub fn rpc_handled(
        &self,
        method: &'static str,
        kind: &'static str,
        code: tonic::Code,
        took: Duration,
    ) {
        let l = Self::rpc_labels(method, kind);
        self.grpc_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        let mut l = l;
        l.push(("grpc_code", format!("{code:?}")));
        self.grpc_handled.get_or_create(&l).inc();
    }

    /// Prometheus text exposition, with the state gauges read now.
    pub fn render(&self, state: &State) -> String {
        let s = state.stats();
        self.clusters.set(s.clusters as i64);
        self.affiliates.set(s.affiliates as i64);
        self.endpoints.set(s.endpoints as i64);
        self.subscriptions.set(s.subscriptions as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub type SharedMetrics = Arc<Metrics>;
