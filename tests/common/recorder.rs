//! A TCP forwarder that records every byte in both directions, and `send_raw` to write exact
//! request bytes to a server (for example to replay a captured request).
//!
//! Both accept only loopback addresses, so a test cannot send traffic off the machine.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::background::BackgroundServer;
use super::host_port;

/// Default time that `send_raw` waits for the server to close the connection.
pub const SEND_RAW_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum time the forwarder waits to connect to its target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of one forwarded connection, per direction.
#[derive(Clone, Debug, Default)]
pub struct ConnectionCapture {
    pub client_to_server: Vec<u8>,
    pub server_to_client: Vec<u8>,
}

#[derive(Default)]
struct Capture {
    /// Bytes of every connection and both directions, in the order the forwarder read them.
    all: Vec<u8>,
    connections: Vec<ConnectionCapture>,
}

#[derive(Clone, Copy)]
enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Capture {
    fn record(&mut self, connection: usize, direction: Direction, bytes: &[u8]) {
        self.all.extend_from_slice(bytes);
        let capture = &mut self.connections[connection];
        match direction {
            Direction::ClientToServer => capture.client_to_server.extend_from_slice(bytes),
            Direction::ServerToClient => capture.server_to_client.extend_from_slice(bytes),
        }
    }
}

/// A forwarder on 127.0.0.1 that relays every connection to a target address and records
/// the bytes. Dropping it closes the listener and every forwarded connection.
pub struct TcpRecorder {
    server: BackgroundServer,
    target: SocketAddr,
    capture: Arc<Mutex<Capture>>,
}

impl TcpRecorder {
    /// Starts a forwarder to `target`, given as `host:port` or as an `http://` URL whose
    /// path is ignored. Panics unless the target resolves to a loopback address.
    pub fn start(target: &str) -> TcpRecorder {
        let target = resolve_loopback(host_port(target));
        let capture = Arc::new(Mutex::new(Capture::default()));
        let shared = Arc::clone(&capture);
        let server =
            BackgroundServer::start("tcp-recorder", move |listener| accept_loop(listener, target, shared));
        TcpRecorder { server, target, capture }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Returns `http://127.0.0.1:PORT` of the forwarder, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Returns all bytes of all connections and both directions, in the order read.
    pub fn captured(&self) -> Vec<u8> {
        self.capture.lock().unwrap().all.clone()
    }

    /// Returns the bytes that each client sent, one entry per connection in accept order.
    pub fn client_to_server(&self) -> Vec<Vec<u8>> {
        self.connections().into_iter().map(|capture| capture.client_to_server).collect()
    }

    /// Returns the bytes that the target sent, one entry per connection in accept order.
    pub fn server_to_client(&self) -> Vec<Vec<u8>> {
        self.connections().into_iter().map(|capture| capture.server_to_client).collect()
    }

    pub fn connections(&self) -> Vec<ConnectionCapture> {
        self.capture.lock().unwrap().connections.clone()
    }

    pub fn connection_count(&self) -> usize {
        self.capture.lock().unwrap().connections.len()
    }

    /// Empties every recorded buffer. The connection count stays the same, and connections
    /// that are still open keep recording into their emptied entries.
    pub fn clear(&self) {
        let mut capture = self.capture.lock().unwrap();
        capture.all.clear();
        for connection in &mut capture.connections {
            *connection = ConnectionCapture::default();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, target: SocketAddr, capture: Arc<Mutex<Capture>>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(forward(client, target, Arc::clone(&capture)));
            }
            Err(error) => {
                eprintln!("tcp recorder: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn forward(client: tokio::net::TcpStream, target: SocketAddr, capture: Arc<Mutex<Capture>>) {
    let server = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(server)) => server,
        Ok(Err(error)) => return eprintln!("tcp recorder: connecting to {target} failed: {error}"),
        Err(_) => return eprintln!("tcp recorder: connecting to {target} timed out"),
    };
    let index = {
        let mut capture = capture.lock().unwrap();
        capture.connections.push(ConnectionCapture::default());
        capture.connections.len() - 1
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, &capture, index, Direction::ClientToServer),
        pump(server_read, client_write, &capture, index, Direction::ServerToClient),
    );
}

/// Copies bytes from `from` to `to` until end of stream or an error, recording each piece
/// before forwarding it, then closes the sending side of `to`.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    capture: &Mutex<Capture>,
    connection: usize,
    direction: Direction,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let count = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        capture.lock().unwrap().record(connection, direction, &buffer[..count]);
        if to.write_all(&buffer[..count]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Connects to `addr`, writes `request` and returns every byte received until the server
/// closes the connection or [`SEND_RAW_TIMEOUT`] passes.
///
/// A keep-alive server only closes after its idle timeout, so a request that should return
/// quickly must carry `Connection: close`.
pub fn send_raw(addr: &str, request: &[u8]) -> Vec<u8> {
    send_raw_with_timeout(addr, request, SEND_RAW_TIMEOUT)
}

/// Same as [`send_raw`] with an explicit total `timeout` for connecting, writing and
/// reading. `addr` is `host:port` or an `http://` URL whose path is ignored.
pub fn send_raw_with_timeout(addr: &str, request: &[u8], timeout: Duration) -> Vec<u8> {
    let target = resolve_loopback(host_port(addr));
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .unwrap_or_else(|error| panic!("send_raw: connecting to {target} failed: {error}"));
    stream.set_write_timeout(Some(timeout)).expect("setting the write timeout failed");
    stream.write_all(request).unwrap_or_else(|error| panic!("send_raw: writing to {target} failed: {error}"));
    read_until_close(&mut stream, deadline)
}

/// Reads until end of stream, a connection reset or `deadline`, and returns what arrived.
fn read_until_close(stream: &mut TcpStream, deadline: Instant) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return received;
        }
        stream.set_read_timeout(Some(remaining)).expect("setting the read timeout failed");
        match stream.read(&mut buffer) {
            Ok(0) => return received,
            Ok(count) => received.extend_from_slice(&buffer[..count]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock and TimedOut mean the deadline passed. A reset also ends the response.
            Err(_) => return received,
        }
    }
}

/// Resolves `host_port` and panics unless the first address is a loopback address.
fn resolve_loopback(host_port: &str) -> SocketAddr {
    let addr = host_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("invalid address {host_port:?}, expected host:port"));
    assert!(
        addr.ip().is_loopback(),
        "address {addr} is not a loopback address; the tests only talk to 127.0.0.1"
    );
    addr
}
