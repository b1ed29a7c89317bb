//! HTTP clients for the two hops, one pair per worker: relay A to relay B (`peer`, awc) and
//! relay B to its upstream API (`upstream`, hyper; see [`crate::inbound::upstream`] for why).
//!
//! Both pool keep-alive connections, never follow redirects (a redirect goes back to the
//! application), never decompress (bodies pass through byte for byte), send no default headers,
//! and trust the platform's root certificates plus the optional `EXTRA_CA_FILE` bundle.

use std::sync::Arc;
use std::time::Duration;

use actix_service::ServiceExt as _;
use actix_tls::connect::{Connection as TcpConnection, Connector as TcpConnector, Resolver};
use anyhow::Context as _;
use rustls::RootCertStore;
use tokio::net::TcpStream;

use crate::config::Config;

/// Seconds an idle pooled connection to relay B is kept: below relay B's own 75 s keep-alive,
/// so relay A never reuses a connection relay B is about to close.
const PEER_IDLE_SECS: u64 = 60;
/// Maximum connections per worker and hop; above the largest load the relay is sized for.
const CONNECTION_LIMIT: usize = 1024;
/// Seconds to establish a TCP connection and the TLS handshake.
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// The two clients of one worker.
#[derive(Clone)]
pub struct HopClients {
    pub peer: awc::Client,
    pub upstream: crate::inbound::upstream::UpstreamClient,
}

impl HopClients {
    pub fn new(config: &Config, tls: &Arc<rustls::ClientConfig>) -> Self {
        Self {
            peer: build(config, tls, PEER_IDLE_SECS),
            upstream: crate::inbound::upstream::UpstreamClient::new(tls, config.upstream_timeout),
        }
    }
}

fn build(config: &Config, tls: &Arc<rustls::ClientConfig>, idle_secs: u64) -> awc::Client {
    // Nagle's algorithm holds back the last partial segment of a request body until relay B
    // acknowledges the data before it, and relay B may delay that acknowledgement by 40 ms.
    // awc leaves the algorithm on, so each new connection turns it off.
    let tcp = TcpConnector::new(Resolver::default()).service().map(|connection: TcpConnection<_, TcpStream>| {
        if let Err(error) = connection.io_ref().set_nodelay(true) {
            tracing::debug!(%error, "could not turn off Nagle's algorithm on a connection to the peer relay");
        }
        connection
    });
    let connector = awc::Connector::new()
        .connector(tcp)
        .rustls_0_23(Arc::clone(tls))
        .timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS))
        .limit(CONNECTION_LIMIT)
        .conn_keep_alive(Duration::from_secs(idle_secs))
        .conn_lifetime(Duration::from_secs(3600))
        .max_http_version(awc::http::Version::HTTP_11);
    awc::ClientBuilder::new()
        .connector(connector)
        .timeout(config.upstream_timeout)
        .disable_redirects()
        .no_default_headers()
        .finish()
}

/// Builds the TLS client configuration once at start-up.
///
/// # Errors
/// When `EXTRA_CA_FILE` cannot be read or holds no certificate.
pub fn tls_config(config: &Config) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = &config.extra_ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading EXTRA_CA_FILE {}", path.display()))?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing EXTRA_CA_FILE {}", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "EXTRA_CA_FILE {} holds no PEM certificate", path.display());
        roots.add_parsable_certificates(certs);
    }
    tracing::debug!(platform_roots = added, "loaded trusted root certificates");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}
