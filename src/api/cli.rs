//! `kubespan get` and `kubespan status`: clients of the daemon's local API.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tabwriter::TabWriter;
use tonic::transport::{Channel, Endpoint, Uri};

use super::resources::{self, ResourceType};
use super::status::{self, StatusReport, short_duration};
use crate::config::Settings;
use crate::proto::api as pb;
use crate::proto::api::api_client::ApiClient;

#[derive(clap::Args, Debug)]
pub struct SocketArgs {
    /// The daemon's API socket [default: node.apiSocket of --config if given,
    /// else /run/kubespan/kubespan.sock].
    #[arg(long, env = "KUBESPAN_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Read the socket path from this daemon config (node.apiSocket).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

impl SocketArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.socket {
            return Ok(p.clone());
        }
        match &self.config {
            Some(c) => Ok(Settings::load(c)?.api_socket),
            None => Ok(PathBuf::from(super::DEFAULT_SOCKET)),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// identities, affiliates, members, kubespanidentities (ksi),
    /// kubespanpeerspecs (ksps), kubespanpeerstatuses (kspst, peers),
    /// kubespanendpoints (kse); Talos type names work too.
    pub resource: String,
    /// Only this resource (default: all of the type).
    pub id: Option<String>,
    /// Output format.
    #[arg(long, short, default_value = "table", value_parser = ["table", "yaml", "json"])]
    pub output: String,
    /// Keep printing changes until interrupted.
    #[arg(long, short)]
    pub watch: bool,
    /// Resource namespace: `cluster-raw` shows affiliates as each registry
    /// reported them (`service/<node id>`).
    #[arg(long, short, default_value = "")]
    pub namespace: String,
    /// Include secret fields (the WireGuard private key of kubespanidentities).
    #[arg(long)]
    pub show_secrets: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Output format.
    #[arg(long, short, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    #[command(flatten)]
    pub socket: SocketArgs,
}

/// Connects to the daemon, turning the usual failures into advice.
pub async fn connect(path: &Path) -> anyhow::Result<ApiClient<Channel>> {
    if let Err(e) = tokio::net::UnixStream::connect(path).await {
        use std::io::ErrorKind::*;
        match e.kind() {
            NotFound => anyhow::bail!(
                "the kubespan daemon is not running: no API socket at {} (start it with `kubespan run`, or point --socket at its node.apiSocket)",
                path.display()
            ),
            PermissionDenied => anyhow::bail!(
                "permission denied on {}: the API is root-only, run this as root",
                path.display()
            ),
            ConnectionRefused => anyhow::bail!(
                "the kubespan daemon is not running: {} is a stale socket",
                path.display()
            ),
            _ => return Err(e).with_context(|| format!("cannot connect to {}", path.display())),
        }
    }
    let path = path.to_owned();
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://kubespan.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .context("cannot connect to the kubespan daemon")?;
    Ok(ApiClient::new(channel))
}

/// A gRPC error as the daemon worded it.
fn api_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// One resource as `-o yaml|json` prints it (talosctl's shape).
fn document(r: &pb::Resource) -> anyhow::Result<Value> {
    let spec: Value = serde_json::from_str(&r.spec_json).context("the daemon sent a bad spec")?;
    Ok(json!({
        "metadata": {
            "namespace": r.namespace,
            "type": r.r#type,
            "id": r.id,
            "version": r.version,
        },
        "spec": spec,
    }))
}

struct Printer<'a> {
    t: &'static ResourceType,
    output: &'a str,
    watch: bool,
    /// Table lines printed so far.
    shown: std::cell::RefCell<Vec<String>>,
}

impl Printer<'_> {
    fn header(&self) -> String {
        let mut h = String::new();
        if self.watch {
            h.push_str("EVENT\t");
        }
        h.push_str("NAMESPACE\tTYPE\tID\tVERSION");
        for c in self.t.columns {
            h.push('\t');
            h.push_str(c.header);
        }
        h
    }

    fn row(&self, event: Option<&str>, r: &pb::Resource) -> anyhow::Result<String> {
        let spec: Value =
            serde_json::from_str(&r.spec_json).context("the daemon sent a bad spec")?;
        let mut line = String::new();
        if let Some(e) = event {
            line.push_str(e);
            line.push('\t');
        }
        line.push_str(&format!(
            "{}\t{}\t{}\t{}",
            r.namespace, self.t.kind, r.id, r.version
        ));
        for c in self.t.columns {
            line.push('\t');
            line.push_str(&resources::cell(&spec, c.pointer));
        }
        Ok(line)
    }

    /// Prints resources (with their watch events); tables are aligned per call.
    fn print(
        &self,
        items: &[(Option<&str>, &pb::Resource)],
        with_header: bool,
    ) -> anyhow::Result<()> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match self.output {
            "table" => {
                // Lines printed before (a watch's first table) are laid out
                // again with the new ones, so that later lines line up with
                // them; only the new lines are printed.
                let mut shown = self.shown.borrow_mut();
                let before = shown.len();
                if with_header {
                    shown.push(self.header());
                }
                for (e, r) in items {
                    shown.push(self.row(*e, r)?);
                }
                let mut tw = TabWriter::new(Vec::new()).padding(3);
                for line in shown.iter() {
                    writeln!(tw, "{line}")?;
                }
                let text = String::from_utf8(tw.into_inner().context("table output")?)?;
                for line in text.lines().skip(before) {
                    writeln!(out, "{}", line.trim_end())?;
                }
                if !with_header {
                    // Streamed lines are not kept: a long watch stays small.
                    shown.truncate(before);
                }
            }
            "yaml" => {
                for (e, r) in items {
                    let mut doc = document(r)?;
                    if let Some(e) = e {
                        doc["event"] = json!(e);
                    }
                    write!(out, "---\n{}", serde_yaml_ng::to_string(&doc)?)?;
                }
            }
            _ => {
                for (e, r) in items {
                    let mut doc = document(r)?;
                    if let Some(e) = e {
                        doc["event"] = json!(e);
                    }
                    writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
                }
            }
        }
        out.flush()?;
        Ok(())
    }
}

pub fn get(args: GetArgs) -> anyhow::Result<()> {
    let t = resources::lookup(&args.resource).with_context(|| {
        format!(
            "unknown resource {:?}; known: {}",
            args.resource,
            resources::type_names().join(", ")
        )
    })?;
    let path = args.socket.path()?;
    runtime()?.block_on(async {
        let mut client = connect(&path).await?;
        let printer = Printer {
            t,
            output: &args.output,
            watch: args.watch,
            shown: Default::default(),
        };
        if args.watch {
            return watch(&mut client, &printer, &args).await;
        }
        let list = match &args.id {
            Some(id) => vec![
                client
                    .get(pb::GetRequest {
                        r#type: t.name.into(),
                        id: id.clone(),
                        include_secrets: args.show_secrets,
                        namespace: args.namespace.clone(),
                    })
                    .await
                    .map_err(api_error)?
                    .into_inner(),
            ],
            None => {
                client
                    .list(pb::ListRequest {
                        r#type: t.name.into(),
                        include_secrets: args.show_secrets,
                        namespace: args.namespace.clone(),
                    })
                    .await
                    .map_err(api_error)?
                    .into_inner()
                    .resources
            }
        };
        let items: Vec<_> = list.iter().map(|r| (None, r)).collect();
        printer.print(&items, true)
    })
}

async fn watch(
    client: &mut ApiClient<Channel>,
    printer: &Printer<'_>,
    args: &GetArgs,
) -> anyhow::Result<()> {
    use pb::watch_event::Kind;
    let mut stream = client
        .watch(pb::ListRequest {
            r#type: printer.t.name.into(),
            include_secrets: args.show_secrets,
            namespace: args.namespace.clone(),
        })
        .await
        .map_err(api_error)?
        .into_inner();
    let wanted = |r: &pb::Resource| args.id.as_ref().is_none_or(|id| *id == r.id);
    let mut initial = Vec::new();
    let mut bootstrapped = false;
    while let Some(ev) = stream.message().await.map_err(api_error)? {
        let kind = Kind::try_from(ev.kind).unwrap_or(Kind::Updated);
        let word = match kind {
            Kind::Created => "created",
            Kind::Updated => "updated",
            Kind::Destroyed => "destroyed",
            Kind::Bootstrapped => {
                let items: Vec<_> = initial.iter().map(|r| (Some("created"), r)).collect();
                printer.print(&items, true)?;
                bootstrapped = true;
                continue;
            }
        };
        let Some(r) = ev.resource.filter(|r| wanted(r)) else {
            continue;
        };
        if bootstrapped {
            printer.print(&[(Some(word), &r)], false)?;
        } else {
            initial.push(r);
        }
    }
    anyhow::bail!("the daemon ended the watch (it stopped?)")
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(secs: Option<u64>) -> String {
    secs.map_or_else(|| "never".into(), |s| format!("{} ago", short_duration(s)))
}

/// The text form of `kubespan status`.
pub fn render_status(r: &StatusReport) -> String {
    let mut tw = TabWriter::new(Vec::new()).padding(2);
    let up = r.peers.iter().filter(|p| p.state == "up").count();
    let verdict = if status::healthy(r) {
        "healthy"
    } else {
        "DEGRADED"
    };
    let _ = writeln!(tw, "mesh:\t{verdict}: {up} of {} peers up", r.peers.len());
    let _ = writeln!(tw, "node:\t{}", r.node_id);
    let _ = writeln!(tw, "address:\t{}", r.address);
    let _ = writeln!(tw, "public key:\t{}", r.public_key);
    let _ = writeln!(tw, "backend:\t{}", r.backend);
    let d = &r.discovery;
    let discovery = if !d.enabled {
        "disabled (peers from the state directory only)".to_string()
    } else if d.connected {
        format!(
            "{}: connected for {}, last refresh {}",
            d.endpoint,
            short_duration(d.connected_for_seconds.unwrap_or(0)),
            ago(d.last_refresh_seconds_ago)
        )
    } else {
        format!(
            "{}: NOT connected ({})",
            d.endpoint,
            d.last_error.as_deref().unwrap_or("connecting")
        )
    };
    let _ = writeln!(tw, "discovery:\t{discovery}");
    if let Some(ip) = &d.public_ip {
        let _ = writeln!(tw, "public IP:\t{ip} (as the discovery service sees it)");
    }
    let _ = writeln!(
        tw,
        "affiliates:\t{} known, {} skipped (wrong secret or bad data)",
        d.affiliates, r.affiliates_skipped
    );
    let _ = writeln!(
        tw,
        "reconciles:\t{} ({} errors)",
        r.reconciles, r.reconcile_errors
    );
    let mut text = String::from_utf8(tw.into_inner().unwrap_or_default()).unwrap_or_default();
    if r.peers.is_empty() {
        text.push_str("\nno peers yet\n");
        return text;
    }
    let mut tw = TabWriter::new(Vec::new()).padding(2);
    let _ = writeln!(
        tw,
        "PEER\tSTATE\tENDPOINT\tTRIED\tHANDSHAKE\tRX\tTX\tWHY NOT UP"
    );
    for p in &r.peers {
        let label = if p.label.is_empty() {
            p.public_key.as_str()
        } else {
            p.label.as_str()
        };
        let _ = writeln!(
            tw,
            "{label}\t{}\t{}\t{}/{}\t{}\t{}\t{}\t{}",
            p.state,
            p.endpoint.as_deref().unwrap_or("-"),
            p.tried,
            p.candidates,
            ago(p.last_handshake_seconds_ago),
            bytes(p.receive_bytes),
            bytes(p.transmit_bytes),
            if p.reason.is_empty() { "-" } else { &p.reason },
        );
    }
    text.push('\n');
    text.push_str(&String::from_utf8(tw.into_inner().unwrap_or_default()).unwrap_or_default());
    text
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let path = args.socket.path()?;
    runtime()?.block_on(async {
        let mut client = connect(&path).await?;
        let resp = client
            .status(pb::StatusRequest {})
            .await
            .map_err(api_error)?
            .into_inner();
        if args.output == "json" {
            let v: Value = serde_json::from_str(&resp.status_json)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let report: StatusReport = serde_json::from_str(&resp.status_json)
            .context("the daemon sent a status this client does not understand")?;
        print!("{}", render_status(&report));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::{DiscoveryStatus, PeerLine};

    #[test]
    fn status_text_names_the_problem() {
        let r = StatusReport {
            node_id: "nid".into(),
            public_key: "pk".into(),
            address: "fd7f::1".into(),
            backend: "userspace".into(),
            discovery: DiscoveryStatus {
                enabled: true,
                endpoint: "http://10.0.0.1:3000".into(),
                connected: false,
                last_error: Some("connection refused".into()),
                affiliates: 2,
                ..Default::default()
            },
            peers: vec![PeerLine {
                label: "node-2".into(),
                public_key: "k2".into(),
                state: "down".into(),
                endpoint: Some("10.0.0.2:51820".into()),
                candidates: 3,
                tried: 5,
                last_handshake_seconds_ago: None,
                receive_bytes: 0,
                transmit_bytes: 2048,
                reason: "no handshake yet; rotating through 3 endpoint(s)".into(),
            }],
            affiliates_skipped: 1,
            reconciles: 10,
            reconcile_errors: 0,
        };
        let text = render_status(&r);
        assert!(text.contains("DEGRADED: 0 of 1 peers up"), "{text}");
        assert!(
            text.contains("NOT connected (connection refused)"),
            "{text}"
        );
        assert!(text.contains("2 known, 1 skipped"), "{text}");
        let row = text.lines().find(|l| l.starts_with("node-2")).unwrap();
        for part in [
            "down",
            "10.0.0.2:51820",
            "5/3",
            "never",
            "0 B",
            "2.0 KiB",
            "rotating",
        ] {
            assert!(row.contains(part), "{part} missing in {row:?}");
        }
    }
}
