//! HTTP fidelity through a real relay pair: what the application sends reaches the upstream API
//! unchanged except for the hop-by-hop and relay control headers, and what the upstream returns
//! reaches the application unchanged.
//!
//! Every test starts its own upstream and relay pair on 127.0.0.1. Exact bytes go over raw TCP
//! ([`RawConnection`] for requests one after another on one keep-alive connection); reqwest is
//! used where an ordinary client is enough. Most tests repeat their check for the three
//! variants in [`VARIANTS`].

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use api_relay::config::{Config, DEFAULT_KEEP_ALIVE_SECS, Sources};
use common::upstream::{BINARY_HEADER_VALUE, CLOSE_BODY, GZIP_BODY, HEAD_CONTENT_LENGTH};
use common::{
    CLIENT_ID_SECRET_VALUE, ClosedPort, OUTBOUND_TOKEN_VALUE, RawResponse, RecordedRequest, RelayPair,
    TcpRecorder, Upstream, assert_bytes_eq, assert_contains_none, parse_head_response, pattern_bytes,
    sha256_hex,
};

/// Maximum time for connecting to relay A and for each read and write on that connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to wait for bytes that must not arrive, such as a body after the head of a HEAD response.
const QUIET_PERIOD: Duration = Duration::from_millis(300);

/// The per-request options a test repeats its checks with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// `MKE`, the default: nothing to set.
    Mke,
    /// `x-mte-encode-type: MTE`: bodies padded and buffered whole.
    Mte,
    /// `MKE` with `x-mte-encode-headers: false`: the header block travels unsealed.
    PlainHeaders,
}

const VARIANTS: [Variant; 3] = [Variant::Mke, Variant::Mte, Variant::PlainHeaders];

impl Variant {
    /// Returns the `x-mte-encode-*` request headers that select this variant.
    fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Variant::Mke => &[],
            Variant::Mte => &[("x-mte-encode-type", "MTE")],
            Variant::PlainHeaders => &[("x-mte-encode-headers", "false")],
        }
    }
}

/// An upstream API and a relay pair in front of it.
struct Fixture {
    upstream: Upstream,
    pair: RelayPair,
}

impl Fixture {
    fn start() -> Fixture {
        Fixture::start_with(&[], &[])
    }

    /// Starts relay A with `env_a` and relay B with `env_b` added to the required variables.
    fn start_with(env_a: &[(&str, &str)], env_b: &[(&str, &str)]) -> Fixture {
        let upstream = Upstream::start();
        let pair = RelayPair::start_with(&upstream.url(), env_a, env_b);
        Fixture { upstream, pair }
    }

    /// Returns `host:port` of the upstream, as relay B's client must send it in `Host`.
    fn upstream_authority(&self) -> String {
        common::host_port(&self.upstream.url()).to_owned()
    }

    /// Returns a request to relay A that carries the outbound token, relay B's URL and the
    /// headers of `variant`.
    fn request(&self, variant: Variant, method: &str, target: &str) -> Request {
        relay_request(&self.pair, variant, method, target)
    }

    fn connect(&self) -> RawConnection {
        RawConnection::open(&self.pair.a.addr())
    }

    /// Sends `request` on a new connection and returns the final response.
    fn send(&self, request: &Request) -> RawResponse {
        let mut connection = self.connect();
        connection.send(request);
        connection.read_final_response(request.is_head())
    }

    /// Clears the upstream's record, sends `request` and returns the final response with the
    /// one request the upstream received.
    fn exchange(&self, request: &Request) -> (RawResponse, RecordedRequest) {
        self.upstream.clear_requests();
        let response = self.send(request);
        let recorded = self.upstream.wait_for_requests(1, IO_TIMEOUT);
        assert_eq!(recorded.len(), 1, "expected one upstream request for {}", request.target);
        (response, recorded.into_iter().next().unwrap())
    }
}

/// Returns a request to relay A of `pair`, as in [`Fixture::request`].
fn relay_request(pair: &RelayPair, variant: Variant, method: &str, target: &str) -> Request {
    let mut request = Request::new(method, target)
        .header("Host", pair.a.addr())
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", pair.b.url());
    for &(name, value) in variant.headers() {
        request = request.header(name, value);
    }
    request
}

/// An HTTP/1.1 request, written exactly as built.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Request {
    fn new(method: &str, target: &str) -> Request {
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Appends a header line, keeping any earlier line of the same name.
    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Request {
        self.headers.push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body and a matching `Content-Length` line.
    fn body(self, body: &[u8]) -> Request {
        let mut request = self.header("Content-Length", body.len().to_string());
        request.body = body.to_vec();
        request
    }

    /// Sets bytes that follow the head as they are, for framing the caller writes itself.
    fn raw_body(mut self, bytes: &[u8]) -> Request {
        self.body = bytes.to_vec();
        self
    }

    fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Encodes the head; the body follows unless `with_body` is false.
    fn encode(&self, with_body: bool) -> Vec<u8> {
        let mut bytes = format!("{} {} HTTP/1.1\r\n", self.method, self.target).into_bytes();
        for (name, value) in &self.headers {
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        if with_body {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// A keep-alive HTTP/1.1 client connection that reads each response exactly as framed, so
/// stray bytes after a response show up as an error in the next one.
struct RawConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawConnection {
    fn open(addr: &str) -> RawConnection {
        let target: SocketAddr = addr.parse().unwrap_or_else(|_| panic!("invalid address {addr:?}"));
        assert!(target.ip().is_loopback(), "the tests only talk to 127.0.0.1, got {target}");
        let stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)
            .unwrap_or_else(|error| panic!("connecting to {target} failed: {error}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("setting the read timeout failed");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("setting the write timeout failed");
        RawConnection { stream, buffer: Vec::new() }
    }

    fn send(&mut self, request: &Request) {
        self.write(&request.encode(true));
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|error| panic!("writing to relay A failed: {error}"));
    }

    /// Reads more bytes into the buffer. Panics at end of stream or after [`IO_TIMEOUT`].
    fn fill(&mut self, waiting_for: &str) {
        let mut piece = [0u8; 16 * 1024];
        match self.stream.read(&mut piece) {
            Ok(0) => panic!(
                "relay A closed the connection while the test waited for {waiting_for}; unread bytes: {}",
                self.buffer.escape_ascii()
            ),
            Ok(count) => self.buffer.extend_from_slice(&piece[..count]),
            Err(error) => panic!(
                "reading {waiting_for} from relay A failed: {error}; unread bytes: {}",
                self.buffer.escape_ascii()
            ),
        }
    }

    fn take(&mut self, count: usize, waiting_for: &str) -> Vec<u8> {
        while self.buffer.len() < count {
            self.fill(waiting_for);
        }
        self.buffer.drain(..count).collect()
    }

    /// Takes one CRLF-terminated line and returns it without the CRLF.
    fn take_line(&mut self, waiting_for: &str) -> Vec<u8> {
        loop {
            if let Some(end) = common::find_bytes(&self.buffer, b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return line[..end].to_vec();
            }
            self.fill(waiting_for);
        }
    }

    /// Reads the next response, interim 1xx responses included. `head_request` marks a
    /// response to HEAD, which has no body whatever its `Content-Length`.
    fn read_response(&mut self, head_request: bool) -> RawResponse {
        let head_end = loop {
            if let Some(end) = common::find_bytes(&self.buffer, b"\r\n\r\n") {
                break end + 4;
            }
            self.fill("a response head");
        };
        assert!(
            self.buffer.starts_with(b"HTTP/1.1 "),
            "expected a status line, got: {}",
            self.buffer.escape_ascii()
        );
        let head: Vec<u8> = self.buffer.drain(..head_end).collect();
        let mut response = parse_head_response(&head);
        let status = response.status;
        if head_request || status < 200 || status == 204 || status == 304 {
            return response;
        }
        let chunked = response.header("transfer-encoding").is_some_and(|value| value == b"chunked");
        response.body = if chunked {
            self.read_chunked_body()
        } else if let Some(length) = response.header("content-length") {
            let length = String::from_utf8_lossy(length).parse().expect("Content-Length is a number");
            self.take(length, "the response body")
        } else {
            self.read_until_close()
        };
        response
    }

    /// Reads responses until a final one and returns it.
    fn read_final_response(&mut self, head_request: bool) -> RawResponse {
        loop {
            let response = self.read_response(head_request);
            if response.status >= 200 {
                return response;
            }
        }
    }

    fn read_chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.take_line("a chunk size line");
            let digits = String::from_utf8_lossy(&line);
            let digits = digits.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(digits, 16)
                .unwrap_or_else(|_| panic!("invalid chunk size line {:?}", line.escape_ascii().to_string()));
            if size == 0 {
                while !self.take_line("the end of the chunked body").is_empty() {}
                return body;
            }
            body.extend_from_slice(&self.take(size, "chunk data"));
            assert!(
                self.take_line("the CRLF after chunk data").is_empty(),
                "chunk data not followed by CRLF"
            );
        }
    }

    fn read_until_close(&mut self) -> Vec<u8> {
        let mut piece = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut piece) {
                Ok(0) => return std::mem::take(&mut self.buffer),
                Ok(count) => self.buffer.extend_from_slice(&piece[..count]),
                Err(error) => panic!("reading a close-delimited body from relay A failed: {error}"),
            }
        }
    }

    /// Panics if any byte arrives within [`QUIET_PERIOD`], or if one is already buffered.
    fn assert_nothing_more(&mut self, after: &str) {
        assert!(self.buffer.is_empty(), "unexpected bytes after {after}: {}", self.buffer.escape_ascii());
        self.stream.set_read_timeout(Some(QUIET_PERIOD)).expect("setting the read timeout failed");
        let mut piece = [0u8; 1024];
        let result = self.stream.read(&mut piece);
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).expect("setting the read timeout failed");
        match result {
            Ok(0) => panic!("relay A closed the connection after {after}"),
            Ok(count) => panic!("unexpected bytes after {after}: {}", piece[..count].escape_ascii()),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) => panic!("the connection failed after {after}: {error}"),
        }
    }

    /// Returns whether the server closes the connection within `timeout`.
    fn is_closed_within(&mut self, timeout: Duration) -> bool {
        self.stream.set_read_timeout(Some(timeout)).expect("setting the read timeout failed");
        let mut piece = [0u8; 1024];
        let result = self.stream.read(&mut piece);
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).expect("setting the read timeout failed");
        match result {
            Ok(0) => true,
            Ok(count) => panic!("unexpected bytes on an idle connection: {}", piece[..count].escape_ascii()),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(_) => true,
        }
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|error| panic!("invalid JSON {:?}: {error}", bytes.escape_ascii().to_string()))
}

/// Names of the header lines of `headers`, lowercased, in order.
fn lower_names(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    headers.iter().map(|(name, _)| name.to_ascii_lowercase()).collect()
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(IO_TIMEOUT)
        .build()
        .expect("building the reqwest client failed")
}

/// Returns a reqwest GET of `target` through relay A of `pair` with `variant`.
fn reqwest_get(pair: &RelayPair, variant: Variant, target: &str) -> reqwest::RequestBuilder {
    let mut request = reqwest_client()
        .get(format!("{}{target}", pair.a.url()))
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", pair.b.url());
    for (name, value) in variant.headers() {
        request = request.header(*name, *value);
    }
    request
}

/// Checks that `response`, one response from relay A, is a relay error:
/// status `status`, a JSON body `{"error": text, "code": status}`, and none of the test secrets
/// or `hidden` addresses anywhere.
fn assert_relay_error(response: &RawResponse, status: u16, hidden: &[&str]) {
    assert_eq!(response.status, status, "body: {}", response.body_text());
    assert_eq!(response.header("content-type"), Some(b"application/json".as_slice()));
    let body = json(&response.body);
    assert!(body["error"].is_string(), "error is not a string: {body}");
    assert_eq!(body["code"], status, "code differs from the status: {body}");
    let mut whole = Vec::new();
    for (name, value) in &response.headers {
        whole.extend_from_slice(name.as_bytes());
        whole.extend_from_slice(b": ");
        whole.extend_from_slice(value);
        whole.extend_from_slice(b"\r\n");
    }
    whole.extend_from_slice(&response.body);
    let mut secrets = vec![OUTBOUND_TOKEN_VALUE, CLIENT_ID_SECRET_VALUE];
    secrets.extend_from_slice(hidden);
    assert_contains_none(&whole, &secrets);
}

#[test]
fn hop_by_hop_request_headers_are_dropped() {
    let fixture = Fixture::start();
    let hop_by_hop = [
        "x-private-hop",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "proxy-custom",
    ];

    for variant in VARIANTS {
        let request = fixture
            .request(variant, "GET", "/echo/hop")
            .header("Connection", "keep-alive, X-Private-Hop")
            .header("X-Private-Hop", "private-hop-value")
            .header("Keep-Alive", "timeout=5")
            .header("TE", "trailers")
            .header("Trailer", "X-Checksum")
            .header("Upgrade", "h2c")
            .header("Proxy-Authorization", "Basic cHJveHk6cGFzcw==")
            .header("Proxy-Connection", "keep-alive")
            .header("Proxy-Custom", "1")
            .header("X-End-To-End", "kept");

        let (response, recorded) = fixture.exchange(&request);

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        assert_eq!(recorded.header_values("x-end-to-end"), [b"kept"], "{variant:?}");
        let names = lower_names(&recorded.headers);
        for name in hop_by_hop {
            assert!(!names.contains(&name.to_owned()), "{variant:?}: {name} reached the upstream: {names:?}");
        }
        for value in recorded.header_values("connection") {
            let value = String::from_utf8_lossy(value).to_ascii_lowercase();
            assert!(
                !value.contains("x-private-hop"),
                "{variant:?}: application Connection forwarded: {value}"
            );
        }
        let values: Vec<&[u8]> = recorded.headers.iter().map(|(_, value)| value.as_slice()).collect();
        assert!(!values.contains(&b"private-hop-value".as_slice()), "{variant:?}: {names:?}");
    }
}

#[test]
fn control_headers_reach_neither_end() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let request = fixture
            .request(variant, "GET", "/echo/control")
            .header("x-mte-encode-url", "true")
            .header("X-MTE-Custom", "private-control-value");

        let (response, recorded) = fixture.exchange(&request);

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        let upstream_names = lower_names(&recorded.headers);
        assert!(
            upstream_names.iter().all(|name| !name.starts_with("x-mte-")),
            "{variant:?}: control headers reached the upstream: {upstream_names:?}"
        );
        let response_names = lower_names(&response.headers);
        assert!(
            response_names.iter().all(|name| !name.starts_with("x-mte-")),
            "{variant:?}: control headers reached the application: {response_names:?}"
        );
        let mut upstream_values = Vec::new();
        for (_, value) in &recorded.headers {
            upstream_values.extend_from_slice(value);
            upstream_values.push(b'\n');
        }
        assert_contains_none(&upstream_values, &[OUTBOUND_TOKEN_VALUE, "private-control-value"]);
    }
}

#[test]
fn repeated_request_headers_keep_order() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let request = fixture
            .request(variant, "GET", "/echo/repeated")
            .header("X-Dup", "one")
            .header("X-Other", "between")
            .header("x-dup", "two")
            .header("X-Dup", "three, four")
            .header("Accept", "text/plain")
            .header("Accept", "application/json");

        let (response, recorded) = fixture.exchange(&request);

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        let dup: Vec<&[u8]> = recorded.header_values("x-dup");
        assert_eq!(dup, [b"one".as_slice(), b"two", b"three, four"], "{variant:?}");
        let accept: Vec<&[u8]> = recorded.header_values("accept");
        assert_eq!(accept, [b"text/plain".as_slice(), b"application/json"], "{variant:?}");
        assert_eq!(recorded.header_values("x-other"), [b"between"], "{variant:?}");
    }
}

#[test]
fn set_cookie_lines_keep_order() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let response = fixture.send(&fixture.request(variant, "GET", "/cookies"));

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        let cookies: Vec<&[u8]> = response.header_values("set-cookie");
        assert_eq!(cookies, [b"a=1".as_slice(), b"b=2", b"c=3"], "{variant:?}");
        assert_eq!(response.body, b"ok", "{variant:?}");
    }
}

#[test]
fn binary_request_header_arrives_exact() {
    let fixture = Fixture::start();
    let value = b"\x80\xff raw \xfe\xc0 tail";

    for variant in VARIANTS {
        let request = fixture.request(variant, "GET", "/echo/binary").header("X-Raw", value);

        let (response, recorded) = fixture.exchange(&request);

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        assert_eq!(recorded.header_values("x-raw"), [value.as_slice()], "{variant:?}");
    }
}

#[test]
fn binary_response_header_arrives_exact() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let response = fixture.send(&fixture.request(variant, "GET", "/cookies"));

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        assert_eq!(response.header_values("x-binary"), [BINARY_HEADER_VALUE], "{variant:?}");
    }
}

/// Request targets whose bytes must reach the upstream unchanged.
const EXACT_TARGETS: [&str; 9] = [
    "/echo/a%2Fb/c%20d",
    "/echo/query?key=1&key=2&key=1",
    "/echo/matrix;v=1/x?a=1;b=2",
    "/echo/bare?flag&empty=&x=%20y",
    "/echo/mixed?plus=a+b&pct=%25&slash=%2F&raw=/p/?&utf=%C3%A9",
    "/echo/empty-query?",
    "//echo//double//slash",
    "/echo/dots/%2e%2e/./x/../y",
    "/echo/sub-delims!$'()*,:@~?k=!$'()*,;:@~/",
];

fn check_exact_targets(encode_url: &str) {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        for target in EXACT_TARGETS {
            let request = fixture.request(variant, "GET", target).header("x-mte-encode-url", encode_url);

            let (response, recorded) = fixture.exchange(&request);

            assert_eq!(response.status, 200, "{variant:?} {target}: {}", response.body_text());
            assert_eq!(recorded.target_str(), target, "{variant:?}, x-mte-encode-url: {encode_url}");
        }
    }
}

#[test]
fn path_and_query_exact_with_sealed_url() {
    check_exact_targets("true");
}

#[test]
fn path_and_query_exact_with_plain_url() {
    check_exact_targets("false");
}

/// Sends a request for `/echo/after` on `connection` and checks that it works, so the previous
/// response left the connection in a usable state.
fn assert_connection_usable(
    fixture: &Fixture,
    connection: &mut RawConnection,
    variant: Variant,
    after: &str,
) {
    connection.send(&fixture.request(variant, "GET", "/echo/after"));
    let next = connection.read_final_response(false);
    assert_eq!(next.status, 200, "{variant:?}: request after {after}: {}", next.body_text());
    assert_eq!(json(&next.body)["target"], "/echo/after", "{variant:?}: request after {after}");
}

#[test]
fn head_response_keeps_length_without_body() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();

    for variant in VARIANTS {
        connection.send(&fixture.request(variant, "HEAD", "/head"));
        let response = connection.read_final_response(true);

        assert_eq!(response.status, 200, "{variant:?}");
        let length = HEAD_CONTENT_LENGTH.to_string();
        assert_eq!(response.header_values("content-length"), [length.as_bytes()], "{variant:?}");
        assert_eq!(response.header_values("etag"), [b"\"h1\"".as_slice()], "{variant:?}");
        assert_eq!(response.header("transfer-encoding"), None, "{variant:?}");
        connection.assert_nothing_more("the HEAD response");
        assert_connection_usable(&fixture, &mut connection, variant, "HEAD");
    }
}

#[test]
fn head_response_without_length_stays_without() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();

    for variant in VARIANTS {
        // GET /big is chunked, so the upstream's HEAD response has no Content-Length.
        connection.send(&fixture.request(variant, "HEAD", "/big?bytes=1000"));
        let response = connection.read_final_response(true);

        assert_eq!(response.status, 200, "{variant:?}");
        let length = response.header_values("content-length");
        assert!(length.is_empty(), "{variant:?}: relay A invented Content-Length {length:?}");
        connection.assert_nothing_more("the HEAD response");
        assert_connection_usable(&fixture, &mut connection, variant, "HEAD");
    }
}

#[test]
fn no_content_response_has_no_body() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();

    for variant in VARIANTS {
        connection.send(&fixture.request(variant, "GET", "/status/204"));
        let response = connection.read_final_response(false);

        assert_eq!(response.status, 204, "{variant:?}");
        assert_eq!(response.header("content-length"), None, "{variant:?}");
        assert_eq!(response.header("transfer-encoding"), None, "{variant:?}");
        connection.assert_nothing_more("the 204 response");
        assert_connection_usable(&fixture, &mut connection, variant, "204");
    }
}

#[test]
fn not_modified_keeps_etag_without_body() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();

    for variant in VARIANTS {
        let request = fixture.request(variant, "GET", "/status/304").header("If-None-Match", "\"v1\"");
        connection.send(&request);
        let response = connection.read_final_response(false);

        assert_eq!(response.status, 304, "{variant:?}");
        assert_eq!(response.header_values("etag"), [b"\"v1\"".as_slice()], "{variant:?}");
        assert_eq!(response.header("content-length"), None, "{variant:?}: the upstream sent none");
        assert_eq!(response.header("transfer-encoding"), None, "{variant:?}");
        connection.assert_nothing_more("the 304 response");
        assert_connection_usable(&fixture, &mut connection, variant, "304");
    }
}

#[test]
fn gzip_body_passes_through_undecoded() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let request = fixture.request(variant, "GET", "/gzip").header("Accept-Encoding", "gzip");

        let (response, recorded) = fixture.exchange(&request);

        assert_eq!(response.status, 200, "{variant:?}");
        assert_eq!(response.header_values("content-encoding"), [b"gzip".as_slice()], "{variant:?}");
        let length = GZIP_BODY.len().to_string();
        assert_eq!(response.header_values("content-length"), [length.as_bytes()], "{variant:?}");
        assert_bytes_eq(GZIP_BODY, &response.body, &format!("{variant:?}: /gzip body"));
        assert_eq!(recorded.header_values("accept-encoding"), [b"gzip".as_slice()], "{variant:?}");
    }
}

#[test]
fn absent_accept_encoding_stays_absent() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let (response, recorded) = fixture.exchange(&fixture.request(variant, "GET", "/gzip"));

        assert_eq!(response.status, 200, "{variant:?}");
        let accept_encoding = recorded.header_values("accept-encoding");
        assert!(
            accept_encoding.is_empty(),
            "{variant:?}: the relay added Accept-Encoding {accept_encoding:?}"
        );
        assert_bytes_eq(GZIP_BODY, &response.body, &format!("{variant:?}: /gzip body"));
    }
}

#[test]
fn response_lengths_match_bytes_sent() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();
    let big = pattern_bytes(200_000);

    for variant in VARIANTS {
        let cases: [(&str, Vec<u8>); 4] = [
            ("/gzip", GZIP_BODY.to_vec()),
            ("/head", pattern_bytes(HEAD_CONTENT_LENGTH)),
            ("/status/404", b"status 404".to_vec()),
            ("/big?bytes=200000", big.clone()),
        ];
        for (target, expected) in cases {
            connection.send(&fixture.request(variant, "GET", target));
            let response = connection.read_final_response(false);

            let lengths = response.header_values("content-length");
            assert!(lengths.len() <= 1, "{variant:?} {target}: several Content-Length lines {lengths:?}");
            if let Some(length) = response.header("content-length") {
                let length = String::from_utf8_lossy(length).into_owned();
                assert_eq!(length, expected.len().to_string(), "{variant:?} {target}: Content-Length");
            }
            assert_bytes_eq(&expected, &response.body, &format!("{variant:?} {target}: body"));
        }
        // Bytes beyond a declared length would have broken the framing of the next response.
        connection.assert_nothing_more("the last response");
    }
}

#[test]
fn empty_post_arrives_empty() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let request = fixture.request(variant, "POST", "/echo/empty").body(b"");

        let (response, recorded) = fixture.exchange(&request);

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        assert_eq!(recorded.method, "POST", "{variant:?}");
        assert!(recorded.body.is_empty(), "{variant:?}: body {:?}", recorded.body.escape_ascii().to_string());
        assert_eq!(recorded.header_values("content-length"), [b"0".as_slice()], "{variant:?}");
        assert_eq!(recorded.header("transfer-encoding"), None, "{variant:?}");
    }
}

/// Encodes `body` with chunked framing in pieces of `piece_len` bytes, each chunk size line
/// carrying an extension, and a trailer after the last chunk.
fn chunked(body: &[u8], piece_len: usize) -> Vec<u8> {
    let mut framed = Vec::new();
    for piece in body.chunks(piece_len) {
        framed.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        framed.extend_from_slice(piece);
        framed.extend_from_slice(b"\r\n");
    }
    framed.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    framed
}

#[test]
fn chunked_request_body_arrives_whole() {
    // Relay A keeps bodies up to RETRY_BUFFER_BYTES for a retry and streams larger ones.
    let fixture = Fixture::start_with(&[("RETRY_BUFFER_BYTES", "65536")], &[]);
    let small = b"hello chunked world".to_vec();
    let large = pattern_bytes(150_000);

    for variant in VARIANTS {
        for (body, piece_len) in [(&small, 6), (&large, 40_000)] {
            let request = fixture
                .request(variant, "POST", "/echo/chunked")
                .header("Transfer-Encoding", "chunked")
                .raw_body(&chunked(body, piece_len));

            let (response, recorded) = fixture.exchange(&request);

            assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
            assert_eq!(recorded.body_len, body.len() as u64, "{variant:?}");
            assert_eq!(recorded.body_sha256, sha256_hex(body), "{variant:?}, {} bytes", body.len());
            // Relay B sends a body that arrived in one final record with its length. A body
            // relay A streamed in several records stays chunked.
            let whole = body.len() <= 65536 || variant == Variant::Mte;
            let framing = (recorded.header_str("content-length"), recorded.header_str("transfer-encoding"));
            match whole {
                true => assert_eq!(
                    framing,
                    (Some(body.len().to_string()), None),
                    "{variant:?}, {} bytes",
                    body.len()
                ),
                false => {
                    assert_eq!(framing, (None, Some("chunked".into())), "{variant:?}, {} bytes", body.len())
                }
            }
        }
    }
}

#[test]
fn close_delimited_upstream_body_arrives_whole() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();

    for variant in VARIANTS {
        connection.send(&fixture.request(variant, "GET", "/close"));
        let response = connection.read_final_response(false);

        assert_eq!(response.status, 200, "{variant:?}");
        assert_eq!(response.body, CLOSE_BODY, "{variant:?}");
        let closes =
            response.header_values("connection").iter().any(|value| value.eq_ignore_ascii_case(b"close"));
        assert!(!closes, "{variant:?}: the upstream's Connection: close reached the application");
        assert_connection_usable(&fixture, &mut connection, variant, "a close-delimited upstream body");
    }
}

#[test]
fn expect_continue_gets_interim_response() {
    let fixture = Fixture::start();
    let body = b"body sent after 100 Continue";

    for variant in VARIANTS {
        fixture.upstream.clear_requests();
        let mut connection = fixture.connect();
        let request =
            fixture.request(variant, "POST", "/echo/expect").header("Expect", "100-continue").body(body);
        connection.write(&request.encode(false));

        let interim = connection.read_response(false);
        assert_eq!(interim.status, 100, "{variant:?}: expected 100 Continue before the body was sent");
        connection.write(body);
        let response = connection.read_final_response(false);

        assert_eq!(response.status, 200, "{variant:?}: {}", response.body_text());
        let recorded = fixture.upstream.wait_for_requests(1, IO_TIMEOUT);
        assert_eq!(recorded[0].body, body, "{variant:?}");
    }
}

#[tokio::test]
async fn redirect_is_returned_not_followed() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        fixture.upstream.clear_requests();

        let response = reqwest_get(&fixture.pair, variant, "/status/302").send().await.unwrap();

        assert_eq!(response.status(), 302, "{variant:?}");
        assert_eq!(response.headers()["location"], "/elsewhere", "{variant:?}");
        assert_eq!(response.text().await.unwrap(), "status 302", "{variant:?}");
        let targets: Vec<String> =
            fixture.upstream.requests().iter().map(RecordedRequest::target_str).collect();
        assert_eq!(targets, ["/status/302"], "{variant:?}: the relay followed the redirect");
    }
}

#[test]
fn upstream_host_is_its_own_authority() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let request = fixture.request(variant, "GET", "/echo/host");

        let (_, recorded) = fixture.exchange(&request);

        let hosts: Vec<String> =
            recorded.header_values("host").iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        assert_eq!(hosts, [fixture.upstream_authority()], "{variant:?}");
    }
}

#[test]
fn forwarded_headers_appear_once() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let request = fixture
            .request(variant, "GET", "/echo/forwarded")
            .header("X-Forwarded-For", "203.0.113.9")
            .header("X-Forwarded-For", "198.51.100.4")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Proto", "http");

        let (_, recorded) = fixture.exchange(&request);

        let forwarded_for = recorded.header_values("x-forwarded-for");
        assert_eq!(forwarded_for.len(), 1, "{variant:?}: {forwarded_for:?}");
        let chain = String::from_utf8_lossy(forwarded_for[0]).into_owned();
        assert_eq!(chain, "203.0.113.9, 198.51.100.4, 127.0.0.1", "{variant:?}");
        let forwarded_proto = recorded.header_values("x-forwarded-proto");
        assert_eq!(forwarded_proto.len(), 1, "{variant:?}: {forwarded_proto:?}");
        let proto = String::from_utf8_lossy(forwarded_proto[0]).into_owned();
        assert!(proto == "https" || proto == "http", "{variant:?}: X-Forwarded-Proto {proto:?}");
    }
}

#[test]
fn forwarded_headers_name_the_application() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        let (_, recorded) = fixture.exchange(&fixture.request(variant, "GET", "/echo/forwarded"));

        assert_eq!(recorded.header_values("x-forwarded-for"), [b"127.0.0.1".as_slice()], "{variant:?}");
        let forwarded_proto = recorded.header_values("x-forwarded-proto");
        assert_eq!(forwarded_proto, [b"http".as_slice()], "{variant:?}: relay A is reached over plain HTTP");
    }
}

#[test]
fn app_connection_serves_several_requests() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();

    for round in 0..2 {
        for variant in VARIANTS {
            let target = format!("/echo/round-{round}-{variant:?}");
            connection.send(&fixture.request(variant, "POST", &target).body(b"payload"));
            let response = connection.read_final_response(false);

            assert_eq!(response.status, 200, "{target}: {}", response.body_text());
            let echo = json(&response.body);
            assert_eq!(echo["target"], target.as_str());
            assert_eq!(echo["body_len"], 7, "{target}");
        }
    }
}

#[test]
fn relay_hops_reuse_connections() {
    let upstream = Upstream::start();
    let upstream_hop = TcpRecorder::start(&upstream.url());
    let pair = RelayPair::start(&upstream_hop.url(), &[]);
    let peer_hop = TcpRecorder::start(&pair.b.url());
    let mut connection = RawConnection::open(&pair.a.addr());
    let requests = 6;

    for index in 0..requests {
        let mut request = relay_request(&pair, VARIANTS[index % 3], "GET", &format!("/echo/reuse-{index}"));
        request.headers.retain(|(name, _)| name != "x-mte-upstream");
        connection.send(&request.header("x-mte-upstream", peer_hop.url()));
        let response = connection.read_final_response(false);
        assert_eq!(response.status, 200, "request {index}: {}", response.body_text());
    }

    assert_eq!(upstream.request_count(), requests);
    assert_eq!(upstream_hop.connection_count(), 1, "relay B opened one upstream connection per request");
    // Pairing may use connections of its own, so the test requires only fewer connections than
    // requests.
    let peer_connections = peer_hop.connection_count();
    assert!(peer_connections < requests, "relay A opened {peer_connections} connections to relay B");
}

#[test]
fn connection_survives_idle_pause() {
    let fixture = Fixture::start();
    let mut connection = fixture.connect();
    connection.send(&fixture.request(Variant::Mke, "GET", "/echo/before-pause"));
    assert_eq!(connection.read_final_response(false).status, 200);

    thread::sleep(Duration::from_secs(2));

    for variant in VARIANTS {
        assert_connection_usable(&fixture, &mut connection, variant, "a 2 s idle pause");
    }
}

#[test]
fn default_keep_alive_is_75_seconds() {
    let env = [("UPSTREAM", "http://127.0.0.1:9"), ("CLIENT_ID_SECRET", "s"), ("OUTBOUND_TOKEN", "t")];
    let sources = Sources {
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Sources::default()
    };

    let config = Config::from_sources(&sources).expect("the required settings are valid");

    assert_eq!(DEFAULT_KEEP_ALIVE_SECS, 75);
    assert_eq!(config.keep_alive, Duration::from_secs(75));
    // An AWS load balancer closes idle connections after 60 s by default, so the relay must keep
    // them open longer.
    assert!(config.keep_alive > Duration::from_secs(60));
}

#[test]
fn keep_alive_setting_reaches_server() {
    let fixture = Fixture::start_with(&[("KEEP_ALIVE_SECS", "1")], &[]);
    let mut connection = fixture.connect();
    connection.send(&fixture.request(Variant::Mke, "GET", "/echo/idle"));
    assert_eq!(connection.read_final_response(false).status, 200);

    let started = Instant::now();
    let closed = connection.is_closed_within(Duration::from_secs(5));

    assert!(closed, "relay A kept an idle connection open for 5 s with KEEP_ALIVE_SECS=1");
    assert!(started.elapsed() < Duration::from_secs(4), "closed only after {:?}", started.elapsed());
}

#[tokio::test]
async fn upstream_error_statuses_pass_through() {
    let fixture = Fixture::start();

    for variant in VARIANTS {
        for status in [400u16, 401, 404, 409, 429, 500, 502, 503, 504, 560] {
            let target = format!("/status/{status}");

            let response = reqwest_get(&fixture.pair, variant, &target).send().await.unwrap();

            assert_eq!(response.status().as_u16(), status, "{variant:?}");
            assert_eq!(response.headers()["content-type"], "text/plain", "{variant:?} {status}");
            assert_eq!(response.text().await.unwrap(), format!("status {status}"), "{variant:?}");
        }
    }
}

#[test]
fn refused_upstream_is_502() {
    let closed = ClosedPort::reserve();
    let upstream_address = closed.address();
    let pair = RelayPair::start(&format!("http://{upstream_address}"), &[]);

    for variant in VARIANTS {
        let mut connection = RawConnection::open(&pair.a.addr());
        let started = Instant::now();
        connection.send(&relay_request(&pair, variant, "GET", "/echo/refused"));
        let response = connection.read_final_response(false);

        assert!(started.elapsed() < Duration::from_secs(5), "{variant:?}: took {:?}", started.elapsed());
        assert_relay_error(&response, 502, &[&upstream_address]);
    }
}

#[test]
fn slow_upstream_is_504() {
    let fixture = Fixture::start_with(&[], &[("UPSTREAM_TIMEOUT_SECS", "1")]);
    let upstream_address = fixture.upstream_authority();

    for variant in VARIANTS {
        let started = Instant::now();
        let response = fixture.send(&fixture.request(variant, "GET", "/slow?ms=3000"));
        let elapsed = started.elapsed();

        assert!(
            elapsed >= Duration::from_millis(900),
            "{variant:?}: answered before the timeout: {elapsed:?}"
        );
        assert!(elapsed < Duration::from_millis(2500), "{variant:?}: timeout of 1 s took {elapsed:?}");
        assert_relay_error(&response, 504, &[&upstream_address]);
    }
}

#[test]
fn unreachable_peer_relay_is_502() {
    let fixture = Fixture::start();
    let closed = ClosedPort::reserve();
    let closed_peer = format!("http://{}", closed.address());

    for variant in VARIANTS {
        let mut request = fixture.request(variant, "GET", "/echo/no-peer");
        request.headers.retain(|(name, _)| name != "x-mte-upstream");
        let request = request.header("x-mte-upstream", &closed_peer);

        let started = Instant::now();
        let response = fixture.send(&request);

        assert!(started.elapsed() < Duration::from_secs(5), "{variant:?}: took {:?}", started.elapsed());
        assert_relay_error(&response, 502, &[]);
    }
    assert_eq!(fixture.upstream.request_count(), 0);
}

#[test]
fn relay_error_bodies_hide_secrets() {
    let fixture = Fixture::start();
    let hidden = [fixture.upstream_authority()];
    let hidden: Vec<&str> = hidden.iter().map(String::as_str).collect();

    let mut wrong_token = fixture.request(Variant::Mke, "GET", "/echo/token");
    wrong_token.headers.retain(|(name, _)| name != "x-mte-outbound-token");
    let wrong_token = wrong_token.header("x-mte-outbound-token", "wrong-token");
    assert_relay_error(&fixture.send(&wrong_token), 401, &hidden);

    let bad_type = fixture.request(Variant::Mke, "GET", "/echo/type").header("x-mte-encode-type", "XYZ");
    assert_relay_error(&fixture.send(&bad_type), 400, &hidden);

    let bad_flag = fixture.request(Variant::Mke, "GET", "/echo/flag").header("x-mte-encode-url", "maybe");
    assert_relay_error(&fixture.send(&bad_flag), 400, &hidden);

    let mut bad_peer = fixture.request(Variant::Mke, "GET", "/echo/peer");
    bad_peer.headers.retain(|(name, _)| name != "x-mte-upstream");
    let bad_peer = bad_peer.header("x-mte-upstream", "ftp://127.0.0.1:21");
    assert_relay_error(&fixture.send(&bad_peer), 400, &hidden);

    assert_eq!(fixture.upstream.request_count(), 0);
}
