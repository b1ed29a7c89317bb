//! Black-box tests of `OUTBOUND_ALLOWLIST` on relay A: spellings of `x-mte-upstream` that try to
//! reach another address than the listed peer, redirects from a listed peer, and the start-up
//! warning without an allow-list.
//!
//! Every rejected value must be rejected before relay A opens any connection. Listeners that
//! count their accepted connections sit at the addresses the values would reach, all on
//! 127.0.0.x. Values that would reach `::1` or a DNS name have no listener, because the tests
//! bind loopback IPv4 addresses only, and `.invalid` names never resolve.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{OUTBOUND_TOKEN_VALUE, TcpRecorder, Upstream, relay_builder};
use serde_json::Value;

/// Client timeout of every request in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a listener gets to register a connection that relay A might open late.
const LATE_CONNECT_WAIT: Duration = Duration::from_millis(300);
/// Message of the start-up warning about a missing allow-list.
const NO_ALLOWLIST_WARNING: &str = "any caller with the outbound token can reach any host";

fn client() -> reqwest::Client {
    common::no_redirect_client(REQUEST_TIMEOUT)
}

/// A listener on a loopback address that counts accepted connections. Each connection gets
/// `response`, if set, after the request head arrived, and is then closed.
struct CountingListener {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CountingListener {
    /// Binds `ip:0`, which must be a 127.0.0.x address.
    fn start(ip: &str, response: Option<String>) -> CountingListener {
        let listener =
            TcpListener::bind((ip, 0)).unwrap_or_else(|error| panic!("binding {ip}:0 failed: {error}"));
        let addr = listener.local_addr().expect("reading the listener address failed");
        assert!(addr.ip().is_loopback(), "{addr} is not a loopback address");
        listener.set_nonblocking(true).expect("switching the listener to non-blocking mode failed");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&accepted), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        if let Some(response) = &response {
                            answer(stream, response);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        CountingListener { addr, accepted, stop, thread: Some(thread) }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads until the end of the request head (or 5 s pass), writes `response` and closes.
fn answer(mut stream: std::net::TcpStream, response: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => head.extend_from_slice(&buffer[..count]),
        }
    }
    let _ = stream.write_all(response.as_bytes());
}

/// Sends a GET through relay A with `x-mte-upstream: peer` and returns the status and the
/// JSON error body (`Value::Null` when the body is not JSON).
async fn send_outbound(client: &reqwest::Client, relay_a: &str, peer: &str) -> (u16, Value) {
    let response = client
        .get(format!("{relay_a}/echo/allowlist"))
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", peer)
        .send()
        .await
        .unwrap_or_else(|error| panic!("request with x-mte-upstream {peer:?} failed: {error}"));
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("reading the response body failed");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn other_spellings_and_peers_are_rejected_without_connecting() {
    let upstream = Upstream::start();
    let relay_b = relay_builder(&upstream.url()).spawn();
    // The only allowed peer is this recorder in front of relay B, so every connection relay A
    // opens to the allowed address shows up in its count.
    let allowed = TcpRecorder::start(&relay_b.url());
    let allowed_port = allowed.addr().port();
    let relay_a = relay_builder(&upstream.url()).env("OUTBOUND_ALLOWLIST", allowed.url()).spawn();
    let other_port = CountingListener::start("127.0.0.1", None);
    let other_host = CountingListener::start("127.0.0.2", None);
    let (p, q, x) = (allowed_port, other_port.port(), other_host.port());
    let client = client();

    let cases: Vec<(String, u16)> = vec![
        // Credentials, fragments and backslashes that hide the real host.
        (format!("http://127.0.0.1:{p}@evil.invalid"), 400),
        (format!("http://127.0.0.1:{p}@127.0.0.2:{x}"), 400),
        (format!("http://evil.invalid#@127.0.0.1:{p}"), 400),
        (format!("http://127.0.0.2:{x}#@127.0.0.1:{p}"), 400),
        (format!("http://127.0.0.2:{x}\\@127.0.0.1:{p}"), 400),
        // Other spellings of 127.0.0.1, which the URL parser would turn into the allowed host.
        (format!("http://127.1:{p}"), 400),
        (format!("http://2130706433:{p}"), 400),
        (format!("http://0x7f000001:{p}"), 400),
        (format!("http://0177.0.0.1:{p}"), 400),
        (format!("http://127.000.000.001:{p}"), 400),
        (format!("http://[::ffff:127.0.0.1]:{p}"), 400),
        (format!("http://localhost.:{p}"), 400),
        (format!("HTTP://127.0.0.1:{p}"), 400),
        (format!("Http://127.0.0.1:{p}"), 400),
        (format!("http://LOCALHOST:{p}"), 400),
        (format!("http://127.0.0.1:0{p}"), 400),
        // Canonical values that name another peer.
        (format!("http://[::ffff:7f00:1]:{p}"), 403),
        (format!("http://[::1]:{p}"), 403),
        (format!("http://localhost:{p}"), 403),
        (format!("https://127.0.0.1:{p}"), 403),
        (format!("http://127.0.0.1:{q}"), 403),
        (format!("http://127.0.0.2:{x}"), 403),
        (format!("http://127.0.0.2:{p}"), 403),
        ("http://127.0.0.1".to_owned(), 403),
    ];

    for (peer, expected) in &cases {
        let (status, json) = send_outbound(&client, &relay_a.url(), peer).await;
        assert_eq!(status, *expected, "x-mte-upstream {peer:?}: body {json}");
        assert_eq!(json["code"], *expected, "x-mte-upstream {peer:?}: JSON error body {json}");
        thread::sleep(LATE_CONNECT_WAIT);
        assert_eq!(allowed.connection_count(), 0, "x-mte-upstream {peer:?} reached the allowed peer");
        assert_eq!(other_port.accepted(), 0, "x-mte-upstream {peer:?} reached 127.0.0.1:{q}");
        assert_eq!(other_host.accepted(), 0, "x-mte-upstream {peer:?} reached 127.0.0.2:{x}");
    }
    assert_eq!(upstream.request_count(), 0, "a rejected request reached the upstream");

    // The listed peer, written canonically, works and is seen by the recorder.
    let (status, json) = send_outbound(&client, &relay_a.url(), &allowed.url()).await;
    assert_eq!(status, 200, "allowed peer {}: body {json}", allowed.url());
    assert!(allowed.connection_count() > 0, "the allowed request did not pass the recorder");
    assert_eq!(upstream.request_count(), 1, "upstream requests after the allowed request");
}

#[tokio::test]
async fn redirect_from_allowed_peer_is_not_followed() {
    let upstream = Upstream::start();
    let forbidden = CountingListener::start("127.0.0.2", None);
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nLocation: {}/api/mte-relay\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        forbidden.url()
    );
    let fake_peer = CountingListener::start("127.0.0.1", Some(redirect));
    let relay_a = relay_builder(&upstream.url()).env("OUTBOUND_ALLOWLIST", fake_peer.url()).spawn();

    let (status, json) = send_outbound(&client(), &relay_a.url(), &fake_peer.url()).await;

    assert_eq!(status, 502, "body {json}");
    assert!(fake_peer.accepted() > 0, "relay A never contacted the allowed peer");
    thread::sleep(LATE_CONNECT_WAIT);
    assert_eq!(forbidden.accepted(), 0, "relay A followed the redirect to {}", forbidden.url());
    assert_eq!(upstream.request_count(), 0);
}

#[test]
fn missing_allowlist_is_warned_about_at_startup() {
    let upstream = Upstream::start();
    let open = relay_builder(&upstream.url()).spawn();
    let listed =
        relay_builder(&upstream.url()).env("OUTBOUND_ALLOWLIST", "https://relay-b.example.com").spawn();

    let warning = open.wait_for_log(Duration::from_secs(5), |line| line.contains(NO_ALLOWLIST_WARNING));
    let warning = warning.unwrap_or_else(|| panic!("no allow-list warning\n{}", open.output_report()));
    let record: Value = serde_json::from_str(&warning).expect("the warning is a JSON log line");
    assert_eq!(record["level"], "WARN", "{record}");
    assert!(warning.contains("OUTBOUND_ALLOWLIST"), "the warning names no setting: {warning}");

    let started = listed.wait_for_log(Duration::from_secs(5), |line| line.contains("listening at"));
    assert!(started.is_some(), "{}", listed.output_report());
    let listed_warning = listed.log_lines().into_iter().find(|line| line.contains(NO_ALLOWLIST_WARNING));
    assert_eq!(listed_warning, None, "warning logged although OUTBOUND_ALLOWLIST is set");
}
