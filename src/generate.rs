//! `kubespan gen`: fresh cluster credentials and an example config.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// Base64 of 32 random bytes: the shape of Talos's `cluster.id` and
/// `cluster.secret`.
pub fn random_base64_32() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("cannot draw random bytes: {e}"))?;
    Ok(B64.encode(b))
}

pub fn cluster() -> anyhow::Result<String> {
    Ok(format!(
        "cluster:\n  id: {}\n  secret: {}\n",
        random_base64_32()?,
        random_base64_32()?
    ))
}

pub fn config(endpoint: Option<&str>) -> anyhow::Result<String> {
    let text = crate::config::example(&random_base64_32()?, &random_base64_32()?);
    Ok(match endpoint {
        Some(e) => text.replace(
            &format!("endpoint: {}", crate::config::DEFAULT_DISCOVERY_ENDPOINT),
            &format!("endpoint: {e}"),
        ),
        None => text,
    })
}

/// Writes a file that must not exist yet, readable only by its owner: the
/// config holds the cluster secret.
pub fn write_new_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn generated_config_is_valid_and_fresh() {
        let a = config(Some("http://127.0.0.1:3000")).unwrap();
        let s = crate::config::Settings::parse(&a, Path::new("gen.yaml")).unwrap();
        assert_eq!(
            s.discovery_endpoint.as_deref(),
            Some("http://127.0.0.1:3000")
        );
        assert_eq!(s.cluster_key.len(), 32);
        assert_eq!(B64.decode(&s.cluster_id).unwrap().len(), 32);
        let b = config(None).unwrap();
        assert_ne!(a, b, "fresh credentials every time");
        assert!(cluster().unwrap().starts_with("cluster:\n  id: "));
    }
}
