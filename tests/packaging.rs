//! The cheap half of the packaging checks, run by `cargo test` (so in CI): the
//! packaged example config matches `kubespan gen config`, the daemon refuses its
//! placeholders, and the systemd units pass `systemd-analyze verify`. The
//! expensive half (a release build, cargo-deb, installing and purging the
//! package) is `scripts/package --test`.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const UNITS: [&str; 2] = ["kubespan.service", "kubespan-discovery.service"];

fn packaging(file: &str) -> String {
    let path = Path::new(ROOT).join("packaging").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What `scripts/package --update-example` writes.
fn expected_example() -> String {
    format!(
        "# Example only: the daemon refuses the CHANGE-ME values below. Make a real config with\n\
         #   kubespan gen config --output /etc/kubespan/config.yaml\n{}",
        kubespan::config::example(
            "CHANGE-ME  # `kubespan gen cluster`, or the Talos cluster.id",
            "CHANGE-ME  # `kubespan gen cluster`, or the Talos cluster.secret",
        )
    )
}

#[test]
fn packaged_example_config_matches_gen_config() {
    assert!(
        packaging("config.yaml.example") == expected_example(),
        "packaging/config.yaml.example is out of date with `kubespan gen config`: \
         run scripts/package --update-example"
    );
}

#[test]
fn packaged_example_config_is_refused_until_edited() {
    let err = kubespan::config::Settings::parse(
        &packaging("config.yaml.example"),
        Path::new("config.yaml.example"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cluster.secret"), "{err}");
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: systemd-analyze not installed");
        return;
    }
    // The installed units name /usr/bin/kubespan; verify copies that point at
    // the binary under test (verify checks that ExecStart= is executable).
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in UNITS {
        let text = packaging(unit).replace("/usr/bin/kubespan", env!("CARGO_BIN_EXE_kubespan"));
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "systemd-analyze verify: {findings}"
    );
}

#[test]
fn units_keep_the_daemon_to_cap_net_admin() {
    let daemon = packaging("kubespan.service");
    let caps: Vec<&str> = daemon
        .lines()
        .filter(|l| {
            l.starts_with("CapabilityBoundingSet=") || l.starts_with("AmbientCapabilities=")
        })
        .collect();
    assert_eq!(caps, ["CapabilityBoundingSet=CAP_NET_ADMIN"]);
    let discovery = packaging("kubespan-discovery.service");
    assert!(discovery.lines().any(|l| l == "CapabilityBoundingSet="));
    assert!(discovery.lines().any(|l| l == "DynamicUser=yes"));
}
