//! The peer relay as relay A addresses it: the origin from `x-mte-upstream`, and how failures to
//! reach it map to errors.

use std::fmt;
use std::time::Duration;

use awc::error::SendRequestError;
use url::Url;

use crate::config::{AllowedOrigin, Config};
use crate::error::RelayError;

/// Base URL of a peer relay: scheme, host, port and an optional path prefix (for a peer behind a
/// path-routing load balancer), without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOrigin {
    base: String,
    scheme: String,
    host: String,
    port: u16,
}

impl PeerOrigin {
    /// Parses an `x-mte-upstream` value such as `https://relay-b.example.com`.
    ///
    /// # Errors
    /// `BadHeader` naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, RelayError> {
        let bad =
            |reason: &str| RelayError::BadHeader { header: "x-mte-upstream", reason: reason.to_owned() };
        let url = Url::parse(text.trim())
            .map_err(|_| bad("expected an absolute URL such as https://relay-b.example.com"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("scheme must be http or https"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("must not contain credentials"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must not contain a query or fragment"));
        }
        let host = url.host_str().ok_or_else(|| bad("a host is required"))?.to_owned();
        let port = url.port_or_known_default().ok_or_else(|| bad("a port is required"))?;
        let prefix = url.path().trim_end_matches('/');
        let authority = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        let base = format!("{}://{authority}:{port}{prefix}", url.scheme());
        Ok(Self { base, scheme: url.scheme().to_owned(), host, port })
    }

    /// The pool key: one pool per distinct base URL.
    pub fn key(&self) -> &str {
        &self.base
    }

    /// The peer's URL for `path_and_query`, which starts with `/`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    /// Whether `OUTBOUND_ALLOWLIST` admits this peer; an empty list admits every peer.
    pub fn is_allowed(&self, config: &Config) -> bool {
        config.outbound_allowlist.is_empty()
            || config.outbound_allowlist.iter().any(|allowed: &AllowedOrigin| {
                allowed.scheme == self.scheme && allowed.host == self.host && allowed.port == self.port
            })
    }
}

impl fmt::Display for PeerOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Maps a client failure to the error the downstream sees: 504 for a timeout, 502 otherwise.
pub fn send_error(error: SendRequestError, hop: &'static str, timeout: Duration) -> RelayError {
    match error {
        SendRequestError::Timeout => RelayError::Timeout { hop, secs: timeout.as_secs() },
        other => {
            tracing::debug!(hop, error = %other, "request to next hop failed");
            RelayError::Unreachable { hop }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_keeps_prefix_and_default_port() {
        let origin = PeerOrigin::parse("https://relay-b.example.com/relay/").unwrap();
        assert_eq!(origin.url("/api/mte-pair"), "https://relay-b.example.com:443/relay/api/mte-pair");
    }

    #[test]
    fn invalid_origins_are_rejected() {
        for text in ["", "relay-b", "ftp://relay-b", "http://user:pw@relay-b", "http://relay-b/?q=1"] {
            assert!(PeerOrigin::parse(text).is_err(), "accepted {text:?}");
        }
    }
}
