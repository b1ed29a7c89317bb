//! A TCP forwarder that passes every request to its target except the requests that carry a
//! chosen header field, which it keeps instead of forwarding.
//!
//! Put between relay A and relay B with the field `x-mte-relay-eh`, it lets pairing through
//! and holds back each sealed exchange, so a test gets exchange bytes that relay B never saw.
//! Relay A gets no response to a held request and gives up after its `UPSTREAM_TIMEOUT_SECS`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::background::BackgroundServer;
use super::raw_request::RawRequest;
use super::{host_port, wait_until};

/// Maximum time the forwarder waits to connect to its target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A forwarder on 127.0.0.1. Dropping it closes the listener and every connection.
pub struct HoldingForwarder {
    server: BackgroundServer,
    held_requests: Arc<Mutex<Vec<RawRequest>>>,
}

impl HoldingForwarder {
    /// Starts a forwarder to `target` (`host:port` or an `http://` URL) that holds back
    /// every request with a field named `held_field`. Panics unless `target` is a loopback
    /// address.
    pub fn start(target: &str, held_field: &'static str) -> HoldingForwarder {
        let target: SocketAddr = host_port(target)
            .parse()
            .unwrap_or_else(|_| panic!("invalid target {target:?}, expected 127.0.0.1:PORT"));
        assert!(target.ip().is_loopback(), "target {target} is not a loopback address");
        let held_requests = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&held_requests);
        let server = BackgroundServer::start("holding-forwarder", move |listener| async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, target, held_field, Arc::clone(&shared)));
            }
        });
        HoldingForwarder { server, held_requests }
    }

    /// Returns `http://127.0.0.1:PORT` of the forwarder.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Returns the requests held back so far, in arrival order.
    pub fn held_requests(&self) -> Vec<RawRequest> {
        self.held_requests.lock().unwrap().clone()
    }

    /// Waits until at least `count` requests are held and returns them. Panics after
    /// `timeout`.
    pub fn wait_for_held(&self, count: usize, timeout: Duration) -> Vec<RawRequest> {
        let arrived = wait_until(timeout, || self.held_requests.lock().unwrap().len() >= count);
        let held_count = self.held_requests().len();
        assert!(arrived, "expected {count} held requests within {timeout:?}, got {held_count}");
        self.held_requests()
    }
}

async fn forward(
    client: tokio::net::TcpStream,
    target: SocketAddr,
    held_field: &'static str,
    held_requests: Arc<Mutex<Vec<RawRequest>>>,
) {
    let server = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(server)) => server,
        _ => return eprintln!("holding forwarder: connecting to {target} failed"),
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let responses = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    let requests = async move {
        let mut buffer = Vec::new();
        let mut piece = vec![0u8; 16 * 1024];
        loop {
            let count = match client_read.read(&mut piece).await {
                Ok(0) | Err(_) => break,
                Ok(count) => count,
            };
            buffer.extend_from_slice(&piece[..count]);
            while let Some((request, len)) = RawRequest::parse_prefix(&buffer) {
                buffer.drain(..len);
                if request.header(held_field).is_some() {
                    held_requests.lock().unwrap().push(request);
                } else if server_write.write_all(&request.bytes).await.is_err() {
                    return;
                }
            }
        }
        let _ = server_write.shutdown().await;
    };
    tokio::join!(responses, requests);
}
