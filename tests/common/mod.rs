//! Shared harness for the black-box integration tests.
//!
//! It owns the small helpers that every test file needs (free ports, the deterministic byte
//! pattern, SHA-256, bounded polling) and re-exports the parts that live in submodules:
//!
//! - [`relay`]: `api-relay` child processes with an explicit environment and captured logs.
//! - [`relay_pair`]: relay A and relay B started together with shared test secrets.
//! - [`upstream`]: a raw HTTP/1.1 upstream server that records every request.
//! - [`upstream_routes`]: the upstream's responses, chosen by path prefix.
//! - [`http1`]: the HTTP/1.1 wire code that the upstream server uses.
//! - [`raw_response`]: parsing of raw response bytes into status, fields and body.
//! - [`raw_request`]: parsing of captured request bytes, and byte edits for tampering.
//! - [`recorder`]: a TCP forwarder that records all bytes, and `send_raw` to replay them.
//! - [`holding_forwarder`]: a TCP forwarder that holds back chosen requests.
//! - [`assertions`]: byte assertions that print expected and actual values.
//! - [`background`]: the tokio runtime thread that the servers run on.
//!
//! Every server binds 127.0.0.1 only. Each test file includes this module with `mod common;`
//! and uses only part of it, so dead-code and unused-import warnings are off here.
#![allow(dead_code, unused_imports)]

pub mod assertions;
pub mod background;
pub mod holding_forwarder;
pub mod http1;
pub mod raw_request;
pub mod raw_response;
pub mod recorder;
pub mod relay;
pub mod relay_pair;
pub mod upstream;
pub mod upstream_routes;

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use assertions::{assert_bytes_eq, assert_contains_all, assert_contains_none, find_bytes};
pub use holding_forwarder::HoldingForwarder;
pub use raw_request::RawRequest;
pub use raw_response::{RawResponse, parse_head_response, parse_response, parse_responses};
pub use recorder::{TcpRecorder, send_raw, send_raw_with_timeout};
pub use relay::{ExitOutput, RelayBuilder, RelayProcess};
pub use relay_pair::{CLIENT_ID_SECRET_VALUE, OUTBOUND_TOKEN_VALUE, RelayPair, relay_builder};
pub use upstream::{RecordedRequest, Upstream};

/// Returns an HTTP client whose requests time out after `timeout` and that returns redirects
/// instead of following them, so a test gets exactly the response the relay sent.
pub fn no_redirect_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("building the reqwest client failed")
}

/// Returns a request to relay A at `path` with `token` as `x-mte-outbound-token` and
/// `x-mte-upstream: peer`.
pub fn outbound_request(
    client: &reqwest::Client,
    relay_a: &str,
    peer: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    client
        .request(method, format!("{relay_a}{path}"))
        .header("x-mte-outbound-token", token)
        .header("x-mte-upstream", peer)
}

/// Returns a random marker after `label` that no relay could produce by chance.
pub fn marker(label: &str) -> String {
    format!("{label}{}", uuid::Uuid::new_v4().simple())
}

/// Interval between two checks in the polling loops of this harness.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Returns a TCP port that was free on 127.0.0.1 a moment ago.
///
/// The port is released before this returns, so another process can take it before the
/// caller binds it. Tests that need a fixed port accept that small race.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 failed");
    listener.local_addr().expect("reading the local address of a bound listener failed").port()
}

/// A TCP port on 127.0.0.1 that refuses connections while this value lives. A socket is bound to
/// the port without listening, so a connection attempt is reset. No relay or upstream started on
/// port 0 can be given the same port, as can happen with a port from [`free_port`].
pub struct ClosedPort {
    _socket: socket2::Socket,
    port: u16,
}

impl ClosedPort {
    /// Binds a socket to a free port on 127.0.0.1 and keeps it bound until the value is dropped.
    pub fn reserve() -> Self {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .expect("creating a TCP socket failed");
        let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        socket.bind(&any_port.into()).expect("binding 127.0.0.1:0 failed");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|address| address.as_socket())
            .expect("reading the local address of a bound socket failed")
            .port();
        Self { _socket: socket, port }
    }

    /// Returns `127.0.0.1:<port>`, the address a test points a hop at.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Returns byte `index` of the deterministic pattern that `/big` on the upstream streams:
/// byte i is `(i * 31 + 7) % 251`.
pub fn pattern_byte(index: u64) -> u8 {
    // Reducing the index first keeps the product far from overflow for any u64.
    ((index % 251 * 31 + 7) % 251) as u8
}

/// Returns the first `len` bytes of the `/big` pattern.
pub fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern_byte).collect()
}

/// Fills `buf` with the pattern bytes that start at `offset`.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (position, byte) in buf.iter_mut().enumerate() {
        *byte = pattern_byte(offset + position as u64);
    }
}

/// Returns the lowercase hex SHA-256 of the first `len` pattern bytes, computed in 64 KiB
/// pieces so that multi-gigabyte lengths need no large buffer.
pub fn pattern_sha256_hex(len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut piece = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    while offset < len {
        let size = piece.len().min((len - offset) as usize);
        fill_pattern(offset, &mut piece[..size]);
        hasher.update(&piece[..size]);
        offset += size as u64;
    }
    hex::encode(hasher.finalize())
}

/// Returns the lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Calls `condition` every [`POLL_INTERVAL`] until it returns true or `timeout` passes.
/// Returns whether the condition became true.
///
/// It sleeps the calling thread, so inside `#[tokio::test]` it also stalls that test's
/// runtime. The upstream and the recorder have their own runtimes and keep running.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Returns the `host:port` part of an `http://host:port/...` URL, or `url` unchanged when it
/// has no scheme.
pub fn host_port(url: &str) -> &str {
    let without_scheme = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).unwrap_or(url);
    match without_scheme.find('/') {
        Some(end) => &without_scheme[..end],
        None => without_scheme,
    }
}
