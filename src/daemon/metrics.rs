//! The daemon's Prometheus metrics, rendered at scrape time from the reconcile
//! loop's [`NodeView`] (so a scrape always shows one consistent reconcile),
//! and the loopback listener that serves them.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::run::NodeView;
use crate::kubespan::peerstate::PeerState;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    r.register(name, help, c);
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    r.register(name, help, g);
}

/// The OpenMetrics text for `view` at `now`.
pub fn render(view: &NodeView, now: SystemTime) -> String {
    let mut r = Registry::with_prefix("kubespan");

    let peers: Family<Labels, Gauge> = Family::default();
    for state in [PeerState::Up, PeerState::Down, PeerState::Unknown] {
        let n = view.statuses.values().filter(|s| s.state == state).count();
        peers
            .get_or_create(&vec![("state", state.as_str().into())])
            .set(n as i64);
    }
    r.register("peers", "KubeSpan peers by state", peers);

    let up: Family<Labels, Gauge> = Family::default();
    let handshake_age: Family<Labels, FloatGauge> = Family::default();
    let rx: Family<Labels, Counter> = Family::default();
    let tx: Family<Labels, Counter> = Family::default();
    for (key, spec) in &view.specs {
        let Some(st) = view.statuses.get(key) else {
            continue;
        };
        let labels = vec![("public_key", key.clone()), ("label", spec.label.clone())];
        up.get_or_create(&labels)
            .set(i64::from(st.state == PeerState::Up));
        if let Some(h) = st.last_handshake {
            let age = now.duration_since(h).unwrap_or_default();
            handshake_age.get_or_create(&labels).set(age.as_secs_f64());
        }
        rx.get_or_create(&labels).inc_by(st.rx_bytes);
        tx.get_or_create(&labels).inc_by(st.tx_bytes);
    }
    r.register("peer_up", "1 when the peer is up", up);
    r.register(
        "peer_last_handshake_age_seconds",
        "Time since the last WireGuard handshake with the peer",
        handshake_age,
    );
    r.register("peer_receive_bytes", "Bytes received from the peer", rx);
    r.register("peer_transmit_bytes", "Bytes sent to the peer", tx);
    counter(
        &mut r,
        "endpoint_rotations",
        "Endpoints chosen for peers (first choices and rotations)",
        view.rotations,
    );

    gauge(
        &mut r,
        "affiliates",
        "Other affiliates known (discovered or kept from the state directory)",
        view.affiliates.len() as i64,
    );
    if let Some(d) = &view.discovery {
        gauge(
            &mut r,
            "discovery_connected",
            "1 while the discovery service session is up",
            i64::from(d.connection.connected),
        );
        let c = &d.counters;
        counter(
            &mut r,
            "discovery_updates_sent",
            "AffiliateUpdate calls acknowledged by the discovery service",
            c.updates_sent,
        );
        counter(
            &mut r,
            "discovery_updates_received",
            "Watch messages received from the discovery service",
            c.watch_messages,
        );
        counter(
            &mut r,
            "discovery_reconnects",
            "Discovery connection attempts after a failure",
            c.reconnects,
        );
        let skipped: Family<Labels, Counter> = Family::default();
        skipped
            .get_or_create(&vec![("reason", "decrypt".into())])
            .inc_by(c.skipped_decrypt);
        skipped
            .get_or_create(&vec![("reason", "decode".into())])
            .inc_by(c.skipped_decode);
        r.register(
            "affiliates_skipped",
            "Affiliates ignored because they did not decrypt (wrong secret) or decode",
            skipped,
        );
    }

    counter(&mut r, "reconciles", "Reconcile passes", view.reconciles);
    counter(
        &mut r,
        "reconcile_errors",
        "Failed data-plane operations during reconciles",
        view.reconcile_errors,
    );
    let secs: Counter<f64, AtomicU64> = Counter::default();
    secs.inc_by(view.reconcile_seconds);
    r.register(
        "reconcile_duration_seconds",
        "Total time spent reconciling (divide by kubespan_reconciles_total for the mean)",
        secs,
    );
    let last = FloatGauge::default();
    last.set(view.last_reconcile_duration.as_secs_f64());
    r.register(
        "reconcile_last_duration_seconds",
        "Duration of the last reconcile",
        last,
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Serves `/metrics` on `addr` until `stop` turns true.
pub async fn serve(
    addr: SocketAddr,
    view: watch::Receiver<NodeView>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = crate::util::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (node.metricsAddress)"))?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let body = render(&view.borrow(), SystemTime::now());
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
    tracing::info!(address = %addr, "metrics listening");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!("metrics server failed: {e}");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubespan::peerspec::PeerSpec;
    use crate::kubespan::peerstate::PeerStatus;
    use std::time::Duration;

    #[test]
    fn renders_peers_by_state_and_per_peer_counters() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut view = NodeView {
            rotations: 4,
            reconciles: 9,
            ..Default::default()
        };
        for (key, state, hs) in [
            ("k1", PeerState::Up, Some(now - Duration::from_secs(12))),
            ("k2", PeerState::Down, None),
        ] {
            view.specs.insert(
                key.into(),
                PeerSpec {
                    node_id: key.into(),
                    address: "fd00::1".parse().unwrap(),
                    allowed_ips: vec![],
                    endpoints: vec![],
                    label: format!("node-{key}"),
                },
            );
            view.statuses.insert(
                key.into(),
                PeerStatus {
                    state,
                    last_handshake: hs,
                    rx_bytes: 100,
                    tx_bytes: 200,
                    ..Default::default()
                },
            );
        }
        let text = render(&view, now);
        for line in [
            r#"kubespan_peers{state="up"} 1"#,
            r#"kubespan_peers{state="down"} 1"#,
            r#"kubespan_peers{state="unknown"} 0"#,
            r#"kubespan_peer_up{public_key="k1",label="node-k1"} 1"#,
            r#"kubespan_peer_up{public_key="k2",label="node-k2"} 0"#,
            r#"kubespan_peer_last_handshake_age_seconds{public_key="k1",label="node-k1"} 12.0"#,
            r#"kubespan_peer_receive_bytes_total{public_key="k1",label="node-k1"} 100"#,
            r#"kubespan_peer_transmit_bytes_total{public_key="k2",label="node-k2"} 200"#,
            "kubespan_endpoint_rotations_total 4",
            "kubespan_reconciles_total 9",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // A peer that never handshook has no age, rather than a huge one.
        assert!(!text.contains(r#"kubespan_peer_last_handshake_age_seconds{public_key="k2""#));
        // No discovery client: no discovery metrics.
        assert!(!text.contains("kubespan_discovery_connected"));
    }
}
