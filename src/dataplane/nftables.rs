//! Our own nftables table (spec §4.4: never touch `inet talos`), applied as one
//! `nft -f` transaction.
//!
//! The script comes from the planner. It must replace the table atomically, e.g.
//!
//! ```text
//! table inet kubespan {}
//! delete table inet kubespan
//! table inet kubespan { ... }
//! ```
//!
//! (the empty declaration makes the delete succeed on the first run), so applying
//! it twice leaves the same ruleset and a failed script changes nothing.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program}: {source} (install the nftables package)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("nft rejected the ruleset ({status}); nothing was changed. nft said:\n{stderr}")]
    Rejected { status: String, stderr: String },
    #[error("invalid nftables {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("nft worker failed: {0}")]
    Join(String),
}

/// The firewall adapter the data plane talks to.
pub trait FirewallBackend: Send + Sync {
    /// Applies a complete `nft -f` script in one transaction.
    fn apply(&self, script: &str) -> impl Future<Output = Result<(), NftError>> + Send;

    /// Deletes a table; succeeds when it does not exist.
    fn remove_table(
        &self,
        family: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), NftError>> + Send;
}

/// The `nft` command-line tool.
#[derive(Clone, Debug)]
pub struct Nft {
    program: PathBuf,
}

impl Default for Nft {
    fn default() -> Self {
        Self::new("nft")
    }
}

impl Nft {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }

    /// Pipes `script` into `nft -f -` (blocking).
    pub fn apply_blocking(&self, script: &str) -> Result<(), NftError> {
        let spawn_err = |source| NftError::Spawn {
            program: self.program.display().to_string(),
            source,
        };
        let mut child = Command::new(&self.program)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        // nft reads all of stdin before it parses, so a plain write cannot deadlock
        // against its stderr; a broken pipe means it died, which `wait` reports.
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(script.as_bytes());
        }
        let output = child.wait_with_output().map_err(spawn_err)?;
        if output.status.success() {
            tracing::debug!(bytes = script.len(), "nftables ruleset applied");
            Ok(())
        } else {
            Err(NftError::Rejected {
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr)
                    .trim_end()
                    .to_owned(),
            })
        }
    }
}

const FAMILIES: [&str; 6] = ["ip", "ip6", "inet", "arp", "bridge", "netdev"];

/// The script that deletes a table whether or not it exists, on every nft
/// version (`destroy table` needs nft 1.0.8 and Linux 6.3).
pub fn remove_table_script(family: &str, name: &str) -> Result<String, NftError> {
    if !FAMILIES.contains(&family) {
        return Err(NftError::InvalidName {
            what: "family",
            value: family.to_owned(),
            reason: "expected ip, ip6, inet, arp, bridge or netdev",
        });
    }
    let valid_name = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid_name || name.len() > 64 {
        return Err(NftError::InvalidName {
            what: "table name",
            value: name.to_owned(),
            reason: "expected a letter followed by letters, digits, '_' or '-'",
        });
    }
    Ok(format!(
        "table {family} {name} {{}}\ndelete table {family} {name}\n"
    ))
}

impl FirewallBackend for Nft {
    async fn apply(&self, script: &str) -> Result<(), NftError> {
        let nft = self.clone();
        let script = script.to_owned();
        tokio::task::spawn_blocking(move || nft.apply_blocking(&script))
            .await
            .map_err(|e| NftError::Join(e.to_string()))?
    }

    async fn remove_table(&self, family: &str, name: &str) -> Result<(), NftError> {
        let script = remove_table_script(family, name)?;
        self.apply(&script).await?;
        tracing::info!(family, table = name, "nftables table removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_script_declares_then_deletes() {
        assert_eq!(
            remove_table_script("inet", "kubespan").unwrap(),
            "table inet kubespan {}\ndelete table inet kubespan\n"
        );
    }

    #[test]
    fn remove_script_refuses_injection() {
        assert!(remove_table_script("inet", "kubespan; flush ruleset").is_err());
        assert!(remove_table_script("inet", "").is_err());
        assert!(remove_table_script("inet6", "kubespan").is_err());
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = Nft::new("/nonexistent/nft").apply_blocking("").unwrap_err();
        assert!(
            err.to_string().contains("install the nftables package"),
            "{err}"
        );
    }

    #[test]
    fn rejection_carries_stderr() {
        // `sh -f -` reads its commands from stdin just like `nft -f -`, so it stands
        // in for an nft that rejects the script.
        let err = Nft::new("sh")
            .apply_blocking("echo 'Error: syntax error, unexpected junk' >&2; exit 1")
            .unwrap_err();
        match &err {
            NftError::Rejected { stderr, .. } => {
                assert_eq!(stderr, "Error: syntax error, unexpected junk")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("nothing was changed"), "{err}");
    }
}
