//! Discovery service benchmark, driven by `scripts/bench-discovery`.
//!
//! Starts the real `kubespan discovery-service` process on loopback (rate limit
//! off, no snapshots) and measures, from a separate client process:
//! 1. AffiliateUpdate throughput with 16 concurrent clients (one connection each);
//! 2. Watch fan-out latency: from sending an update to the last of 1000 watchers
//!    receiving it (p50/p99 over many updates);
//! 3. server RSS holding 1,000 clusters × 10 affiliates × 2 KiB of data.
//!
//! Usage: bench_discovery <path to kubespan binary>

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kubespan::proto::server::cluster_client::ClusterClient;
use kubespan::proto::server::*;
use tonic::transport::{Channel, Endpoint};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str) -> (Server, SocketAddr) {
    let mut child = Command::new(bin)
        .args([
            "discovery-service",
            "--addr",
            "127.0.0.1:0",
            "--landing-addr=",
        ])
        .args([
            "--metrics-addr=",
            "--snapshots-enabled=false",
            "--rate-limit",
            "0",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the discovery service");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let server = Server(child);
    let addr = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(rest) = line.split("grpc=Some(").nth(1) {
            break rest.split(')').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (server, addr)
}

async fn connect(addr: SocketAddr) -> ClusterClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect");
    ClusterClient::new(ch).max_decoding_message_size(64 << 20)
}

fn update(cluster: String, id: String, data: Vec<u8>) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: cluster,
        affiliate_id: id,
        affiliate_data: Some(data.into()),
        affiliate_endpoints: vec![vec![7u8; 16].into()],
        ttl: Some(prost_types::Duration {
            seconds: 1800,
            nanos: 0,
        }),
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn throughput(addr: SocketAddr) -> f64 {
    const CLIENTS: usize = 16;
    const WARMUP: Duration = Duration::from_secs(1);
    const RUN: Duration = Duration::from_secs(5);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(addr).await;
            let mut i = 0u64;
            loop {
                let elapsed = start.elapsed();
                if elapsed > WARMUP + RUN {
                    break;
                }
                // Distinct data each time, as a changed affiliate would be.
                let mut data = vec![0u8; 512];
                data[..8].copy_from_slice(&i.to_le_bytes());
                let req = update(format!("bench-{c}"), format!("aff-{}", i % 64), data);
                client.affiliate_update(req).await.expect("update");
                if elapsed > WARMUP {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / RUN.as_secs_f64()
}

async fn fanout(addr: SocketAddr) -> (Duration, Duration, Duration) {
    const WATCHERS: usize = 1000;
    const CONNECTIONS: usize = 50;
    const UPDATES: u64 = 200;
    let cluster = "fanout".to_string();
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(connect(addr).await);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let mut ready = Vec::new();
    for w in 0..WATCHERS {
        let mut c = channels[w % CONNECTIONS].clone();
        let tx = tx.clone();
        let cluster = cluster.clone();
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        ready.push(rrx);
        tokio::spawn(async move {
            let mut s = c
                .watch(WatchRequest {
                    cluster_id: cluster,
                })
                .await
                .expect("watch")
                .into_inner();
            s.message().await.expect("snapshot");
            let _ = rtx.send(());
            while let Ok(Some(m)) = s.message().await {
                if let Some(a) = m.affiliates.first()
                    && a.data.len() >= 8
                {
                    let seq = u64::from_le_bytes(a.data[..8].try_into().unwrap());
                    let _ = tx.send((seq, Instant::now()));
                }
            }
        });
    }
    drop(tx);
    for r in ready {
        r.await.expect("watcher ready");
    }
    let mut writer = connect(addr).await;
    let mut latencies = Vec::new();
    for seq in 0..UPDATES {
        let mut data = vec![0u8; 1024];
        data[..8].copy_from_slice(&seq.to_le_bytes());
        let sent = Instant::now();
        writer
            .affiliate_update(update(cluster.clone(), "writer".into(), data))
            .await
            .expect("update");
        let mut got = 0;
        let mut last = sent;
        while got < WATCHERS {
            let (s, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("fan-out within 10 s")
                .expect("watchers alive");
            if s == seq {
                got += 1;
                last = last.max(at);
            }
        }
        latencies.push(last - sent);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latencies.sort();
    (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap(),
    )
}

async fn memory(addr: SocketAddr, pid: u32) -> (u64, u64, u64) {
    const CLUSTERS: usize = 1000;
    const AFFILIATES: usize = 10;
    const DATA: usize = 2048;
    let idle = rss_kib(pid);
    let mut tasks = Vec::new();
    for part in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            for cl in (part..CLUSTERS).step_by(4) {
                for a in 0..AFFILIATES {
                    let req = update(
                        format!("mem-{cl:04}"),
                        format!("node-{a}"),
                        vec![a as u8; DATA],
                    );
                    c.affiliate_update(req).await.expect("update");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let payload = (CLUSTERS * AFFILIATES * DATA) as u64;
    (idle, rss_kib(pid), payload)
}

#[tokio::main]
async fn main() {
    let bin = std::env::args()
        .nth(1)
        .expect("usage: bench_discovery <kubespan binary>");

    let (srv, addr) = spawn(&bin);
    let ups = throughput(addr).await;
    drop(srv);

    let (srv, addr) = spawn(&bin);
    let (p50, p99, max) = fanout(addr).await;
    drop(srv);

    let (srv, addr) = spawn(&bin);
    let (idle, loaded, payload) = memory(addr, srv.0.id()).await;
    drop(srv);

    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    let ratio = loaded as f64 * 1024.0 / payload as f64;
    println!("| measurement | result | target |");
    println!("| --- | --- | --- |");
    println!(
        "| AffiliateUpdate throughput, 16 clients | {ups:.0} updates/s | ≥ 20,000 updates/s |"
    );
    println!("| Watch fan-out to 1000 watchers, p50 | {} | |", ms(p50));
    println!(
        "| Watch fan-out to 1000 watchers, p99 (max) | {} ({}) | ≤ 10 ms |",
        ms(p99),
        ms(max)
    );
    println!("| server RSS idle | {:.1} MiB | |", idle as f64 / 1024.0);
    println!(
        "| server RSS, 1,000 clusters × 10 affiliates × 2 KiB ({:.1} MiB of payload) | {:.1} MiB ({ratio:.2}× payload) | ≤ 3× payload |",
        payload as f64 / 1048576.0,
        loaded as f64 / 1024.0
    );
}
