//! The daemon's side of the local API: a gRPC server on a Unix socket that
//! serves the resources of [`super::resources`] and the status report, from
//! the reconcile loop's [`NodeView`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use super::resources::{self, Event, EventKind, Resource, ResourceType, Secrets, Store};
use super::status;
use crate::daemon::run::NodeView;
use crate::proto::api as pb;
use crate::proto::api::api_server::{Api, ApiServer};

/// Watchers further behind than this many events are cut off (they can watch again).
const WATCH_BUFFER: usize = 1024;

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    view: watch::Receiver<NodeView>,
    /// Ends the Watch streams on shutdown (graceful shutdown waits for them).
    stop: watch::Receiver<bool>,
}

impl Shared {
    fn refresh(&self, private_key: &str) {
        let next = resources::build(&self.view.borrow(), &Secrets { private_key });
        // Update and broadcast under the lock, so a Watch that lists and
        // subscribes under the same lock misses nothing and sees nothing twice.
        let mut store = self.store.lock().expect("store lock");
        for e in store.update(next) {
            let _ = self.events.send(e);
        }
    }
}

fn to_pb(r: &Resource, include_secrets: bool) -> pb::Resource {
    let r = r.redacted(include_secrets);
    pb::Resource {
        namespace: r.key.namespace,
        r#type: r.key.type_name,
        id: r.key.id,
        version: r.version,
        spec_json: r.spec.to_string(),
    }
}

/// The type and namespace a request names, or the error the CLI shows.
fn resolve(type_name: &str, namespace: &str) -> Result<(&'static ResourceType, String), Status> {
    let t = resources::lookup(type_name).ok_or_else(|| {
        Status::not_found(format!(
            "unknown resource type {type_name:?}; known: {}",
            resources::type_names().join(", ")
        ))
    })?;
    let ns = if namespace.is_empty() {
        t.default_namespace
    } else {
        namespace
    };
    if !t.namespaces.contains(&ns) {
        return Err(Status::invalid_argument(format!(
            "{} live in namespace {}, not {ns:?}",
            t.aliases[0],
            t.namespaces.join(" or ")
        )));
    }
    Ok((t, ns.to_owned()))
}

struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Api for Service {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Resource>, Status> {
        let req = req.into_inner();
        let (t, ns) = resolve(&req.r#type, &req.namespace)?;
        let store = self.shared.store.lock().expect("store lock");
        let r = store.get(&ns, t.name, &req.id).ok_or_else(|| {
            Status::not_found(format!(
                "{} {:?} not found in namespace {ns}",
                t.aliases[0], req.id
            ))
        })?;
        Ok(Response::new(to_pb(r, req.include_secrets)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let req = req.into_inner();
        let (t, ns) = resolve(&req.r#type, &req.namespace)?;
        let store = self.shared.store.lock().expect("store lock");
        let resources = store
            .list(&ns, t.name)
            .map(|r| to_pb(r, req.include_secrets))
            .collect();
        Ok(Response::new(pb::ListResponse { resources }))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let (t, ns) = resolve(&req.r#type, &req.namespace)?;
        let secrets = req.include_secrets;
        let event = move |kind: pb::watch_event::Kind, r: Option<&Resource>| pb::WatchEvent {
            kind: kind as i32,
            resource: r.map(|r| to_pb(r, secrets)),
        };
        let (initial, mut events) = {
            let store = self.shared.store.lock().expect("store lock");
            let initial: Vec<pb::WatchEvent> = store
                .list(&ns, t.name)
                .map(|r| event(pb::watch_event::Kind::Created, Some(r)))
                .collect();
            (initial, self.shared.events.subscribe())
        };
        let (tx, rx) = mpsc::channel(64);
        let type_name = t.name;
        let mut stop = self.shared.stop.clone();
        tokio::spawn(async move {
            for e in initial {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            let done = event(pb::watch_event::Kind::Bootstrapped, None);
            if tx.send(Ok(done)).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    e = events.recv() => e,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let e = match next {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::aborted(format!(
                                "this watch fell {n} events behind; watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if e.resource.key.type_name != type_name || e.resource.key.namespace != ns {
                    continue;
                }
                let kind = match e.kind {
                    EventKind::Created => pb::watch_event::Kind::Created,
                    EventKind::Updated => pb::watch_event::Kind::Updated,
                    EventKind::Destroyed => pb::watch_event::Kind::Destroyed,
                };
                if tx.send(Ok(event(kind, Some(&e.resource)))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let report = status::report(&self.shared.view.borrow(), SystemTime::now());
        let status_json = serde_json::to_string(&report)
            .map_err(|e| Status::internal(format!("cannot encode the status: {e}")))?;
        Ok(Response::new(pb::StatusResponse { status_json }))
    }
}

/// Creates the socket: refuses when another daemon answers on it, replaces a
/// stale one, and makes it reachable by root only (mode 0600, set before the
/// socket appears under its name).
fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the API socket directory {}", dir.display()))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another kubespan daemon serves the API at {}: give this one its own node.apiSocket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)
        .with_context(|| format!("cannot create the API socket {}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot create the API socket {}", path.display()));
    }
    Ok(listener)
}

/// The running API server.
pub struct ApiHandle {
    path: PathBuf,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    updater: tokio::task::JoinHandle<()>,
}

impl ApiHandle {
    /// Stops serving and removes the socket.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.updater.abort();
        let mut server = self.server;
        match tokio::time::timeout(Duration::from_secs(3), &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("local API server: {e}"),
            Ok(Err(e)) => tracing::warn!("local API server task: {e}"),
            Err(_) => {
                tracing::warn!("local API clients did not disconnect in time");
                server.abort();
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Serves the API on `path` until [`ApiHandle::shutdown`].
pub fn start(
    path: &Path,
    view: watch::Receiver<NodeView>,
    private_key: String,
) -> anyhow::Result<ApiHandle> {
    let listener = bind(path)?;
    let (events, _) = broadcast::channel(WATCH_BUFFER);
    let (stop, mut stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        store: Mutex::new(Store::default()),
        events,
        view: view.clone(),
        stop: stop_rx.clone(),
    });
    shared.refresh(&private_key);
    let updater = {
        let shared = shared.clone();
        let mut view = view;
        tokio::spawn(async move {
            while view.changed().await.is_ok() {
                shared.refresh(&private_key);
            }
        })
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ApiServer::new(Service { shared }))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }),
    );
    tracing::info!(socket = %path.display(), "local API listening");
    Ok(ApiHandle {
        path: path.to_owned(),
        stop,
        server,
        updater,
    })
}
