//! Black-box tests of what the relays reject and what they hide. They cover the errors relay A
//! returns to the application, the errors relay B returns for bad exchanges, replayed and
//! tampered exchanges, and the confidentiality of the hop between the relays. They also cover
//! recovery after relay B restarts and many concurrent exchanges through one pair.
//!
//! Every test starts its own upstream and relay processes on 127.0.0.1.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::marker;
use common::{
    CLIENT_ID_SECRET_VALUE, HoldingForwarder, OUTBOUND_TOKEN_VALUE, RawRequest, RelayPair, TcpRecorder,
    Upstream, assert_contains_all, assert_contains_none, find_bytes, parse_responses, relay_builder,
    send_raw, sha256_hex,
};
use reqwest::{Method, RequestBuilder};
use serde_json::Value;

/// Maximum time one request through the relays may take in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time the upstream gets to record a request that already got its response.
const RECORD_WAIT: Duration = Duration::from_secs(5);
/// Name of the control header of the hop between the relays.
const RELAY_HEADER: &str = "x-mte-relay";
/// Name of the header that carries the sealed header block.
const RELAY_EH_HEADER: &str = "x-mte-relay-eh";

fn client() -> reqwest::Client {
    common::no_redirect_client(REQUEST_TIMEOUT)
}

/// Returns a request to relay A at `path` with the outbound token and `x-mte-upstream: peer`.
fn outbound(
    client: &reqwest::Client,
    relay_a: &str,
    peer: &str,
    method: Method,
    path: &str,
) -> RequestBuilder {
    common::outbound_request(client, relay_a, peer, OUTBOUND_TOKEN_VALUE, method, path)
}

/// Reads an error response and checks its status, its JSON shape and that it contains no
/// secret and not the address of `upstream`, the API behind relay B. Returns the parsed body.
async fn expect_error(response: reqwest::Response, status: u16, upstream: &Upstream) -> Value {
    expect_error_hiding(response, status, &upstream.addr().to_string()).await
}

/// Same as [`expect_error`] for an upstream API at `upstream_address` (`host:port`).
async fn expect_error_hiding(response: reqwest::Response, status: u16, upstream_address: &str) -> Value {
    let actual = response.status().as_u16();
    let content_type = response.headers().get("content-type").cloned();
    let body = response.bytes().await.expect("reading the error body failed");
    assert_eq!(actual, status, "unexpected status, body: {}", body.escape_ascii());
    assert_eq!(
        content_type.as_ref().and_then(|value| value.to_str().ok()),
        Some("application/json"),
        "error content type"
    );
    let json: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|error| panic!("error body is not JSON ({error}): {}", body.escape_ascii()));
    assert!(json["error"].as_str().is_some_and(|text| !text.is_empty()), "no error text in {json}");
    assert_eq!(json["code"], status, "code field of {json}");
    assert_contains_none(&body, &[OUTBOUND_TOKEN_VALUE, CLIENT_ID_SECRET_VALUE, upstream_address]);
    json
}

/// Sends `request` to `addr` and returns the first response, parsed. A second request with
/// `Connection: close` follows it on the same connection, so the server closes the
/// connection after responding instead of waiting for its keep-alive timeout.
async fn send_exchange_bytes(addr: &str, request: &[u8]) -> common::RawResponse {
    let mut bytes = request.to_vec();
    bytes.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: relay-b\r\nConnection: close\r\n\r\n");
    let addr = addr.to_owned();
    let raw = tokio::task::spawn_blocking(move || send_raw(&addr, &bytes)).await.expect("send_raw panicked");
    assert!(!raw.is_empty(), "relay B closed the connection without a response");
    parse_responses(&raw).remove(0)
}

/// Returns the `code` field of a raw JSON error response.
fn error_code(response: &common::RawResponse) -> Value {
    let json: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", response.body.escape_ascii()));
    json["code"].clone()
}

// Errors relay A returns to the application.

#[tokio::test]
async fn outbound_without_token_gets_401() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);

    let response = client()
        .get(format!("{}/echo", pair.a.url()))
        .header("x-mte-upstream", pair.b.url())
        .send()
        .await
        .expect("request to relay A failed");

    expect_error(response, 401, &upstream).await;
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn outbound_with_wrong_token_gets_401() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let prefix = &OUTBOUND_TOKEN_VALUE[..OUTBOUND_TOKEN_VALUE.len() - 1];
    let longer = format!("{OUTBOUND_TOKEN_VALUE}x");

    for token in ["wrong-token", "", prefix, &longer] {
        let response = client()
            .get(format!("{}/echo", pair.a.url()))
            .header("x-mte-outbound-token", token)
            .header("x-mte-upstream", pair.b.url())
            .send()
            .await
            .expect("request to relay A failed");

        let json = expect_error(response, 401, &upstream).await;
        if !token.is_empty() {
            assert!(!json.to_string().contains(token), "token {token:?} echoed in {json}");
        }
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn outbound_without_upstream_header_gets_400() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);

    let response = client()
        .get(format!("{}/echo", pair.a.url()))
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .send()
        .await
        .expect("request to relay A failed");

    let json = expect_error(response, 400, &upstream).await;
    assert!(json["error"].as_str().unwrap().contains("x-mte-upstream"), "error names the header: {json}");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn outbound_with_invalid_upstream_header_gets_400() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let port = pair.b.port();
    let invalid = [
        "relay-b".to_owned(),
        "not a url".to_owned(),
        format!("ftp://127.0.0.1:{port}"),
        format!("http://user:password@127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}/?peer=1"),
        format!("http://127.0.0.1:{port}/#fragment"),
    ];

    for value in &invalid {
        let response = outbound(&client(), &pair.a.url(), value, Method::GET, "/echo")
            .send()
            .await
            .expect("request to relay A failed");

        let json = expect_error(response, 400, &upstream).await;
        assert!(json["error"].as_str().unwrap().contains("x-mte-upstream"), "for {value:?}: {json}");
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn outbound_to_peer_off_allowlist_gets_403() {
    let upstream = Upstream::start();
    let b = relay_builder(&upstream.url()).spawn();
    let a = relay_builder(&upstream.url()).env("OUTBOUND_ALLOWLIST", b.url()).spawn();
    let same_port_other_host = format!("http://localhost:{}", b.port());
    let other_port = format!("http://127.0.0.1:{}", common::free_port());

    for peer in [&same_port_other_host, &other_port] {
        let response = outbound(&client(), &a.url(), peer, Method::GET, "/echo")
            .send()
            .await
            .expect("request to relay A failed");

        let json = expect_error(response, 403, &upstream).await;
        assert!(!json.to_string().contains(peer.as_str()), "peer {peer} echoed in {json}");
    }
    assert_eq!(upstream.request_count(), 0);

    let allowed = outbound(&client(), &a.url(), &b.url(), Method::GET, "/echo/allowed")
        .send()
        .await
        .expect("request to relay A failed");
    assert_eq!(allowed.status(), 200, "the peer on the allow-list must be reached");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn outbound_with_invalid_encode_type_gets_400() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);

    for (header, value) in [
        ("x-mte-encode-type", "AES"),
        ("x-mte-encode-type", ""),
        ("x-mte-encode-headers", "maybe"),
        ("x-mte-encode-url", "2"),
    ] {
        let response = outbound(&client(), &pair.a.url(), &pair.b.url(), Method::GET, "/echo")
            .header(header, value)
            .send()
            .await
            .expect("request to relay A failed");

        let json = expect_error(response, 400, &upstream).await;
        assert!(json["error"].as_str().unwrap().contains(header), "{header}: {value:?} gave {json}");
    }
    assert_eq!(upstream.request_count(), 0);
}

/// Returns a body stream that sends `len` bytes in chunks of `chunk` bytes, so the request
/// goes out chunked without a `Content-Length`.
fn chunked_body(len: usize, chunk: usize) -> reqwest::Body {
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..len).step_by(chunk).map(|start| Ok(vec![b'x'; chunk.min(len - start)])).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))
}

/// Sends bodies over and at `MAX_BODY_BYTES=4096` through a pair whose relay A keeps
/// `retry_buffer` bytes for a retry, and checks that only the body at the limit passes.
async fn body_over_limit_gets_413(retry_buffer: &str) {
    let upstream = Upstream::start();
    let env = [("MAX_BODY_BYTES", "4096"), ("RETRY_BUFFER_BYTES", retry_buffer)];
    let pair = RelayPair::start(&upstream.url(), &env);
    let send = |encode_type: &'static str, body: reqwest::Body| {
        outbound(&client(), &pair.a.url(), &pair.b.url(), Method::POST, "/sink")
            .header("x-mte-encode-type", encode_type)
            .body(body)
            .send()
    };

    for encode_type in ["MKE", "MTE"] {
        let with_length = send(encode_type, reqwest::Body::from(vec![b'x'; 8192])).await.unwrap();
        expect_error(with_length, 413, &upstream).await;

        let chunked = send(encode_type, chunked_body(8192, 512)).await.unwrap();
        expect_error(chunked, 413, &upstream).await;

        let one_byte_over = send(encode_type, chunked_body(4097, 512)).await.unwrap();
        expect_error(one_byte_over, 413, &upstream).await;
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(upstream.request_count(), 0, "no oversized body may reach the upstream");
    let logged = pair.a.wait_for_log(Duration::from_secs(5), |line| {
        line.contains("outbound request rejected") && line.contains("4096 bytes")
    });
    assert!(logged.is_some(), "relay A logged no rejection of a body over the limit");

    for encode_type in ["MKE", "MTE"] {
        let at_limit = send(encode_type, chunked_body(4096, 512)).await.unwrap();
        assert_eq!(at_limit.status(), 200, "{encode_type}: a body of exactly MAX_BODY_BYTES must pass");
        let summary: Value =
            serde_json::from_slice(&at_limit.bytes().await.unwrap()).expect("the /sink response is JSON");
        assert_eq!(summary["body_len"], 4096);
    }
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn outbound_buffered_body_over_limit_gets_413() {
    // Every body of this test fits in a retry buffer of 1 MiB.
    body_over_limit_gets_413("1048576").await;
}

#[tokio::test]
async fn outbound_streamed_body_over_limit_gets_413() {
    // Bodies above 1024 bytes stream to relay B, so the limit is checked while streaming.
    body_over_limit_gets_413("1024").await;
}

#[tokio::test]
async fn request_without_relay_headers_gets_569() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);

    for relay in [pair.a.url(), pair.b.url()] {
        for (method, path) in [(Method::GET, "/echo"), (Method::POST, "/"), (Method::GET, "/api/other")] {
            let response = client()
                .request(method.clone(), format!("{relay}{path}"))
                .send()
                .await
                .expect("request to the relay failed");

            let json = expect_error(response, 569, &upstream).await;
            assert!(json["error"].as_str().unwrap().contains("x-mte-relay"), "{method} {path}: {json}");
        }
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn unreachable_upstream_gets_502_without_address() {
    let closed = common::ClosedPort::reserve();
    let closed_address = closed.address();
    let pair = RelayPair::start(&format!("http://{closed_address}"), &[]);

    let response = outbound(&client(), &pair.a.url(), &pair.b.url(), Method::GET, "/echo")
        .send()
        .await
        .expect("request to relay A failed");

    expect_error_hiding(response, 502, &closed_address).await;
}

#[tokio::test]
async fn slow_upstream_gets_504_without_address() {
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(
        &upstream.url(),
        &[("UPSTREAM_TIMEOUT_SECS", "10")],
        &[("UPSTREAM_TIMEOUT_SECS", "1")],
    );

    let response = outbound(&client(), &pair.a.url(), &pair.b.url(), Method::GET, "/slow?ms=3000")
        .send()
        .await
        .expect("request to relay A failed");

    expect_error(response, 504, &upstream).await;
}

// Errors relay B returns for exchanges it cannot accept, sent to it directly.

/// Returns a client id that relay B signed, from `HEAD /api/mte-relay`.
async fn issued_client_id(relay_b: &str) -> String {
    let response =
        client().head(format!("{relay_b}/api/mte-relay")).send().await.expect("HEAD /api/mte-relay failed");
    assert_eq!(response.status(), 200);
    let id = response.headers().get(RELAY_HEADER).expect("no x-mte-relay in the response");
    id.to_str().expect("client id is not text").to_owned()
}

/// Sends a sealed-looking exchange straight to relay B with the given `x-mte-relay` value.
async fn send_to_b(relay_b: &str, relay_header: &str) -> reqwest::Response {
    client()
        .post(format!("{relay_b}/c2VhbGVkLXVybA"))
        .header(RELAY_HEADER, relay_header)
        .header(RELAY_EH_HEADER, "c2VhbGVkLWhlYWRlcnM")
        .body(vec![0u8; 64])
        .send()
        .await
        .expect("request to relay B failed")
}

#[tokio::test]
async fn inbound_malformed_relay_header_gets_561() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let client_id = issued_client_id(&pair.b.url()).await;
    let pair_id = "0123456789abcdef0123456789abcdef";
    let malformed = [
        "garbage".to_owned(),
        format!("{client_id},{pair_id},MKE,1,1,1,1"),
        format!("{client_id},{pair_id},XYZ,1,1,1,1,1"),
        format!("{client_id},{pair_id},MKE,1,1,1,not-a-number,1"),
        format!("{client_id},{pair_id},MKE,2,1,1,1,1"),
        format!("{client_id},short-pair-id,MKE,1,1,1,1,1"),
    ];

    for value in &malformed {
        let response = send_to_b(&pair.b.url(), value).await;

        expect_error(response, 561, &upstream).await;
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn inbound_invalid_client_id_gets_566() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let issued = issued_client_id(&pair.b.url()).await;
    let (uuid, mac) = issued.split_once('.').expect("client id has a uuid and a signature");
    let flipped = if mac.starts_with('0') { "1" } else { "0" };
    let invalid = [
        format!("{uuid}.{flipped}{}", &mac[1..]),
        format!("{}.{mac}", uuid::Uuid::new_v4()),
        format!("{uuid}.{}", "0".repeat(64)),
        "not-a-client-id".to_owned(),
    ];

    for client_id in &invalid {
        let value = format!("{client_id},0123456789abcdef0123456789abcdef,MKE,1,1,1,1,1");
        let response = send_to_b(&pair.b.url(), &value).await;

        expect_error(response, 566, &upstream).await;
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn inbound_unknown_pair_gets_560() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let client_id = issued_client_id(&pair.b.url()).await;
    let pair_id = uuid::Uuid::new_v4().simple().to_string();

    let response = send_to_b(&pair.b.url(), &format!("{client_id},{pair_id},MKE,1,1,1,1,1")).await;

    expect_error(response, 560, &upstream).await;
    assert_eq!(upstream.request_count(), 0);
}

// Replayed and tampered exchanges.

/// Returns the one sealed exchange in the bytes relay A sent through `recorder`.
fn recorded_exchange(recorder: &TcpRecorder) -> RawRequest {
    let requests: Vec<RawRequest> =
        recorder.client_to_server().iter().flat_map(|bytes| RawRequest::split_all(bytes)).collect();
    let lines: Vec<String> = requests.iter().map(RawRequest::request_line).collect();
    let mut exchanges: Vec<RawRequest> =
        requests.into_iter().filter(|request| request.header(RELAY_EH_HEADER).is_some()).collect();
    assert_eq!(exchanges.len(), 1, "expected one exchange among the recorded requests {lines:?}");
    exchanges.remove(0)
}

/// Returns the ranges of each sealed record (ciphertext and tag) in an unframed sealed body,
/// with whether it is the final record.
fn sealed_records(body: &[u8]) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut records = Vec::new();
    let mut position = 0;
    while position < body.len() {
        let header = &body[position..position + 4];
        let len = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
        records.push((position + 4..position + 4 + len, header[0] == 1));
        position += 4 + len;
    }
    assert_eq!(position, body.len(), "sealed records do not fill the body");
    records
}

/// Returns tampered copies of `exchange`, each with one change, a label and the status relay B
/// must return for it.
fn tampered_copies(exchange: &RawRequest) -> Vec<(&'static str, Vec<u8>, u16)> {
    let body = exchange.body();
    let records = sealed_records(&body);
    let first = records[0].0.clone();
    let middle_of_first = exchange.body_byte_index(first.start + first.len() / 2);
    let record_flags = exchange.body_byte_index(0);

    let header_block = exchange.header(RELAY_EH_HEADER).expect("exchange has a header block").to_vec();
    let mut header_block_changed = header_block.clone();
    let middle = header_block.len() / 2;
    header_block_changed[middle] = if header_block[middle] == b'A' { b'B' } else { b'A' };

    let relay = String::from_utf8(exchange.header(RELAY_HEADER).unwrap().to_vec()).unwrap();
    let mut fields: Vec<String> = relay.split(',').map(str::to_owned).collect();
    let seq: u64 = fields[6].parse().expect("seq is a number");
    fields[6] = (seq + 1).to_string();
    let next_seq = fields.join(",");

    let url_byte = exchange.target_byte_index(exchange.target().len() / 2);
    let url_char = exchange.bytes[url_byte];
    let url_mask = if url_char == b'A' { b'A' ^ b'B' } else { url_char ^ b'A' };

    vec![
        ("body ciphertext byte flipped", exchange.with_byte_flipped(middle_of_first, 0x01), 562),
        ("header block changed", exchange.with_header_value(RELAY_EH_HEADER, &header_block_changed), 562),
        ("sealed url changed", exchange.with_byte_flipped(url_byte, url_mask), 562),
        ("seq moved to an unused number", exchange.with_header_value(RELAY_HEADER, next_seq.as_bytes()), 562),
        ("record flags invalid", exchange.with_byte_flipped(record_flags, 0x80), 565),
    ]
}

#[tokio::test]
async fn replayed_exchange_gets_563() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let recorder = TcpRecorder::start(&pair.b.url());

    let response = outbound(&client(), &pair.a.url(), &recorder.url(), Method::POST, "/echo/replay")
        .body("replay-me")
        .send()
        .await
        .expect("request through the relays failed");
    assert_eq!(response.status(), 200);
    upstream.wait_for_requests(1, RECORD_WAIT);
    let exchange = recorded_exchange(&recorder);

    let replayed = send_exchange_bytes(&pair.b.addr(), &exchange.bytes).await;

    assert_eq!(replayed.status, 563, "replay body: {}", replayed.body_text());
    assert_eq!(error_code(&replayed), 563);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(upstream.request_count(), 1, "the upstream must see the exchange exactly once");
}

#[tokio::test]
async fn tampered_copy_of_accepted_exchange_gets_open_error() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let recorder = TcpRecorder::start(&pair.b.url());
    let response = outbound(&client(), &pair.a.url(), &recorder.url(), Method::POST, "/echo/tamper")
        .body(vec![b't'; 300])
        .send()
        .await
        .expect("request through the relays failed");
    assert_eq!(response.status(), 200);
    upstream.wait_for_requests(1, RECORD_WAIT);
    let exchange = recorded_exchange(&recorder);

    for (label, bytes, status) in tampered_copies(&exchange) {
        let rejection = send_exchange_bytes(&pair.b.addr(), &bytes).await;

        // The exchange's seq was accepted already, so a status other than 563 shows that
        // relay B checked the sealed items before the replay window.
        assert_eq!(rejection.status, status, "{label}: {}", rejection.body_text());
        assert_eq!(error_code(&rejection), status, "{label}: code field");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(upstream.request_count(), 1, "no tampered copy may reach the upstream");
}

#[tokio::test]
async fn tampered_fresh_exchange_never_reaches_upstream() {
    let upstream = Upstream::start();
    // Relay A gives up on each held exchange after UPSTREAM_TIMEOUT_SECS.
    let pair = RelayPair::start_with(&upstream.url(), &[("UPSTREAM_TIMEOUT_SECS", "2")], &[]);
    let holder = HoldingForwarder::start(&pair.b.url(), RELAY_EH_HEADER);
    let body = vec![b'f'; 300];

    let response = outbound(&client(), &pair.a.url(), &holder.url(), Method::POST, "/echo/fresh")
        .body(body.clone())
        .send()
        .await
        .expect("request to relay A failed");
    assert_eq!(response.status(), 504, "relay A must time out on the held exchange");
    let exchange = holder.wait_for_held(1, RECORD_WAIT).remove(0);

    for (label, bytes, status) in tampered_copies(&exchange) {
        let rejection = send_exchange_bytes(&pair.b.addr(), &bytes).await;

        assert_eq!(rejection.status, status, "{label}: {}", rejection.body_text());
        assert_eq!(error_code(&rejection), status, "{label}: code field");
        assert_eq!(upstream.request_count(), 0, "{label}: the upstream was reached");
    }

    // The untampered exchange is still fresh: the rejected copies did not use up its seq.
    let original = send_exchange_bytes(&pair.b.addr(), &exchange.bytes).await;
    assert_eq!(original.status, 200, "original: {}", original.body_text());
    let recorded = upstream.wait_for_requests(1, RECORD_WAIT);
    assert_eq!(recorded[0].target, b"/echo/fresh");
    assert_eq!(recorded[0].body, body);

    let replayed = send_exchange_bytes(&pair.b.addr(), &exchange.bytes).await;
    assert_eq!(replayed.status, 563);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn tampered_last_record_never_completes_at_upstream() {
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &[("UPSTREAM_TIMEOUT_SECS", "2")], &[]);
    let holder = HoldingForwarder::start(&pair.b.url(), RELAY_EH_HEADER);
    // Four records: relay B streams the first ones to the upstream before it reads the last.
    let body = common::pattern_bytes(200 * 1024);

    let response = outbound(&client(), &pair.a.url(), &holder.url(), Method::POST, "/echo/records")
        .body(body.clone())
        .send()
        .await
        .expect("request to relay A failed");
    assert_eq!(response.status(), 504);
    let exchange = holder.wait_for_held(1, RECORD_WAIT).remove(0);
    let records = sealed_records(&exchange.body());
    assert!(records.len() >= 3, "expected several records, got {}", records.len());
    let (last, is_final) = records.last().cloned().unwrap();
    assert!(is_final, "the last record must carry the final flag");

    let tampered = exchange.with_byte_flipped(exchange.body_byte_index(last.end - 1), 0x01);
    let response = send_exchange_bytes(&pair.b.addr(), &tampered).await;

    assert_ne!(response.status, 200, "a body whose last record was changed must fail");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(upstream.request_count(), 0, "the upstream must never see a complete request");
}

// Confidentiality of the hop between the relays.

/// Returns what every run of base64 characters in `bytes` decodes to, tried at each of the
/// four alignments, so a marker that crossed the hop only base64-encoded is found too.
fn decode_base64_runs(bytes: &[u8]) -> Vec<u8> {
    let is_base64 = |byte: &u8| byte.is_ascii_alphanumeric() || b"-_+/".contains(byte);
    let mut decoded = Vec::new();
    for run in bytes.split(|byte| !is_base64(byte)).filter(|run| run.len() >= 8) {
        for shift in 0..4 {
            let part = &run[shift.min(run.len())..];
            // Whole groups of four decode without padding or leftover bits.
            let text: Vec<u8> = part[..part.len() / 4 * 4]
                .iter()
                .map(|byte| match byte {
                    b'+' => b'-',
                    b'/' => b'_',
                    other => *other,
                })
                .collect();
            if let Ok(bytes) = URL_SAFE_NO_PAD.decode(&text) {
                decoded.extend_from_slice(&bytes);
                decoded.push(b'\n');
            }
        }
    }
    decoded
}

async fn markers_stay_sealed_between_relays(encode_type: &str) {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let recorder = TcpRecorder::start(&pair.b.url());
    let path = marker("path");
    let query = marker("query");
    let header_value = marker("value");
    let header_name = format!("x-{}", marker("name"));
    let authorization = marker("bearer");
    let echoed = marker("echoed");
    let body_marker = marker("body");
    let body = format!("{{\"card\":\"{body_marker}\"}}");

    let response =
        outbound(&client(), &pair.a.url(), &recorder.url(), Method::POST, &format!("/echo/{path}?q={query}"))
            .header("x-mte-encode-type", encode_type)
            .header("x-private", &header_value)
            .header(&header_name, "1")
            .header("authorization", format!("Bearer {authorization}"))
            .header("x-test-echo", &echoed)
            .body(body.clone())
            .send()
            .await
            .expect("request through the relays failed");

    assert_eq!(response.status(), 200);
    let echo_header = response.headers().get("x-test-echo").map(|value| value.as_bytes().to_vec());
    assert_eq!(echo_header.as_deref(), Some(echoed.as_bytes()), "response header from the upstream");
    let response_body = response.bytes().await.expect("reading the response failed");
    let reflected = [path.as_str(), &query, &header_value, &header_name, &authorization, &echoed];
    assert_contains_all(&response_body, &reflected);
    let echo: Value = serde_json::from_slice(&response_body).expect("echo body is JSON");
    assert_eq!(echo["body_sha256"], sha256_hex(body.as_bytes()));

    let recorded = upstream.wait_for_requests(1, RECORD_WAIT).remove(0);
    assert_eq!(recorded.target_str(), format!("/echo/{path}?q={query}"));
    assert_eq!(recorded.header_str("x-private").as_deref(), Some(header_value.as_str()));
    assert!(recorded.header(&header_name).is_some(), "header {header_name} missing at the upstream");
    assert_eq!(recorded.body, body.as_bytes());

    let captured = recorder.captured();
    assert!(find_bytes(&captured, RELAY_EH_HEADER.as_bytes()).is_some(), "no exchange passed the recorder");
    let all = [path.as_str(), &query, &header_value, &header_name, &authorization, &echoed, &body_marker];
    assert_contains_none(&captured, &all);
    assert_contains_none(&decode_base64_runs(&captured), &all);
}

#[tokio::test]
async fn markers_stay_sealed_between_relays_mke() {
    markers_stay_sealed_between_relays("MKE").await;
}

#[tokio::test]
async fn markers_stay_sealed_between_relays_mte() {
    markers_stay_sealed_between_relays("MTE").await;
}

// Recovery and concurrency.

/// Reads the `relay_active_sessions` gauge from a relay's `/metrics`.
async fn active_sessions(client: &reqwest::Client, relay_url: &str) -> f64 {
    let text = client
        .get(format!("{relay_url}/metrics"))
        .send()
        .await
        .expect("metrics request failed")
        .text()
        .await
        .expect("metrics body is text");
    text.lines()
        .find_map(|line| line.strip_prefix("relay_active_sessions "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no relay_active_sessions in /metrics:\n{text}"))
}

#[tokio::test]
async fn restarted_peer_is_paired_again_transparently() {
    let upstream = Upstream::start();
    // Two workers, so relay A's pool contains two pairs.
    let mut pair = RelayPair::start_with(&upstream.url(), &[("WORKERS", "2")], &[]);
    let client = client();
    let first = outbound(&client, &pair.a.url(), &pair.b.url(), Method::POST, "/echo/before")
        .body("before")
        .send()
        .await
        .expect("request before the restart failed");
    assert_eq!(first.status(), 200);

    pair.restart_b();
    let second = outbound(&client, &pair.a.url(), &pair.b.url(), Method::POST, "/echo/after")
        .body("after")
        .send()
        .await
        .expect("request after the restart failed");

    let status = second.status();
    let body = second.bytes().await.unwrap();
    assert_eq!(status, 200, "body after the restart: {}", body.escape_ascii());
    let echo: Value = serde_json::from_slice(&body).expect("echo body is JSON");
    assert_eq!(echo["target"], "/echo/after");
    assert_eq!(echo["body_sha256"], sha256_hex(b"after"));
    let targets: Vec<String> =
        upstream.wait_for_requests(2, RECORD_WAIT).iter().map(|request| request.target_str()).collect();
    assert_eq!(targets, ["/echo/before", "/echo/after"]);
    let retried = pair.a.wait_for_log(Duration::from_secs(5), |line| {
        line.contains("pairing again") && line.contains("\"status\":560")
    });
    assert!(retried.is_some(), "relay A logged no retry after 560\n{}", pair.a.output_report());

    // The sessions of the dropped pool leave memory, so only the new pool's two remain.
    let mut sessions = active_sessions(&client, &pair.a.url()).await;
    for _ in 0..50 {
        if sessions == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        sessions = active_sessions(&client, &pair.a.url()).await;
    }
    assert_eq!(sessions, 2.0, "relay A's sessions after pairing again\n{}", pair.a.output_report());
}

#[tokio::test]
async fn concurrent_exchanges_get_their_own_responses() {
    const COUNT: usize = 200;
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let client = client();
    let (a, b) = (pair.a.url(), pair.b.url());

    let requests = (0..COUNT).map(|index| {
        let body = format!("body-{index}-{}", marker(""));
        let request = outbound(&client, &a, &b, Method::POST, &format!("/echo/{index}"))
            .header("x-test-echo", index.to_string())
            .body(body.clone());
        async move {
            let response = request.send().await.unwrap_or_else(|error| panic!("request {index}: {error}"));
            let status = response.status();
            let echoed = response.headers().get("x-test-echo").cloned();
            let response_body =
                response.bytes().await.unwrap_or_else(|error| panic!("body {index}: {error}"));
            (index, body, status, echoed, response_body)
        }
    });
    let results = futures_util::future::join_all(requests).await;

    for (index, body, status, echoed, response_body) in results {
        assert_eq!(status, 200, "request {index}: {}", response_body.escape_ascii());
        let echo: Value = serde_json::from_slice(&response_body).expect("echo body is JSON");
        assert_eq!(echo["target"], format!("/echo/{index}"), "request {index} got another response");
        assert_eq!(echo["body_sha256"], sha256_hex(body.as_bytes()), "request {index} body");
        let echoed = echoed.map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(echoed, Some(index.to_string()), "request {index} header");
    }
    assert_eq!(upstream.wait_for_requests(COUNT, RECORD_WAIT).len(), COUNT);
}
