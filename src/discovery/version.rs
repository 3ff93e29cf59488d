//! The `client_version` metric label, normalised as upstream does it so that
//! dashboards built for the upstream server keep working.

/// `v1.8.3` → `v1.8`, `v1.8.0-beta.1` → `v1.8-pre`; anything else → `unknown`.
pub fn version_label(version: &str) -> String {
    let (main, pre) = match version.split_once('-') {
        Some((m, _)) => (m, true),
        None => (version, false),
    };
    let Some(rest) = main.strip_prefix('v') else {
        return "unknown".into();
    };
    let mut parts = rest.splitn(3, '.');
    let (Some(major), Some(minor), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return "unknown".into();
    };
    if major.len() > 2 || minor.len() > 3 {
        return "unknown".into();
    }
    let label = format!("v{major}.{minor}");
    if pre { label + "-pre" } else { label }
}

#[cfg(test)]
mod tests {
    use super::version_label;

    #[test]
    fn upstream_table() {
        for (input, want) in [
            // The upstream test table (discovery-service version_test.go).
            ("unknown", "unknown"),
            ("v0.13.0", "v0.13"),
            ("v0.13.0-beta.0", "v0.13-pre"),
            ("v0.14.0-alpha.0-7-gf7d9f211", "v0.14-pre"),
            ("v0.14.0-alpha.0-7-gf7d9f211-dirty", "v0.14-pre"),
            ("v1.8.3", "v1.8"),
            ("v1.8.3-7-gf7d9f211", "v1.8-pre"),
            ("v1.8.0-beta.1", "v1.8-pre"),
            ("v1.13.0", "v1.13"),
            ("v0.14.0-alpha.1-35-gef5bbe72", "v0.14-pre"),
            ("v1.2", "unknown"),
            ("", "unknown"),
            ("1.8.3", "unknown"),
            ("v123.1.1", "unknown"),
            ("v1.1234.1", "unknown"),
            ("garbage", "unknown"),
        ] {
            assert_eq!(version_label(input), want, "{input:?}");
        }
    }
}
