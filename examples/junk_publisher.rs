//! A hostile discovery client for `netns-tests/hostile.sh`: it knows a
//! cluster's ID (which the service sees in the clear) but not its secret, and
//! publishes junk into that cluster:
//! - an affiliate whose data is random bytes;
//! - one whose data is too short to be a sealed blob, with endpoint blobs of
//!   the wrong size and random 16-byte blocks (a bogus length byte once
//!   decrypted);
//! - random data and endpoints under the ID of a real node (`victim`).
//!
//! Usage: junk_publisher <http://host:port> <cluster id> <victim node id> [rounds]
//! Each round rewrites all three; rounds are 200 ms apart.

use std::time::Duration;

use bytes::Bytes;
use kubespan::proto::server::AffiliateUpdateRequest;
use kubespan::proto::server::cluster_client::ClusterClient;

fn random(n: usize) -> Bytes {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("random bytes");
    Bytes::from(b)
}

fn update(cluster: &str, id: &str, data: Bytes, endpoints: Vec<Bytes>) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: cluster.into(),
        affiliate_id: id.into(),
        affiliate_data: Some(data),
        affiliate_endpoints: endpoints,
        ttl: Some(prost_types::Duration {
            seconds: 300,
            nanos: 0,
        }),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoint, cluster, victim, rest @ ..] = args.as_slice() else {
        eprintln!(
            "usage: junk_publisher <http://host:port> <cluster id> <victim node id> [rounds]"
        );
        std::process::exit(2);
    };
    let rounds: u32 = rest.first().map_or(Ok(1), |r| r.parse())?;
    let mut client = ClusterClient::connect(endpoint.clone()).await?;
    let mut sent = 0;
    for round in 0..rounds {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for req in [
            update(cluster, "junk-random-data", random(300), vec![random(32)]),
            update(
                cluster,
                "junk-short-blobs",
                random(5),
                vec![random(17), random(16), random(1)],
            ),
            update(cluster, victim, random(200), vec![random(16), random(32)]),
        ] {
            client.affiliate_update(req).await?;
            sent += 1;
        }
    }
    println!("sent {sent} junk updates");
    Ok(())
}
