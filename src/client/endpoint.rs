//! Discovery service endpoint addresses, parsed the way Talos reads
//! `cluster.discovery.registries.service.endpoint`.
//!
//! Talos takes a URL: `https://` and `grpc://` mean TLS (default port 443),
//! `http://` means plaintext HTTP/2 with prior knowledge (h2c, default port 80);
//! the path is ignored. We also accept a bare `host:port` (TLS), the form
//! redirect targets and the Go client's `Endpoint` option use.

use std::fmt;
use std::net::Ipv6Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("discovery endpoint is empty; use e.g. https://discovery.talos.dev/")]
    Empty,
    #[error(
        "discovery endpoint {0:?}: unsupported scheme {1:?}; use https:// or grpc:// (TLS) \
         or http:// (plaintext)"
    )]
    Scheme(String, String),
    #[error("discovery endpoint {0:?} has no host; use e.g. https://discovery.talos.dev/")]
    NoHost(String),
    #[error("discovery endpoint {0:?} has no scheme and no port; write https://{0}/ or {0}:443")]
    NoPort(String),
    #[error("discovery endpoint {0:?}: invalid port {1:?} (expected 1-65535)")]
    Port(String, String),
    #[error(
        "discovery endpoint {0:?}: invalid host {1:?} (expected a DNS name, an IPv4 address \
         or a bracketed IPv6 address like [2001:db8::1])"
    )]
    Host(String, String),
    #[error("discovery endpoint {0:?}: user information (user@host) is not supported")]
    UserInfo(String),
}

/// Where the discovery service is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceEndpoint {
    /// DNS name or IP address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// TLS with certificate verification; `false` means h2c.
    pub tls: bool,
}

impl ServiceEndpoint {
    /// Parses a Talos-style endpoint URL or a bare `host:port` (TLS).
    pub fn parse(input: &str) -> Result<Self, EndpointError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(EndpointError::Empty);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            let (host, port) = split_authority(s, s)?;
            let port = port.ok_or_else(|| EndpointError::NoPort(s.to_string()))?;
            return Ok(Self {
                host,
                port,
                tls: true,
            });
        };
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "https" | "grpc" => true,
            "http" => false,
            _ => return Err(EndpointError::Scheme(s.to_string(), scheme.to_string())),
        };
        // Talos ignores the path (and so any query or fragment).
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (host, port) = split_authority(s, authority)?;
        Ok(Self {
            host,
            port: port.unwrap_or(if tls { 443 } else { 80 }),
            tls,
        })
    }

    /// The endpoint a Hello redirect points to: `host:port`, same TLS mode as
    /// this one (the Go client keeps its transport credentials on redirect).
    pub fn redirect(&self, target: &str) -> Result<Self, EndpointError> {
        let s = target.trim();
        if s.is_empty() {
            return Err(EndpointError::Empty);
        }
        let (host, port) = split_authority(s, s)?;
        let port = port.ok_or_else(|| EndpointError::NoPort(s.to_string()))?;
        Ok(Self {
            host,
            port,
            tls: self.tls,
        })
    }

    /// `host:port`, with brackets around an IPv6 host.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URI for the HTTP/2 transport.
    pub fn uri(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority())
    }
}

impl fmt::Display for ServiceEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

impl std::str::FromStr for ServiceEndpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Splits `host[:port]` / `[v6][:port]`; `input` is only for error messages.
fn split_authority(input: &str, authority: &str) -> Result<(String, Option<u16>), EndpointError> {
    if authority.contains('@') {
        return Err(EndpointError::UserInfo(input.to_string()));
    }
    if authority.is_empty() {
        return Err(EndpointError::NoHost(input.to_string()));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| EndpointError::Host(input.to_string(), authority.to_string()))?;
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(EndpointError::Host(input.to_string(), v6.to_string()));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| EndpointError::Host(input.to_string(), authority.to_string()))?,
            ),
        };
        (v6, port)
    } else {
        match authority.split_once(':') {
            // A second colon: an unbracketed IPv6 address, ambiguous with a port.
            Some((_, p)) if p.contains(':') => {
                return Err(EndpointError::Host(
                    input.to_string(),
                    authority.to_string(),
                ));
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(EndpointError::NoHost(input.to_string()));
    }
    if !host.contains(':') && !is_dns_or_ipv4(host) {
        return Err(EndpointError::Host(input.to_string(), host.to_string()));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => Some(n),
            _ => return Err(EndpointError::Port(input.to_string(), p.to_string())),
        },
    };
    Ok((host.to_string(), port))
}

/// Letters, digits, `-`, `_` and dots, no empty labels: enough to reject typos
/// and stray characters without second-guessing the resolver.
fn is_dns_or_ipv4(host: &str) -> bool {
    host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16, tls: bool) -> ServiceEndpoint {
        ServiceEndpoint {
            host: host.into(),
            port,
            tls,
        }
    }

    #[test]
    fn talos_urls() {
        for (input, want) in [
            (
                "https://discovery.talos.dev/",
                ep("discovery.talos.dev", 443, true),
            ),
            (
                "https://discovery.talos.dev",
                ep("discovery.talos.dev", 443, true),
            ),
            (
                "HTTPS://discovery.talos.dev:8443/some/path?q=1",
                ep("discovery.talos.dev", 8443, true),
            ),
            ("grpc://disco.internal", ep("disco.internal", 443, true)),
            (
                "grpc://disco.internal:3000",
                ep("disco.internal", 3000, true),
            ),
            ("http://10.0.0.1", ep("10.0.0.1", 80, false)),
            ("http://10.0.0.1:3000/", ep("10.0.0.1", 3000, false)),
            ("http://[2001:db8::1]:3000", ep("2001:db8::1", 3000, false)),
            ("https://[::1]", ep("::1", 443, true)),
            (
                "  https://discovery.talos.dev/\n",
                ep("discovery.talos.dev", 443, true),
            ),
            (
                "discovery.talos.dev:443",
                ep("discovery.talos.dev", 443, true),
            ),
            ("127.0.0.1:3000", ep("127.0.0.1", 3000, true)),
            ("[fd00::1]:3000", ep("fd00::1", 3000, true)),
        ] {
            assert_eq!(ServiceEndpoint::parse(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        use EndpointError::*;
        type Check = fn(&EndpointError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, Empty)),
            ("   ", |e| matches!(e, Empty)),
            ("ftp://x.example", |e| matches!(e, Scheme(..))),
            ("https://", |e| matches!(e, NoHost(_))),
            ("https:///path", |e| matches!(e, NoHost(_))),
            ("https://:443", |e| matches!(e, NoHost(_))),
            ("discovery.talos.dev", |e| matches!(e, NoPort(_))),
            ("https://host:0", |e| matches!(e, Port(..))),
            ("https://host:65536", |e| matches!(e, Port(..))),
            ("https://host:https", |e| matches!(e, Port(..))),
            ("host:", |e| matches!(e, Port(..))),
            ("::1:3000", |e| matches!(e, Host(..))),
            ("http://[::1", |e| matches!(e, Host(..))),
            ("http://[nope]:80", |e| matches!(e, Host(..))),
            ("http://[::1]x", |e| matches!(e, Host(..))),
            ("https://bad host/", |e| matches!(e, Host(..))),
            ("https://a..b/", |e| matches!(e, Host(..))),
            ("https://user@host/", |e| matches!(e, UserInfo(_))),
        ];
        for (input, check) in cases {
            let err = ServiceEndpoint::parse(input).unwrap_err();
            assert!(check(&err), "{input:?} gave {err:?}");
        }
        assert_eq!(
            ServiceEndpoint::parse("discovery.talos.dev")
                .unwrap_err()
                .to_string(),
            "discovery endpoint \"discovery.talos.dev\" has no scheme and no port; write \
             https://discovery.talos.dev/ or discovery.talos.dev:443"
        );
    }

    #[test]
    fn redirect_keeps_the_tls_mode() {
        let tls = ServiceEndpoint::parse("https://a.example/").unwrap();
        assert_eq!(
            tls.redirect("b.example:3000").unwrap(),
            ep("b.example", 3000, true)
        );
        let plain = ServiceEndpoint::parse("http://127.0.0.1:1").unwrap();
        assert_eq!(plain.redirect("[::1]:2").unwrap(), ep("::1", 2, false));
        // Redirect targets are gRPC targets, not URLs, and must name a port.
        assert!(matches!(
            plain.redirect("new.example.com"),
            Err(EndpointError::NoPort(_))
        ));
        assert!(matches!(
            plain.redirect("https://new.example.com:443"),
            Err(EndpointError::Port(..) | EndpointError::Host(..))
        ));
        assert!(matches!(plain.redirect(""), Err(EndpointError::Empty)));
    }

    #[test]
    fn formatting() {
        assert_eq!(ep("a.example", 443, true).uri(), "https://a.example:443");
        assert_eq!(ep("::1", 80, false).uri(), "http://[::1]:80");
        assert_eq!(ep("::1", 80, false).authority(), "[::1]:80");
        assert_eq!(
            ep("10.0.0.1", 3000, false).to_string(),
            "http://10.0.0.1:3000"
        );
    }
}
