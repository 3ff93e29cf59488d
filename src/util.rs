//! Small shared helpers.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// Parses a listen address the way Go's `net.Listen` flags spell it:
/// `""` disables the listener, `:3000` listens on every address, `host:port` or
/// `[v6]:port` on that one.
pub fn parse_listen_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("invalid port in address {s:?}"))?;
        return Ok(Some(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            port,
        )));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("invalid address {s:?}: {e} (expected host:port, :port or empty)"))?
        .next()
        .map(Some)
        .ok_or_else(|| format!("address {s:?} resolves to nothing"))
}

/// A listen address flag value: `None` when the flag is empty (disabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_listen_addr(s).map(ListenAddr)
    }
}

/// Binds a TCP listener; an unspecified IPv6 address falls back to IPv4 on
/// hosts without IPv6.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), addr.port());
            tokio::net::TcpListener::bind(v4).await.map_err(|_| e)
        }
        r => r,
    }
}

/// An error and its causes on one line, for people. Our error types put their
/// cause into their own message (so they read well alone), so a cause whose
/// text is already in the line is not repeated.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !line.contains(&c) {
            line.push_str(": ");
            line.push_str(&c);
        }
    }
    line
}

/// Parses a Go-style duration (`30s`, `1m`, `1m30s`, `500ms`, `2h`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen_addr("").unwrap(), None);
        assert_eq!(
            parse_listen_addr(":3000").unwrap(),
            Some("[::]:3000".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("127.0.0.1:0").unwrap(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("[::1]:5").unwrap(),
            Some("[::1]:5".parse().unwrap())
        );
        assert!(parse_listen_addr(":http").is_err());
        assert!(parse_listen_addr("1.2.3.4").is_err());
    }

    #[test]
    fn error_chain_does_not_repeat_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(io).context("cannot read x: no such file");
        assert_eq!(error_chain(&e), "cannot read x: no such file");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("ten").is_err());
    }
}
