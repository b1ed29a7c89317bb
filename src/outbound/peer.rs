//! The peer relay as relay A addresses it: the origin from `x-mte-upstream`, and how failures to
//! reach it map to errors.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use awc::error::SendRequestError;
use url::Url;

use crate::config::{AllowedOrigin, Config};
use crate::error::RelayError;

/// Base URL of a peer relay: scheme, host, port and an optional path prefix (for a peer behind a
/// path-routing load balancer), without a trailing slash. Every exchange takes a copy from its
/// worker's cache of parsed origins, so the parts are shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOrigin(Arc<OriginParts>);

#[derive(Debug, PartialEq, Eq)]
struct OriginParts {
    base: String,
    scheme: String,
    host: String,
    port: u16,
    /// `scheme://host:port`, as logs and metrics show the peer.
    origin: String,
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
        check_canonical(text.trim(), url.scheme(), &host, port).map_err(|reason| bad(&reason))?;
        let prefix = url.path().trim_end_matches('/');
        // `host_str` already puts an IPv6 address in brackets.
        let origin = format!("{}://{host}:{port}", url.scheme());
        let base = format!("{origin}{prefix}");
        Ok(Self(Arc::new(OriginParts { base, scheme: url.scheme().to_owned(), host, port, origin })))
    }

    /// Returns `scheme://host:port`.
    pub fn as_str(&self) -> &str {
        &self.0.origin
    }

    /// The pool key: one pool per distinct base URL.
    pub fn key(&self) -> &str {
        &self.0.base
    }

    /// The peer's URL for `path_and_query`, which starts with `/`.
    pub fn url(&self, path_and_query: &str) -> String {
        [self.0.base.as_str(), path_and_query].concat()
    }

    /// Whether `OUTBOUND_ALLOWLIST` admits this peer; an empty list admits every peer.
    pub fn is_allowed(&self, config: &Config) -> bool {
        let parts = &self.0;
        config.outbound_allowlist.is_empty()
            || config.outbound_allowlist.iter().any(|allowed: &AllowedOrigin| {
                allowed.scheme == parts.scheme && allowed.host == parts.host && allowed.port == parts.port
            })
    }
}

impl fmt::Display for PeerOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.origin)
    }
}

/// Checks that `text` spells its origin exactly as the URL standard serialises it. That means a
/// lowercase scheme and host, IPv4 as four decimal parts, IPv6 compressed, DNS names in ASCII
/// and no trailing dot. An optional decimal port without leading zeros and then the end or a
/// `/` follow.
///
/// The allow-list compares the parsed host, and relay A connects to it, so a spelling such as
/// `127.1` or `0x7f000001` would reach the same address as `127.0.0.1`. Rejecting every other
/// spelling keeps what the caller wrote, what the allow-list compares and what relay A connects
/// to identical, so no other parser can read the value differently.
fn check_canonical(text: &str, scheme: &str, host: &str, port: u16) -> Result<(), String> {
    let origin = format!("{scheme}://{host}:{port}");
    let not_canonical = || format!("must be written in canonical form, for example {origin}");
    if host.ends_with('.') {
        return Err(format!("host {host:?} must not end with a dot"));
    }
    let rest = text.strip_prefix(&format!("{scheme}://{host}")).ok_or_else(not_canonical)?;
    let (port_text, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    let port_ok = match port_text.strip_prefix(':') {
        None => port_text.is_empty(),
        Some(digits) => digits == port.to_string(),
    };
    if !port_ok || path.contains('\\') {
        return Err(not_canonical());
    }
    Ok(())
}

/// Maximum sends of one message while the peer cannot be reached. A pooled connection that the
/// peer closed, for example while it restarted, fails before any response arrives, so the next
/// attempt takes another connection.
pub const MAX_SEND_ATTEMPTS: usize = 3;

/// Awaits `first` and, while the result is [`RelayError::Unreachable`], the sends `again` makes,
/// up to [`MAX_SEND_ATTEMPTS`] in all. `again` gets the attempt number (2 and up). It
/// returns `None` when it cannot send again, for a body that was not held, and then the last
/// result is returned.
///
/// Only messages that are safe to deliver twice go through here: a repeated exchange carries the
/// same `seq`, which relay B's replay window accepts once, and a repeated pairing request leaves
/// at most an unused pair on relay B that expires.
pub async fn resend_while_unreachable<T, F, Fut>(
    origin: &PeerOrigin,
    message: &'static str,
    first: Fut,
    mut again: F,
) -> Result<T, RelayError>
where
    F: FnMut(usize) -> Option<Fut>,
    Fut: Future<Output = Result<T, RelayError>>,
{
    let mut result = first.await;
    for attempt in 2..=MAX_SEND_ATTEMPTS {
        if !matches!(result, Err(RelayError::Unreachable { .. })) {
            break;
        }
        let Some(next) = again(attempt) else { break };
        tracing::warn!(peer = %origin, attempt, "peer relay unreachable; sending the {message} again");
        result = next.await;
    }
    result
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

    #[test]
    fn canonical_origins_are_accepted() {
        for (text, url) in [
            ("http://127.0.0.1:8081", "http://127.0.0.1:8081/api/mte-pair"),
            ("http://127.0.0.1:80/", "http://127.0.0.1:80/api/mte-pair"),
            ("https://relay-b.example.com/relay", "https://relay-b.example.com:443/relay/api/mte-pair"),
            ("http://[::1]:8081", "http://[::1]:8081/api/mte-pair"),
            ("http://[2001:db8::7]", "http://[2001:db8::7]:80/api/mte-pair"),
        ] {
            let origin = PeerOrigin::parse(text).unwrap_or_else(|error| panic!("{text:?}: {error}"));
            assert_eq!(origin.url("/api/mte-pair"), url, "{text:?}");
        }
    }

    #[test]
    fn other_spellings_of_an_origin_are_rejected() {
        for text in [
            "http://127.1:8081",
            "http://2130706433:8081",
            "http://0x7f000001:8081",
            "http://0177.0.0.1:8081",
            "http://127.000.000.001:8081",
            "http://[::ffff:127.0.0.1]:8081",
            "http://[0:0:0:0:0:0:0:1]:8081",
            "http://localhost.:8081",
            "HTTP://127.0.0.1:8081",
            "http://LocalHost:8081",
            "http://127.0.0.1:08081",
            "http://127.0.0.1:8081\\@127.0.0.2:8082",
            "http:\\\\127.0.0.1:8081",
            "http:127.0.0.1:8081",
            "http://b\u{fc}cher.example",
        ] {
            assert!(PeerOrigin::parse(text).is_err(), "accepted {text:?}");
        }
    }
}
