//! Publishes synthetic KubeSpan affiliates to a discovery service, for
//! `scripts/bench-footprint`: a daemon in the same cluster then sees them as
//! peers without running a daemon per peer.
//!
//! Each affiliate is encoded and sealed with the cluster secret by the crate's
//! own `kubespan::core` code, exactly as a node publishes itself, and sent with
//! the generated gRPC client (AffiliateUpdate, TTL 30 min). The program exits
//! once every update is acknowledged.
//!
//! Usage: synthetic_peers <http://host:port> <cluster id> <cluster secret (base64)> <peers file> [first]
//!
//! The peers file has one line per peer: `<WireGuard public key> <endpoint>`
//! (`-` for no endpoint). The peer on line i (counting from `first`, default 1)
//! gets the KubeSpan address `<cluster subnet>::5:<i>` and a fresh random node ID;
//! give later batches a higher `first` so their addresses do not overlap.

use std::net::{Ipv6Addr, SocketAddr};

use kubespan::core::base62::generate_node_id;
use kubespan::core::cipher::ClusterCipher;
use kubespan::core::types::{AffiliateSpec, KubeSpanInfo};
use kubespan::core::ula::kubespan_subnet;
use kubespan::proto::server::AffiliateUpdateRequest;
use kubespan::proto::server::cluster_client::ClusterClient;

fn usage() -> ! {
    eprintln!(
        "usage: synthetic_peers <http://host:port> <cluster id> <cluster secret> <peers file> [first]"
    );
    std::process::exit(2)
}

/// `<subnet>::5:<i>`: far from EUI-64 addresses, so never a real node's.
fn synthetic_address(subnet: Ipv6Addr, i: u16) -> Ipv6Addr {
    let mut seg = subnet.segments();
    seg[4] = 0;
    seg[5] = 0;
    seg[6] = 5;
    seg[7] = i;
    Ipv6Addr::from(seg)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, cluster_id, secret, file, first) = match args.as_slice() {
        [u, c, s, f] => (u, c, s, f, 1),
        [u, c, s, f, first] => (u, c, s, f, first.parse::<usize>()?),
        _ => usage(),
    };
    let cipher = ClusterCipher::from_secret_base64(secret)?;
    let subnet = kubespan_subnet(cluster_id).addr();
    let mut client = ClusterClient::connect(url.clone()).await?;
    let text = std::fs::read_to_string(file)?;
    let mut published = 0;
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let mut fields = line.split_whitespace();
        let (Some(public_key), Some(endpoint)) = (fields.next(), fields.next()) else {
            anyhow::bail!("{file}: line {}: want `<public key> <endpoint|->`", i + 1);
        };
        let endpoints: Vec<SocketAddr> = match endpoint {
            "-" => Vec::new(),
            e => vec![e.parse()?],
        };
        let node_id = generate_node_id().map_err(|e| anyhow::anyhow!("node ID: {e}"))?;
        let spec = AffiliateSpec {
            node_id: node_id.clone(),
            hostname: format!("synthetic{i}"),
            nodename: format!("synthetic{i}"),
            machine_type: "worker".into(),
            operating_system: "synthetic".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: public_key.to_string(),
                address: synthetic_address(subnet, u16::try_from(first + i)?),
                additional_addresses: Vec::new(),
                exclude_advertised_networks: Vec::new(),
                endpoints: Vec::new(),
            }),
            ..Default::default()
        };
        let req = AffiliateUpdateRequest {
            cluster_id: cluster_id.clone(),
            affiliate_id: node_id,
            affiliate_data: Some(cipher.encrypt_affiliate(&spec)?.into()),
            affiliate_endpoints: endpoints
                .iter()
                .map(|&e| cipher.encrypt_endpoint(e).into())
                .collect(),
            ttl: Some(prost_types::Duration {
                seconds: 1800,
                nanos: 0,
            }),
        };
        client.affiliate_update(req).await?;
        published += 1;
    }
    println!("published {published} synthetic affiliates");
    Ok(())
}
