//! Tests of the shared test harness itself: the upstream server, the TCP recorder, raw
//! response parsing and the helpers. None of them start the relay binary.

mod common;

use std::time::{Duration, Instant};

use common::relay::listening_url;
use common::upstream::{BINARY_HEADER_VALUE, CLOSE_BODY, GZIP_BODY};
use common::{
    RelayBuilder, TcpRecorder, Upstream, assert_contains_all, assert_contains_none, find_bytes, free_port,
    parse_head_response, parse_response, parse_responses, pattern_bytes, pattern_sha256_hex, send_raw,
    sha256_hex,
};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("building the reqwest client failed")
}

fn json_body(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|error| panic!("invalid JSON {:?}: {error}", bytes.escape_ascii().to_string()))
}

#[tokio::test]
async fn upstream_echo_returns_request_as_json() {
    let upstream = Upstream::start();

    let response = client()
        .post(format!("{}/echo/path?q=1", upstream.url()))
        .header("x-custom", "one")
        .header("x-test-echo", "echoed")
        .body("hello")
        .send()
        .await
        .expect("request to the upstream failed");

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-test-echo"], "echoed");
    let echo = json_body(&response.bytes().await.expect("reading the body failed"));
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["target"], "/echo/path?q=1");
    assert_eq!(echo["body_len"], 5);
    assert_eq!(echo["body_sha256"], sha256_hex(b"hello"));
    let headers = echo["headers"].as_array().expect("headers is an array");
    assert!(headers.contains(&serde_json::json!(["x-custom", "one"])), "headers: {headers:?}");

    let recorded = upstream.wait_for_requests(1, Duration::from_secs(5));
    assert_eq!(recorded[0].body, b"hello");
    assert_eq!(recorded[0].header("x-custom"), Some(b"one".as_slice()));
}

#[test]
fn upstream_keeps_set_cookie_order() {
    let upstream = Upstream::start();

    let raw = send_raw(&upstream.url(), b"GET /cookies HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");

    let positions: Vec<usize> = ["set-cookie: a=1\r\n", "set-cookie: b=2\r\n", "set-cookie: c=3\r\n"]
        .iter()
        .map(|line| find_bytes(&raw, line.as_bytes()).unwrap_or_else(|| panic!("{line:?} missing")))
        .collect();
    assert!(positions.is_sorted(), "Set-Cookie lines out of order at {positions:?}");
    let response = parse_response(&raw);
    assert_eq!(response.header_values("set-cookie"), [b"a=1", b"b=2", b"c=3"]);
    assert_eq!(response.header("x-binary"), Some(BINARY_HEADER_VALUE));
    assert_eq!(response.body, b"ok");
}

#[test]
fn upstream_close_body_ends_at_close() {
    let upstream = Upstream::start();

    let started = Instant::now();
    let raw = send_raw(&upstream.url(), b"GET /close HTTP/1.1\r\nHost: test\r\n\r\n");

    assert!(started.elapsed() < Duration::from_secs(5), "the upstream did not close the connection");
    let response = parse_response(&raw);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some(b"close".as_slice()));
    assert_eq!(response.header("content-length"), None);
    assert_eq!(response.header("transfer-encoding"), None);
    assert_eq!(response.body, CLOSE_BODY);
}

#[test]
fn recorder_captures_request_to_upstream() {
    let upstream = Upstream::start();
    let recorder = TcpRecorder::start(&upstream.url());
    let request = b"POST /echo/recorded HTTP/1.1\r\nHost: test\r\nContent-Length: 11\r\n\
                    Connection: close\r\n\r\nplain-words";

    let raw = send_raw(&recorder.url(), request);

    assert_eq!(parse_response(&raw).status, 200);
    assert_eq!(recorder.connection_count(), 1);
    assert_eq!(recorder.client_to_server(), [request.to_vec()]);
    assert_eq!(recorder.server_to_client(), vec![raw]);
    let captured = recorder.captured();
    assert_contains_all(&captured, &["POST /echo/recorded", "plain-words", "HTTP/1.1 200 OK"]);
    assert_contains_none(&captured, &["never-sent-marker"]);
    let recorded = upstream.wait_for_requests(1, Duration::from_secs(5));
    assert_eq!(recorded[0].target, b"/echo/recorded");
    assert_eq!(recorded[0].body, b"plain-words");
}

#[test]
fn recorded_request_replays_byte_for_byte() {
    let upstream = Upstream::start();
    let recorder = TcpRecorder::start(&upstream.url());
    let request = b"GET /echo/replay HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    send_raw(&recorder.url(), request);

    let captured_request = recorder.client_to_server().remove(0);
    let replayed = send_raw(&upstream.url(), &captured_request);

    assert_eq!(parse_response(&replayed).status, 200);
    let recorded = upstream.wait_for_requests(2, Duration::from_secs(5));
    assert_eq!(recorded[0].target, recorded[1].target);
    assert_eq!(recorded[0].headers, recorded[1].headers);
}

#[test]
fn upstream_decodes_chunked_body_after_continue() {
    let upstream = Upstream::start();
    let request = b"POST /echo HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                    5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";

    let raw = send_raw(&upstream.url(), request);

    assert!(raw.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"), "{}", raw.escape_ascii());
    let statuses: Vec<u16> = parse_responses(&raw).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [100, 200]);
    let recorded = upstream.wait_for_requests(1, Duration::from_secs(5));
    assert_eq!(recorded[0].body, b"hello world");
    assert_eq!(recorded[0].body_sha256, sha256_hex(b"hello world"));
}

#[test]
fn upstream_records_exact_request_bytes() {
    let upstream = Upstream::start();
    let request = b"GET /echo/a%2Fb?x=%20&y HTTP/1.1\r\nHost: test\r\nX-Raw: \x80\xff tail\r\n\
                    X-Dup: 1\r\nx-dup: 2\r\nConnection: close\r\n\r\n";

    send_raw(&upstream.url(), request);

    let recorded = upstream.wait_for_requests(1, Duration::from_secs(5));
    assert_eq!(recorded[0].target, b"/echo/a%2Fb?x=%20&y");
    assert_eq!(recorded[0].header("x-raw"), Some(b"\x80\xff tail".as_slice()));
    assert_eq!(recorded[0].header_values("x-dup"), [b"1", b"2"]);
    let names: Vec<&str> = recorded[0].headers.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["Host", "X-Raw", "X-Dup", "x-dup", "Connection"]);
}

#[test]
fn upstream_serves_pipelined_keep_alive_requests() {
    let upstream = Upstream::start();
    let requests = b"GET /echo/first HTTP/1.1\r\nHost: test\r\n\r\n\
                     GET /echo/second HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

    let raw = send_raw(&upstream.url(), requests);

    let responses = parse_responses(&raw);
    assert_eq!(responses.len(), 2, "{}", raw.escape_ascii());
    assert_eq!(json_body(&responses[0].body)["target"], "/echo/first");
    assert_eq!(json_body(&responses[1].body)["target"], "/echo/second");
    assert_eq!(upstream.request_count(), 2);
}

#[test]
fn upstream_status_routes_follow_table() {
    let upstream = Upstream::start();
    let get = |path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        parse_response(&send_raw(&upstream.url(), request.as_bytes()))
    };

    let no_content = get("/status/204");
    assert_eq!(no_content.status, 204);
    assert_eq!(no_content.header("content-length"), None);
    let not_modified = get("/status/304");
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), Some(b"\"v1\"".as_slice()));
    let found = get("/status/302");
    assert_eq!(found.header("location"), Some(b"/elsewhere".as_slice()));
    let missing = get("/status/404");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body_text(), "status 404");
    assert_eq!(get("/status/abc").status, 400);
}

#[test]
fn upstream_head_has_length_without_body() {
    let upstream = Upstream::start();

    let raw = send_raw(&upstream.url(), b"HEAD /head HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let get = send_raw(&upstream.url(), b"GET /head HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");

    let head = parse_head_response(&raw);
    assert_eq!(head.header("content-length"), Some(b"1234".as_slice()));
    assert_eq!(head.header("etag"), Some(b"\"h1\"".as_slice()));
    assert_eq!(parse_response(&get).body, pattern_bytes(1234));
}

#[tokio::test]
async fn upstream_gzip_body_stays_encoded() {
    let upstream = Upstream::start();

    let response = client().get(format!("{}/gzip", upstream.url())).send().await.unwrap();

    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(response.headers()["content-length"], GZIP_BODY.len().to_string().as_str());
    assert_eq!(response.bytes().await.unwrap().as_ref(), GZIP_BODY);
}

#[tokio::test]
async fn upstream_big_streams_pattern() {
    let upstream = Upstream::start();
    let len = 300_001;

    let response = client().get(format!("{}/big?bytes={len}", upstream.url())).send().await.unwrap();

    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let body = response.bytes().await.unwrap();
    common::assert_bytes_eq(&pattern_bytes(len), &body, "/big body");
    assert_eq!(sha256_hex(&body), pattern_sha256_hex(len as u64));
}

#[tokio::test]
async fn upstream_sink_records_only_hash() {
    let upstream = Upstream::start();
    let body = pattern_bytes(1 << 20);

    let response = client().post(format!("{}/sink", upstream.url())).body(body.clone()).send().await.unwrap();

    let summary = json_body(&response.bytes().await.unwrap());
    assert_eq!(summary["body_len"], 1 << 20);
    assert_eq!(summary["body_sha256"], sha256_hex(&body));
    let recorded = upstream.wait_for_requests(1, Duration::from_secs(5));
    assert!(recorded[0].body.is_empty());
    assert_eq!(recorded[0].body_len, 1 << 20);
}

#[tokio::test]
async fn upstream_slow_waits_before_answering() {
    let upstream = Upstream::start();

    let started = Instant::now();
    let response = client().get(format!("{}/slow?ms=300", upstream.url())).send().await.unwrap();

    assert_eq!(response.bytes().await.unwrap().as_ref(), b"slow");
    assert!(started.elapsed() >= Duration::from_millis(300), "took {:?}", started.elapsed());
}

#[test]
fn upstream_rejects_malformed_request() {
    let upstream = Upstream::start();

    let raw = send_raw(&upstream.url(), b"GET /echo HTTP/1.1\r\nBad Header: x\r\n\r\n");

    assert_eq!(parse_response(&raw).status, 400);
    assert_eq!(upstream.request_count(), 0);
}

#[test]
#[should_panic(expected = "\"secret\" at offset 6")]
fn assert_contains_none_names_leaked_marker() {
    assert_contains_none(b"plain secret text", &["absent", "secret"]);
}

#[test]
fn pattern_bytes_follow_formula() {
    let bytes = pattern_bytes(600);

    assert_eq!(&bytes[..3], [7, 38, 69]);
    assert_eq!(bytes[251], 7, "the pattern repeats every 251 bytes");
    assert_eq!(sha256_hex(&bytes), pattern_sha256_hex(600));
}

#[test]
fn free_port_can_be_bound() {
    let port = free_port();

    std::net::TcpListener::bind(("127.0.0.1", port)).expect("binding the free port failed");
}

#[test]
fn relay_builder_overrides_defaults() {
    let builder = RelayBuilder::new()
        .env("UPSTREAM", "http://127.0.0.1:9")
        .port(4321)
        .env("BIND_ADDRESS", "127.0.0.2")
        .env_remove("PATH");

    let environment = builder.environment();

    let value = |key: &str| environment.iter().find(|(name, _)| name == key).map(|(_, v)| v.as_str());
    assert_eq!(value("PORT"), Some("4321"));
    assert_eq!(value("BIND_ADDRESS"), Some("127.0.0.2"));
    assert_eq!(value("UPSTREAM"), Some("http://127.0.0.1:9"));
    assert_eq!(value("PATH"), None);
    assert_eq!(environment.len(), 3);
}

#[test]
fn listening_url_reads_json_log_line() {
    let line = r#"{"timestamp":"2025-01-01T00:00:00Z","level":"INFO","fields":{"message":"listening at http://127.0.0.1:41234/","address":"http://127.0.0.1:41234"},"target":"api_relay::server"}"#;

    assert_eq!(listening_url(line).as_deref(), Some("http://127.0.0.1:41234"));
    assert_eq!(listening_url("listening at http://127.0.0.1:1"), None);
    assert_eq!(listening_url(r#"{"fields":{"message":"started"}}"#), None);
}

/// Returns a builder that runs `script` with `sh -c` in place of the relay binary.
fn fake_relay(script: &str) -> RelayBuilder {
    RelayBuilder::new().program("sh", &["-c", script])
}

#[test]
fn relay_process_reads_url_and_logs() {
    let script = r#"echo '{"fields":{"message":"listening at http://127.0.0.1:5555/"}}'
echo "port=$PORT bind=$BIND_ADDRESS upstream=$UPSTREAM home=${HOME:-unset}"
echo to-stderr >&2
exec sleep 30"#;

    let mut relay = fake_relay(script).env("UPSTREAM", "http://127.0.0.1:9").spawn();

    assert_eq!(relay.url(), "http://127.0.0.1:5555");
    assert_eq!(relay.port(), 5555);
    assert!(relay.is_running());
    let environment_line = relay
        .wait_for_log(Duration::from_secs(5), |line| line.starts_with("port="))
        .expect("the script's environment line is missing");
    assert_eq!(environment_line, "port=0 bind=127.0.0.1 upstream=http://127.0.0.1:9 home=unset");
    assert_eq!(relay.log_json().len(), 1);
    assert!(common::wait_until(Duration::from_secs(5), || relay.stderr_lines() == ["to-stderr"]));
    relay.terminate();
    let status = relay.wait_exit(Duration::from_secs(5)).expect("SIGTERM did not stop the process");
    assert!(!status.success());
}

#[test]
fn relay_process_kill_stops_it() {
    let mut relay =
        fake_relay(r#"echo '{"fields":{"message":"listening at http://127.0.0.1:5556"}}'; exec sleep 30"#)
            .spawn();

    relay.kill();

    assert!(!relay.is_running());
    assert!(relay.wait_exit(Duration::ZERO).is_some());
}

#[test]
fn relay_spawn_reports_early_exit() {
    let failure = fake_relay("echo 'missing UPSTREAM' >&2; exit 2")
        .try_spawn()
        .err()
        .expect("a process that exits must not count as started");

    assert!(failure.contains("exited with exit status: 2"), "{failure}");
    assert!(failure.contains("missing UPSTREAM"), "{failure}");
}

#[test]
fn relay_spawn_expect_exit_returns_output() {
    let output = fake_relay("echo out-line; echo 'invalid PORT' >&2; exit 3").spawn_expect_exit();

    assert_eq!(output.status.code(), Some(3));
    assert_eq!(output.stdout, "out-line");
    assert_eq!(output.stderr, "invalid PORT");
}
