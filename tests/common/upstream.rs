//! The test upstream: an HTTP/1.1 server on raw tokio TCP that records every request and
//! chooses its response by path prefix of the request target.
//!
//! Raw TCP lets it receive and send exact bytes: non-UTF-8 header values, repeated header
//! fields in order, request targets as sent and bodies that end when the connection closes.
//! Connections are kept alive until the client sends `Connection: close`, stays idle for
//! 60 s, or the route closes the connection. `Expect: 100-continue` is answered with
//! `HTTP/1.1 100 Continue` before the body is read. A HEAD request gets the head that GET
//! would get, without body bytes.
//!
//! The responses for each path are listed in [`super::upstream_routes`].

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use super::background::BackgroundServer;
use super::http1::{self, BodyFraming, Connection, HeaderFields, RequestHead};
use super::upstream_routes::{Reply, Route, write_reply};
use super::wait_until;

pub use super::upstream_routes::{
    BINARY_HEADER_VALUE, CLOSE_BODY, GZIP_BODY, HEAD_CONTENT_LENGTH, echo_json,
};

/// Maximum time a keep-alive connection may stay idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Request target exactly as sent.
    pub target: Vec<u8>,
    /// Header fields in the order sent, names with their original case.
    pub headers: HeaderFields,
    /// Decoded body. Empty for `/sink`, which records only the length and hash.
    pub body: Vec<u8>,
    pub body_len: u64,
    /// Lowercase hex SHA-256 of the decoded body.
    pub body_sha256: String,
}

impl RecordedRequest {
    /// Returns the value of the first field named `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_values(name).first().copied()
    }

    /// Returns the value of the first field named `name` as lossy UTF-8.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name).map(|value| String::from_utf8_lossy(value).into_owned())
    }

    /// Returns the values of every field named `name`, ignoring ASCII case, in order.
    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        http1::header_values(&self.headers, name)
    }

    /// Returns the request target as lossy UTF-8.
    pub fn target_str(&self) -> String {
        String::from_utf8_lossy(&self.target).into_owned()
    }
}

/// A running test upstream on 127.0.0.1. Dropping it stops the server.
pub struct Upstream {
    server: BackgroundServer,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
}

impl Upstream {
    /// Starts the server on an ephemeral port and returns once the port accepts connections.
    pub fn start() -> Upstream {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&requests);
        let server =
            BackgroundServer::start("test-upstream", move |listener| accept_loop(listener, recorded));
        Upstream { server, requests }
    }

    /// Returns the base URL, `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Returns a copy of every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.requests.lock().unwrap().last().cloned()
    }

    /// Waits until at least `count` requests are recorded and returns them all. Panics with
    /// the recorded targets if `timeout` passes first.
    pub fn wait_for_requests(&self, count: usize, timeout: Duration) -> Vec<RecordedRequest> {
        if !wait_until(timeout, || self.request_count() >= count) {
            let targets: Vec<String> = self.requests().iter().map(|r| r.target_str()).collect();
            panic!(
                "upstream expected at least {count} requests within {timeout:?}, \
                 received {}: {targets:?}",
                targets.len()
            );
        }
        self.requests()
    }

    pub fn clear_requests(&self) {
        self.requests.lock().unwrap().clear();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, requests: Arc<Mutex<Vec<RecordedRequest>>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, Arc::clone(&requests)));
            }
            Err(error) => {
                eprintln!("test upstream: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, requests: Arc<Mutex<Vec<RecordedRequest>>>) {
    let mut connection = Connection::new(stream);
    loop {
        let head = match tokio::time::timeout(IDLE_TIMEOUT, connection.read_head()).await {
            Err(_) | Ok(Ok(None)) => return,
            Ok(Ok(Some(head))) => head,
            Ok(Err(error)) => return reject(&mut connection, error).await,
        };
        match serve_request(&mut connection, head, &requests).await {
            Ok(true) => continue,
            Ok(false) => return,
            Err(error) => return reject(&mut connection, error).await,
        }
    }
}

/// Responds to a malformed request with 400 and closes the connection. Other errors, such as a
/// client that disconnected, only close it.
async fn reject(connection: &mut Connection, error: io::Error) {
    eprintln!("test upstream: closing the connection after an error: {error}");
    if error.kind() != io::ErrorKind::InvalidData {
        return;
    }
    let reply = Reply::text(400, format!("invalid request: {error}\n"));
    let _ = write_reply(connection, reply, false, false).await;
    let _ = connection.shutdown().await;
}

/// Reads the body of one request, records it and writes the response. Returns whether the
/// connection stays open for another request.
async fn serve_request(
    connection: &mut Connection,
    head: RequestHead,
    requests: &Mutex<Vec<RecordedRequest>>,
) -> io::Result<bool> {
    let route = Route::parse(&head);
    let framing = head.body_framing()?;
    if head.has_token("expect", "100-continue") {
        connection.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }

    let recorded = read_and_record(connection, &head, framing, route.stores_body()).await?;
    requests.lock().unwrap().push(recorded.clone());

    let reply = route.respond(&head, &recorded).await;
    let keep_alive = head.keep_alive() && !reply.closes_connection();
    write_reply(connection, reply, head.method == "HEAD", keep_alive).await?;
    if !keep_alive {
        connection.shutdown().await?;
    }
    Ok(keep_alive)
}

async fn read_and_record(
    connection: &mut Connection,
    head: &RequestHead,
    framing: BodyFraming,
    store_body: bool,
) -> io::Result<RecordedRequest> {
    let mut body = Vec::new();
    let mut body_len = 0u64;
    let mut hasher = Sha256::new();
    connection
        .read_body(framing, |data| {
            body_len += data.len() as u64;
            hasher.update(data);
            if store_body {
                body.extend_from_slice(data);
            }
        })
        .await?;
    Ok(RecordedRequest {
        method: head.method.clone(),
        target: head.target.clone(),
        headers: head.headers.clone(),
        body,
        body_len,
        body_sha256: hex::encode(hasher.finalize()),
    })
}
