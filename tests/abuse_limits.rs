//! Abuse limits against real relays. A pairing flood is cut off per client while exchanges on
//! existing pairs go on, and a client that never finishes its request head is disconnected.
//! Header blocks and pairing requests over their limits are rejected, and connections over
//! `MAX_CONNECTIONS` wait for a free slot.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api_relay_protocol::ClientId;
use api_relay_protocol::pairing::PairingInitiator;
use common::{OUTBOUND_TOKEN_VALUE, RelayPair, Upstream, relay_builder};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

async fn exchange(client: &reqwest::Client, pair: &RelayPair, id: usize) -> u16 {
    let response = client
        .post(format!("{}/echo/flood-{id}", pair.a.url()))
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", pair.b.url())
        .body(format!("body-{id}"))
        .send()
        .await
        .expect("exchange through relay A");
    response.status().as_u16()
}

async fn client_id(client: &reqwest::Client, relay_b: &str) -> ClientId {
    let response = client.head(format!("{relay_b}/api/mte-relay")).send().await.expect("HEAD /api/mte-relay");
    let text = response.headers()["x-mte-relay"].to_str().expect("ascii client id").to_owned();
    ClientId::parse(&text).expect("valid client id")
}

/// Sends `POST /api/mte-pair` for `pairs` pairs to `relay_b` as `id` and returns the status.
async fn pair_directly(client: &reqwest::Client, relay_b: &str, id: &ClientId, pairs: usize) -> u16 {
    let request = PairingInitiator::new(pairs).request(Some(id));
    let response = client
        .post(format!("{relay_b}/api/mte-pair"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&request).expect("pairing request JSON"))
        .send()
        .await
        .expect("pairing request");
    response.status().as_u16()
}

#[test]
fn pairing_flood_is_cut_off_while_exchanges_continue() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[("PAIRING_REQUESTS_PER_MINUTE", "5")]);
    runtime().block_on(async {
        let client = reqwest::Client::new();
        assert_eq!(exchange(&client, &pair, 0).await, 200, "first exchange pairs relay A with relay B");

        let id = client_id(&client, &pair.b.url()).await;
        let mut statuses = Vec::new();
        for index in 0..20 {
            statuses.push(pair_directly(&client, &pair.b.url(), &id, 1).await);
            assert_eq!(
                exchange(&client, &pair, index + 1).await,
                200,
                "exchange {} during the flood",
                index + 1
            );
        }

        let accepted = statuses.iter().filter(|status| **status == 200).count();
        let limited = statuses.iter().filter(|status| **status == 564).count();
        assert_eq!(accepted, 5, "pairing statuses: {statuses:?}");
        assert_eq!(limited, 15, "pairing statuses: {statuses:?}");
    });
    let rejections = count_log_lines(&pair.b, "too many pairing requests", 15);
    assert_eq!(rejections, 15, "relay B should log each rejected pairing request");
}

#[test]
fn slow_request_head_is_disconnected() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[("CLIENT_REQUEST_TIMEOUT_SECS", "1")]);
    let mut stream = TcpStream::connect(pair.b.addr()).expect("connect to relay B");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay-b\r\n").expect("send a partial head");

    let started = Instant::now();
    let mut answer = Vec::new();
    let result = stream.read_to_end(&mut answer);
    let waited = started.elapsed();

    assert!(result.is_ok() || !answer.is_empty(), "connection neither answered nor closed: {result:?}");
    assert!(waited < Duration::from_secs(5), "slow client kept for {waited:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || text.starts_with("HTTP/1.1 408"), "unexpected answer: {text}");
}

/// Sends `GET <path>` through relay A with `extra` headers and returns the status and body.
async fn get_with_headers(pair: &RelayPair, path: &str, extra: &[(String, String)]) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", pair.a.url()))
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", pair.b.url());
    for (name, value) in extra {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("request through relay A");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

fn numbered_headers(count: usize) -> Vec<(String, String)> {
    (0..count).map(|index| (format!("x-extra-{index}"), format!("value-{index}"))).collect()
}

/// Waits up to five seconds for `expected` log lines containing `text`, since the relay writes
/// its log in the background, and returns how many there are then.
fn count_log_lines(relay: &common::RelayProcess, text: &str, expected: usize) -> usize {
    let count = || relay.log_lines().iter().filter(|line| line.contains(text)).count();
    common::wait_until(Duration::from_secs(5), || count() >= expected);
    count()
}

/// Asserts that `relay` logged exactly `expected` lines containing `text`.
fn assert_logged(relay: &common::RelayProcess, text: &str, expected: usize) {
    let count = count_log_lines(relay, text, expected);
    assert_eq!(count, expected, "log lines with {text:?}\n{}", relay.output_report());
}

#[test]
fn oversized_request_headers_get_431() {
    let upstream = Upstream::start();
    let limits = [("MAX_HEADER_COUNT", "12"), ("MAX_HEADER_BYTES", "1024")];
    let pair = RelayPair::start(&upstream.url(), &limits);
    runtime().block_on(async {
        let (status, body) = get_with_headers(&pair, "/echo/many", &numbered_headers(20)).await;
        assert_eq!(status, 431, "20 headers against MAX_HEADER_COUNT=12: {body}");
        assert!(body.contains("MAX_HEADER_COUNT allows 12"), "error body: {body}");

        let long = vec![("x-long".to_owned(), "v".repeat(1500))];
        let (status, body) = get_with_headers(&pair, "/echo/long", &long).await;
        assert_eq!(status, 431, "a 1500-byte value against MAX_HEADER_BYTES=1024: {body}");
        assert!(body.contains("MAX_HEADER_BYTES allows 1024"), "error body: {body}");

        let (status, body) = get_with_headers(&pair, "/echo/few", &numbered_headers(3)).await;
        assert_eq!(status, 200, "a request within the limits: {body}");
    });
    let paths: Vec<String> = upstream.requests().iter().map(|request| request.target_str()).collect();
    assert_eq!(paths, ["/echo/few"], "only the request within the limits reaches the upstream");
    assert_logged(&pair.a, "request headers over the limit", 2);
    assert_eq!(
        count_log_lines(&pair.a, "paired with peer relay", 1),
        1,
        "relay A pairs only for the last request"
    );
}

#[test]
fn relay_b_rejects_oversized_block() {
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &[], &[("MAX_HEADER_COUNT", "12")]);
    runtime().block_on(async {
        let (status, body) = get_with_headers(&pair, "/echo/many", &numbered_headers(20)).await;
        assert_eq!(status, 502, "relay A seals 20 headers, relay B allows 12: {body}");
        let (status, body) = get_with_headers(&pair, "/echo/few", &numbered_headers(3)).await;
        assert_eq!(status, 200, "the next request within the limit: {body}");
    });
    let paths: Vec<String> = upstream.requests().iter().map(|request| request.target_str()).collect();
    assert_eq!(paths, ["/echo/few"], "the oversized block never reaches the upstream");
    assert_logged(&pair.b, "more header lines than the configured maximum", 1);
}

#[test]
fn upstream_response_headers_over_the_limit_get_502() {
    let upstream = Upstream::start();
    // /cookies responds with three Set-Cookie lines, x-binary and Content-Type: more than four.
    let pair = RelayPair::start_with(&upstream.url(), &[], &[("MAX_HEADER_COUNT", "4")]);
    runtime().block_on(async {
        let (status, body) = get_with_headers(&pair, "/cookies", &[]).await;
        assert_eq!(status, 502, "response headers over relay B's limit: {body}");
        assert!(body.contains("response headers too large"), "error body: {body}");
        let (status, body) = get_with_headers(&pair, "/status/204", &[]).await;
        assert_eq!(status, 204, "a response within the limit: {body}");
    });
    assert_logged(&pair.b, "upstream response headers over the limit", 1);
}

#[test]
fn pairing_request_for_too_many_pairs_gets_564() {
    let upstream = Upstream::start();
    let pair =
        RelayPair::start_with(&upstream.url(), &[("PAIR_POOL_SIZE", "3")], &[("MAX_PAIRS_PER_REQUEST", "2")]);
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let id = client_id(&client, &pair.b.url()).await;
        let mut statuses = Vec::new();
        for pairs in [3, 2] {
            statuses.push(pair_directly(&client, &pair.b.url(), &id, pairs).await);
        }
        assert_eq!(statuses, [564, 200], "pairing for 3 and then 2 pairs against MAX_PAIRS_PER_REQUEST=2");

        let (status, body) = get_with_headers(&pair, "/echo/pool", &[]).await;
        assert_eq!(status, 502, "relay A asks for a pool of 3 pairs: {body}");
        assert!(body.contains("rejected the pairing request with status 564"), "{body}");
    });
    // The direct request and relay A's own pairing request each log the offer count and limit.
    let rejected = "pairing request offers 3 pairs, but this relay accepts 1 to 2";
    assert!(count_log_lines(&pair.b, rejected, 2) >= 2, "{}", pair.b.output_report());
    assert_eq!(upstream.request_count(), 0, "no exchange reaches the upstream");
    assert!(
        count_log_lines(&pair.a, "peer relay rejected the pairing request", 1) >= 1,
        "{}",
        pair.a.output_report()
    );
}

/// Sends `GET /healthz` on `stream` and reads until the end of the response head, within `wait`.
/// Returns the status line, or `None` when nothing arrived in time.
fn healthz_on(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").expect("send GET /healthz");
    read_status_line(stream, wait)
}

fn read_status_line(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    stream.set_read_timeout(Some(wait)).expect("read timeout");
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    while !received.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return None,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    }
    let text = String::from_utf8_lossy(&received).into_owned();
    text.lines().next().map(str::to_owned)
}

#[test]
fn excess_connection_waits_for_slot() {
    let upstream = Upstream::start();
    let relay = relay_builder(&upstream.url())
        .env("WORKERS", "1")
        .env("MAX_CONNECTIONS", "2")
        .env("KEEP_ALIVE_SECS", "60")
        .spawn();
    let ok = Some("HTTP/1.1 200 OK".to_owned());
    let mut first = TcpStream::connect(relay.addr()).expect("first connection");
    assert_eq!(healthz_on(&mut first, Duration::from_secs(5)), ok, "first connection is served");
    let mut second = TcpStream::connect(relay.addr()).expect("second connection");
    assert_eq!(healthz_on(&mut second, Duration::from_secs(5)), ok, "second connection is served");

    let mut third = TcpStream::connect(relay.addr()).expect("the kernel queues a third connection");
    assert_eq!(
        healthz_on(&mut third, Duration::from_millis(1500)),
        None,
        "a third connection is served while MAX_CONNECTIONS=2 are open"
    );
    drop(first);
    assert_eq!(
        read_status_line(&mut third, Duration::from_secs(5)),
        ok,
        "the third connection is served once the first closes"
    );
    assert_eq!(healthz_on(&mut second, Duration::from_secs(5)), ok, "the second connection still works");
}
