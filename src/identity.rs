//! Node and KubeSpan identities, persisted like Talos does it:
//! `node-identity.yaml` (`nodeId`) and `kubespan-identity.yaml` (WireGuard keys)
//! in the state directory, created once with mode 0600 and reused on every
//! start. The KubeSpan address is not stored: it is derived at every start from
//! the cluster ID and a link's MAC (spec `kubespan.md` §1.2).

use std::io::Write;
use std::net::Ipv6Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::core::{base62, ula};

pub const NODE_IDENTITY_FILE: &str = "node-identity.yaml";
pub const KUBESPAN_IDENTITY_FILE: &str = "kubespan-identity.yaml";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}; move the file away to create a new identity")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot draw random bytes from the OS: {0}")]
    Random(String),
    #[error(
        "no link to derive the KubeSpan address from (no Ethernet link with a MAC address); \
         set kubespan.addressLink"
    )]
    NoAddressLink,
    #[error("kubespan.addressLink {0:?}: no such link with a MAC address")]
    AddressLinkNotFound(String),
    #[error("KubeSpan address from link {link}: {reason}")]
    Address { link: String, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct NodeIdentityFile {
    node_id: String,
}

/// The Talos file shape: address and subnet are written empty and recomputed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct KubeSpanIdentityFile {
    #[serde(default)]
    address: String,
    #[serde(default)]
    subnet: String,
    private_key: String,
    public_key: String,
}

/// A WireGuard key pair, as standard base64 text.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private_key: String,
    pub public_key: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh Curve25519 key pair (clamped, as `wg genkey`).
    pub fn generate() -> Result<KeyPair, IdentityError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(Self::from_private(raw))
    }

    fn from_private(raw: [u8; 32]) -> KeyPair {
        let secret = x25519_dalek::StaticSecret::from(raw);
        let public = x25519_dalek::PublicKey::from(&secret);
        KeyPair {
            private_key: B64.encode(secret.to_bytes()),
            public_key: B64.encode(public.as_bytes()),
        }
    }

    /// Parses a private key and derives its public key.
    pub fn from_private_base64(text: &str) -> Result<KeyPair, String> {
        let raw: [u8; 32] = B64
            .decode(text.trim())
            .map_err(|e| format!("private key is not base64: {e}"))?
            .try_into()
            .map_err(|v: Vec<u8>| format!("private key is {} bytes, not 32", v.len()))?;
        Ok(Self::from_private(raw))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the state directory (0700) if needed.
pub fn ensure_state_dir(dir: &Path) -> Result<(), IdentityError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// Writes a new file that must not exist yet (O_EXCL), mode 0600, fsynced.
fn create_exclusive(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

fn warn_if_loose(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "identity file is readable by others; chmod 600 it"
        );
    }
}

/// Loads `file` from `dir`, or creates it with `make` if it does not exist.
fn load_or_create<T, F>(dir: &Path, file: &str, make: F) -> Result<(T, bool), IdentityError>
where
    T: Serialize + for<'de> Deserialize<'de>,
    F: FnOnce() -> Result<T, IdentityError>,
{
    ensure_state_dir(dir)?;
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            warn_if_loose(&path);
            let v = serde_yaml_ng::from_str(&text).map_err(|e| IdentityError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Ok((v, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let v = make()?;
            let text = serde_yaml_ng::to_string(&v).map_err(|e| IdentityError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            create_exclusive(&path, &text).map_err(io(&path))?;
            Ok((v, true))
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// The node ID: loaded from `node-identity.yaml`, created on first start.
pub fn node_id(dir: &Path) -> Result<String, IdentityError> {
    let (f, created) = load_or_create(dir, NODE_IDENTITY_FILE, || {
        let node_id =
            base62::generate_node_id().map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(NodeIdentityFile { node_id })
    })?;
    if f.node_id.trim().is_empty() {
        return Err(IdentityError::Invalid {
            path: dir.join(NODE_IDENTITY_FILE),
            reason: "nodeId is empty".into(),
        });
    }
    if created {
        tracing::info!(node_id = %f.node_id, "created node identity");
    }
    Ok(f.node_id)
}

/// The WireGuard key pair: loaded from `kubespan-identity.yaml`, created on
/// first start. The public key is always re-derived from the private key.
pub fn kubespan_keys(dir: &Path) -> Result<KeyPair, IdentityError> {
    let (f, created) = load_or_create(dir, KUBESPAN_IDENTITY_FILE, || {
        let k = KeyPair::generate()?;
        Ok(KubeSpanIdentityFile {
            address: String::new(),
            subnet: String::new(),
            private_key: k.private_key,
            public_key: k.public_key,
        })
    })?;
    let path = dir.join(KUBESPAN_IDENTITY_FILE);
    let keys =
        KeyPair::from_private_base64(&f.private_key).map_err(|reason| IdentityError::Invalid {
            path: path.clone(),
            reason,
        })?;
    if keys.public_key != f.public_key.trim() {
        tracing::warn!(
            path = %path.display(),
            "publicKey does not match privateKey; using the key derived from privateKey"
        );
    }
    if created {
        tracing::info!(public_key = %keys.public_key, "created KubeSpan WireGuard key");
    }
    Ok(keys)
}

/// A network link as far as the address derivation cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    /// Hardware address; empty for links without one.
    pub mac: Vec<u8>,
    /// ARPHRD_ETHER.
    pub ethernet: bool,
    /// The rtnetlink "kind" (`veth`, `bridge`, `wireguard`, …); `None` for
    /// physical devices.
    pub kind: Option<String>,
}

/// Picks the link whose MAC forms the EUI-64: the configured one, else like
/// Talos the first Ethernet link by name without a kind (a physical NIC). Hosts
/// without one (containers, network namespaces) fall back to the first
/// Ethernet veth, which is stable for the life of such a host.
pub fn address_link<'a>(
    links: &'a [LinkInfo],
    configured: Option<&str>,
) -> Result<&'a LinkInfo, IdentityError> {
    let with_mac = |l: &&LinkInfo| l.mac.iter().any(|b| *b != 0);
    if let Some(name) = configured {
        return links
            .iter()
            .filter(with_mac)
            .find(|l| l.name == name)
            .ok_or_else(|| IdentityError::AddressLinkNotFound(name.to_owned()));
    }
    let mut sorted: Vec<&LinkInfo> = links
        .iter()
        .filter(with_mac)
        .filter(|l| l.ethernet)
        .collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .iter()
        .find(|l| l.kind.is_none())
        .or_else(|| sorted.iter().find(|l| l.kind.as_deref() == Some("veth")))
        .copied()
        .ok_or(IdentityError::NoAddressLink)
}

/// The KubeSpan address: the cluster's ULA /64 plus the link's EUI-64.
pub fn kubespan_address(cluster_id: &str, link: &LinkInfo) -> Result<Ipv6Addr, IdentityError> {
    ula::eui64_address(ula::kubespan_subnet(cluster_id), &link.mac).map_err(|e| {
        IdentityError::Address {
            link: link.name.clone(),
            reason: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_created_once_with_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let id = node_id(&state).unwrap();
        assert!((43..=45).contains(&id.len()));
        let keys = kubespan_keys(&state).unwrap();
        for f in [NODE_IDENTITY_FILE, KUBESPAN_IDENTITY_FILE] {
            let mode = std::fs::metadata(state.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let dmode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert_eq!(node_id(&state).unwrap(), id);
        assert_eq!(kubespan_keys(&state).unwrap(), keys);
        // Talos' shape: address and subnet written empty.
        let text = std::fs::read_to_string(state.join(KUBESPAN_IDENTITY_FILE)).unwrap();
        assert!(
            text.contains("address: ''") && text.contains("privateKey:"),
            "{text}"
        );
        let text = std::fs::read_to_string(state.join(NODE_IDENTITY_FILE)).unwrap();
        assert_eq!(text, format!("nodeId: {id}\n"));
    }

    #[test]
    fn loads_a_talos_written_identity_and_derives_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        // Key pair from `wg genkey | tee /dev/stderr | wg pubkey`.
        let private = "SHA1Og6vxuOVyKGj9+oR+EsJeyjDevdEr7+B9+8Q3GA=";
        let public = "U50oI7WxwYNY9ethKusR5M33s8L/8beaQa5FCh26F0U=";
        std::fs::write(
            dir.path().join(KUBESPAN_IDENTITY_FILE),
            format!("address: \"\"\nsubnet: \"\"\nprivateKey: {private}\npublicKey: {public}\n"),
        )
        .unwrap();
        let k = kubespan_keys(dir.path()).unwrap();
        assert_eq!(k.private_key, private);
        assert_eq!(k.public_key, public);
    }

    #[test]
    fn corrupt_identity_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_IDENTITY_FILE), "nodeId: \"\"\n").unwrap();
        let err = node_id(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("nodeId is empty") && err.contains("move the file away"),
            "{err}"
        );
        std::fs::write(
            dir.path().join(KUBESPAN_IDENTITY_FILE),
            "privateKey: abc\npublicKey: x\n",
        )
        .unwrap();
        assert!(kubespan_keys(dir.path()).is_err());
        // The bad file is left for the user to inspect.
        assert!(dir.path().join(KUBESPAN_IDENTITY_FILE).exists());
    }

    fn link(name: &str, kind: Option<&str>, mac: [u8; 6]) -> LinkInfo {
        LinkInfo {
            name: name.into(),
            mac: mac.to_vec(),
            ethernet: true,
            kind: kind.map(Into::into),
        }
    }

    #[test]
    fn address_link_choice_and_talos_vector() {
        let links = vec![
            LinkInfo {
                name: "lo".into(),
                mac: vec![0; 6],
                ethernet: false,
                kind: None,
            },
            link("br0", Some("bridge"), [1; 6]),
            link("veth0", Some("veth"), [3; 6]),
            link("eth1", None, [0xea, 0x71, 0x1b, 0xb2, 0xcc, 0xee]),
            link("eth0", None, [0x2e, 0x1a, 0xb6, 0x53, 0x81, 0x69]),
        ];
        let l = address_link(&links, None).unwrap();
        assert_eq!(l.name, "eth0");
        let id = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=";
        assert_eq!(
            kubespan_address(id, l).unwrap(),
            "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        let l = address_link(&links, Some("eth1")).unwrap();
        assert_eq!(
            kubespan_address(id, l).unwrap(),
            "fd7f:175a:b97c:5602:e871:1bff:feb2:ccee"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        // Only virtual links: the veth, never a bridge.
        assert_eq!(address_link(&links[..3], None).unwrap().name, "veth0");
        assert!(matches!(
            address_link(&links[..2], None),
            Err(IdentityError::NoAddressLink)
        ));
        assert!(matches!(
            address_link(&links, Some("nope")),
            Err(IdentityError::AddressLinkNotFound(_))
        ));
    }
}
