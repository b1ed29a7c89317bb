//! Black-box tests of relays that share their state in Redis: two relay B processes behind a
//! round-robin TCP balancer, replays across processes, restarts of either relay, and a Redis
//! outage under load.
//!
//! Every test starts its own `redis-server` on a free port of 127.0.0.1 (never a shared one),
//! its own upstream and its own relay processes.

mod common;
#[path = "../actors/tests/support/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::background::BackgroundServer;
use common::{
    OUTBOUND_TOKEN_VALUE, RawRequest, RelayPair, RelayProcess, TcpRecorder, Upstream, parse_responses,
    relay_builder, send_raw,
};
use futures_util::future::join_all;
use redis_server::{RedisServer, TlsFiles};
use serde_json::Value;

/// Client timeout of every request in these tests: a request that takes longer counts as hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// `REDIS_TIMEOUT_MS` of the relays in these tests.
const REDIS_TIMEOUT_MS: &str = "400";
/// Time the upstream gets to record requests that already got their responses.
const RECORD_WAIT: Duration = Duration::from_secs(10);
/// Message of relay B's log record for each pairing request it accepts.
const B_PAIRED: &str = "paired with relay A";
/// Message of relay A's log record for each pairing it starts.
const A_PAIRED: &str = "paired with peer relay";
/// Message of relay A's log record when it takes its pairs from the store.
const A_REUSED: &str = "reusing stored pairs for peer relay";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(64)
        .build()
        .expect("building the reqwest client failed")
}

/// Environment of a relay that keeps its state in `redis`.
fn redis_env(redis: &RedisServer) -> Vec<(String, String)> {
    vec![
        ("REDIS_URL".to_owned(), redis.url()),
        ("REDIS_TIMEOUT_MS".to_owned(), REDIS_TIMEOUT_MS.to_owned()),
        ("REDIS_KEY_PREFIX".to_owned(), "relay-test".to_owned()),
    ]
}

fn with_redis(builder: common::RelayBuilder, redis: &RedisServer) -> common::RelayBuilder {
    redis_env(redis).into_iter().fold(builder, |builder, (key, value)| builder.env(key, value))
}

/// Sends `POST /echo/<id>` with body `<id>` through relay A to `peer` and returns the status
/// and body, or the client error.
async fn send(
    client: &reqwest::Client,
    relay_a: &str,
    peer: &str,
    id: &str,
) -> Result<(u16, Vec<u8>), String> {
    let response = client
        .post(format!("{relay_a}/echo/{id}"))
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", peer)
        .body(id.to_owned())
        .send()
        .await
        .map_err(|error| format!("request {id} failed: {error}"))?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|error| format!("body of {id} failed: {error}"))?;
    Ok((status, body.to_vec()))
}

/// Checks that a response is the upstream's echo of `POST /echo/<id>` with body `<id>`.
fn assert_echo(id: &str, status: u16, body: &[u8]) {
    assert_eq!(status, 200, "request {id}: body {}", body.escape_ascii());
    let echo: Value =
        serde_json::from_slice(body).unwrap_or_else(|error| panic!("{id}: echo is not JSON: {error}"));
    assert_eq!(echo["target"], format!("/echo/{id}"), "request {id} got another request's answer");
    assert_eq!(echo["body_len"], id.len(), "request {id}: body length seen by the upstream");
}

/// Returns how many stdout lines of `relay` carry the log message `message`.
fn log_count(relay: &RelayProcess, message: &str) -> usize {
    relay.log_json().iter().filter(|line| line["fields"]["message"] == message).count()
}

/// Returns how often the upstream received each request target.
fn targets_seen(upstream: &Upstream) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for request in upstream.requests() {
        *seen.entry(request.target_str()).or_default() += 1;
    }
    seen
}

/// A round-robin TCP balancer on 127.0.0.1: each new connection goes to the next target.
struct Balancer {
    server: BackgroundServer,
    connections: Arc<Vec<AtomicUsize>>,
}

impl Balancer {
    fn start(targets: Vec<SocketAddr>) -> Balancer {
        for target in &targets {
            assert!(target.ip().is_loopback(), "balancer target {target} is not on 127.0.0.1");
        }
        let connections: Arc<Vec<AtomicUsize>> =
            Arc::new(targets.iter().map(|_| AtomicUsize::new(0)).collect());
        let counts = Arc::clone(&connections);
        let server = BackgroundServer::start("balancer", move |listener| balance(listener, targets, counts));
        Balancer { server, connections }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Connections sent to each target so far.
    fn connection_counts(&self) -> Vec<usize> {
        self.connections.iter().map(|count| count.load(Ordering::SeqCst)).collect()
    }
}

async fn balance(listener: tokio::net::TcpListener, targets: Vec<SocketAddr>, counts: Arc<Vec<AtomicUsize>>) {
    let mut next = 0;
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let index = next % targets.len();
        next += 1;
        counts[index].fetch_add(1, Ordering::SeqCst);
        let target = targets[index];
        tokio::spawn(async move {
            let connect = tokio::net::TcpStream::connect(target);
            let Ok(Ok(mut server)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

fn socket_addr(relay: &RelayProcess) -> SocketAddr {
    relay.addr().parse().expect("relay address is host:port")
}

#[tokio::test]
async fn balanced_inbound_relays_deliver_each_exchange_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let b1 = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let b2 = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let balancer = Balancer::start(vec![socket_addr(&b1), socket_addr(&b2)]);
    let a = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let client = client();

    let ids: Vec<String> = (0..500).map(|index| format!("parallel-{index}")).collect();
    let (relay_a, peer) = (a.url(), balancer.url());
    let sends = ids.iter().map(|id| send(&client, &relay_a, &peer, id));
    let results = join_all(sends).await;

    for (id, result) in ids.iter().zip(results) {
        let (status, body) = result.unwrap_or_else(|error| panic!("{error}"));
        assert_echo(id, status, &body);
    }
    upstream.wait_for_requests(ids.len(), RECORD_WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let seen = targets_seen(&upstream);
    for id in &ids {
        assert_eq!(seen.get(&format!("/echo/{id}")), Some(&1), "upstream received {id} not exactly once");
    }
    assert_eq!(upstream.request_count(), ids.len(), "the upstream received extra requests");
    let counts = balancer.connection_counts();
    assert!(counts.iter().all(|count| *count > 0), "a relay B got no connection: {counts:?}");
    assert_eq!(log_count(&a, A_PAIRED), 1, "relay A paired more than once:\n{}", a.output_report());
}

/// Returns the sealed exchanges relay A sent through `recorder`.
fn recorded_exchanges(recorder: &TcpRecorder) -> Vec<RawRequest> {
    let requests: Vec<RawRequest> =
        recorder.client_to_server().iter().flat_map(|bytes| RawRequest::split_all(bytes)).collect();
    requests.into_iter().filter(|request| request.header("x-mte-relay-eh").is_some()).collect()
}

/// Sends `request` to `addr` and returns the status of the first response. A second request
/// with `Connection: close` follows, so the server closes the connection after responding.
async fn replay(addr: &str, request: &[u8]) -> u16 {
    let mut bytes = request.to_vec();
    bytes.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: relay-b\r\nConnection: close\r\n\r\n");
    let addr = addr.to_owned();
    let raw = tokio::task::spawn_blocking(move || send_raw(&addr, &bytes)).await.expect("send_raw panicked");
    assert!(!raw.is_empty(), "relay B closed the connection without a response");
    parse_responses(&raw).remove(0).status
}

#[tokio::test]
async fn replay_to_other_inbound_relay_rejected() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let b1 = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let b2 = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let recorders = [TcpRecorder::start(&b1.url()), TcpRecorder::start(&b2.url())];
    let balancer = Balancer::start(recorders.iter().map(TcpRecorder::addr).collect());
    let a = relay_builder(&upstream.url()).spawn();

    let (status, body) = send(&client(), &a.url(), &balancer.url(), "replay-across").await.unwrap();
    assert_echo("replay-across", status, &body);
    upstream.wait_for_requests(1, RECORD_WAIT);

    let exchanges: Vec<Vec<RawRequest>> = recorders.iter().map(recorded_exchanges).collect();
    let carrier =
        exchanges.iter().position(|found| found.len() == 1).expect("no relay B received the exchange");
    assert_eq!(exchanges.iter().map(Vec::len).sum::<usize>(), 1, "expected exactly one exchange");
    let exchange = &exchanges[carrier][0];
    let other = if carrier == 0 { &b2 } else { &b1 };
    let same = if carrier == 0 { &b1 } else { &b2 };

    assert_eq!(replay(&other.addr(), &exchange.bytes).await, 563, "replay to the other relay B");
    assert_eq!(replay(&same.addr(), &exchange.bytes).await, 563, "replay to the same relay B");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(upstream.request_count(), 1, "the upstream must see the exchange exactly once");
}

#[tokio::test]
async fn killed_inbound_relay_restarts_without_pairing_again() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let env_b: Vec<(String, String)> = redis_env(&redis);
    let env_b: Vec<(&str, &str)> = env_b.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
    let mut pair = RelayPair::start_with(&upstream.url(), &[], &env_b);
    let client = client();

    for index in 0..8 {
        let id = format!("before-{index}");
        let (status, body) = send(&client, &pair.a.url(), &pair.b.url(), &id).await.unwrap();
        assert_echo(&id, status, &body);
    }
    assert_eq!(log_count(&pair.b, B_PAIRED), 1, "relay B should have paired once");

    pair.respawn_b();

    for index in 0..8 {
        let id = format!("after-{index}");
        let (status, body) = send(&client, &pair.a.url(), &pair.b.url(), &id).await.unwrap();
        assert_echo(&id, status, &body);
    }
    assert_eq!(
        log_count(&pair.b, B_PAIRED),
        0,
        "restarted relay B paired again:\n{}",
        pair.b.output_report()
    );
    assert_eq!(log_count(&pair.a, A_PAIRED), 1, "relay A paired again:\n{}", pair.a.output_report());
    upstream.wait_for_requests(16, RECORD_WAIT);
    assert_eq!(upstream.request_count(), 16);
}

#[tokio::test]
async fn restarted_outbound_relay_reuses_stored_pairs() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let b = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let mut a = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let client = client();

    for index in 0..6 {
        let id = format!("first-a-{index}");
        let (status, body) = send(&client, &a.url(), &b.url(), &id).await.unwrap();
        assert_echo(&id, status, &body);
    }
    assert_eq!(log_count(&a, A_PAIRED), 1);
    let builder = a.builder().clone();
    a.kill();

    let restarted = builder.spawn();
    for index in 0..6 {
        let id = format!("second-a-{index}");
        let (status, body) = send(&client, &restarted.url(), &b.url(), &id).await.unwrap();
        assert_echo(&id, status, &body);
    }
    assert_eq!(
        log_count(&restarted, A_REUSED),
        1,
        "restarted relay A did not reuse its pairs:\n{}",
        restarted.output_report()
    );
    assert_eq!(
        log_count(&restarted, A_PAIRED),
        0,
        "restarted relay A paired again:\n{}",
        restarted.output_report()
    );
    assert_eq!(log_count(&b, B_PAIRED), 1, "relay B answered a second pairing:\n{}", b.output_report());
}

#[tokio::test]
async fn two_outbound_relays_never_reuse_a_seq() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let b = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let recorder = TcpRecorder::start(&b.url());
    let a1 = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let a2 = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let client = client();

    // The first request pairs and stores the pool; both relays then draw seq from it at once.
    let (status, body) = send(&client, &a1.url(), &recorder.url(), "first").await.unwrap();
    assert_echo("first", status, &body);
    let ids: Vec<String> = (0..300).map(|index| format!("shared-{index}")).collect();
    let sends = ids.iter().enumerate().map(|(index, id)| {
        let relay = if index % 2 == 0 { a1.url() } else { a2.url() };
        let (client, peer) = (client.clone(), recorder.url());
        async move { (id, send(&client, &relay, &peer, id).await) }
    });
    for (id, result) in join_all(sends).await {
        let (status, body) = result.unwrap_or_else(|error| panic!("{error}"));
        assert_echo(id, status, &body);
    }

    upstream.wait_for_requests(ids.len() + 1, RECORD_WAIT);
    let exchanges = recorded_exchanges(&recorder);
    assert_eq!(exchanges.len(), ids.len() + 1, "relay B received an unexpected number of exchanges");
    let mut nonces = std::collections::HashSet::new();
    let mut pairs = std::collections::HashSet::new();
    for exchange in &exchanges {
        let header =
            String::from_utf8_lossy(exchange.header("x-mte-relay").expect("x-mte-relay header")).into_owned();
        let fields: Vec<&str> = header.split(',').collect();
        let (pair, seq) = (fields[1].to_owned(), fields[6].to_owned());
        assert!(nonces.insert((pair.clone(), seq.clone())), "pair {pair} used seq {seq} twice");
        pairs.insert(pair);
    }
    assert!(pairs.len() <= 4, "the two relays did not share one pool of pairs: {pairs:?}");
    assert_eq!(log_count(&b, B_PAIRED), 1, "relay B answered a second pairing:\n{}", b.output_report());
}

/// Outcome counts of the requests sent during the outage test.
#[derive(Debug, Default)]
struct Outcomes {
    succeeded: usize,
    failed_502: usize,
    slowest: Duration,
}

#[tokio::test]
async fn redis_outage_fails_fast_then_recovers() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start();
    let b = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let a = with_redis(relay_builder(&upstream.url()), &redis).spawn();
    let client = client();
    let (relay_a, peer) = (a.url(), b.url());
    let (status, body) = send(&client, &relay_a, &peer, "warm-up").await.unwrap();
    assert_echo("warm-up", status, &body);

    let started = Instant::now();
    let outage = Duration::from_secs(2)..Duration::from_secs(5);
    let deadline = Duration::from_secs(40);
    let mut outcomes = Outcomes::default();
    let mut redis_state = "up";
    let mut recovered_in_a_row = 0;
    let mut round = 0;
    while recovered_in_a_row < 20 {
        let elapsed = started.elapsed();
        assert!(elapsed < deadline, "service did not resume within {deadline:?}: {outcomes:?}");
        if redis_state == "up" && elapsed >= outage.start {
            redis.kill();
            redis_state = "down";
            let ready = reqwest::get(format!("{}/readyz", b.url())).await.expect("/readyz failed");
            assert_eq!(ready.status(), 503, "relay B is ready with Redis down");
        } else if redis_state == "down" && elapsed >= outage.end {
            redis.restart();
            redis_state = "back";
        }

        let ids: Vec<String> = (0..8).map(|worker| format!("outage-{round}-{worker}")).collect();
        round += 1;
        let (client, relay_a, peer) = (&client, &relay_a, &peer);
        let timed = ids.iter().map(|id| async move {
            let sent = Instant::now();
            let result = send(client, relay_a, peer, id).await;
            (id, result, sent.elapsed())
        });
        for (id, result, took) in join_all(timed).await {
            outcomes.slowest = outcomes.slowest.max(took);
            let (status, body) =
                result.unwrap_or_else(|error| panic!("{error} (a hang counts as a failure)"));
            match status {
                200 => {
                    assert_echo(id, status, &body);
                    outcomes.succeeded += 1;
                    if redis_state == "back" {
                        recovered_in_a_row += 1;
                    }
                }
                502 => {
                    let error: Value = serde_json::from_slice(&body).expect("error body is JSON");
                    assert!(
                        error["error"].as_str().is_some_and(|text| !text.is_empty()),
                        "no message: {error}"
                    );
                    outcomes.failed_502 += 1;
                    recovered_in_a_row = 0;
                }
                other => panic!("request {id} got {other}: {}", body.escape_ascii()),
            }
        }
    }

    eprintln!("requests during the Redis outage test: {outcomes:?}");
    assert!(outcomes.failed_502 > 0, "no request failed while Redis was down: {outcomes:?}");
    assert!(outcomes.slowest < Duration::from_secs(10), "a request took {:?}", outcomes.slowest);
    let ready = reqwest::get(format!("{}/readyz", b.url())).await.expect("/readyz failed");
    assert_eq!(ready.status(), 200, "relay B not ready after Redis came back");
    std::thread::sleep(Duration::from_millis(300));
    let repeated: Vec<(String, usize)> =
        targets_seen(&upstream).into_iter().filter(|(_, count)| *count > 1).collect();
    assert!(repeated.is_empty(), "the upstream received exchanges twice: {repeated:?}");
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, made with the `openssl`
/// command in a temporary directory that is removed on drop.
struct TestCertificates {
    dir: std::path::PathBuf,
}

impl TestCertificates {
    fn create() -> TestCertificates {
        let dir = std::env::temp_dir().join(format!("api-relay-redis-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("creating the certificate directory failed");
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("writing server.ext failed");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let steps: [Vec<&str>; 3] = [
            [
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=api-relay test CA"],
            ]
            .concat(),
            [&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]]
                .concat(),
            vec![
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "server.ext",
            ],
        ];
        for args in steps {
            let output = std::process::Command::new("openssl")
                .args(&args)
                .current_dir(&dir)
                .output()
                .expect("running openssl failed; install the openssl package");
            assert!(
                output.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        TestCertificates { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn redis_over_tls_with_password_works() {
    let certificates = TestCertificates::create();
    let (certificate, key, ca) =
        (certificates.path("server.pem"), certificates.path("server.key"), certificates.path("ca.pem"));
    let password = format!("redis-password-{}", uuid::Uuid::new_v4().simple());
    let redis =
        RedisServer::start_tls(&TlsFiles { certificate: &certificate, key: &key, ca: &ca }, &password);
    let upstream = Upstream::start();
    let b = relay_builder(&upstream.url())
        .env("REDIS_URL", redis.tls_url(&password))
        .env("REDIS_TIMEOUT_MS", REDIS_TIMEOUT_MS)
        .env("SSL_CERT_FILE", ca.display().to_string())
        .spawn();
    let a = relay_builder(&upstream.url()).spawn();

    let (status, body) = send(&client(), &a.url(), &b.url(), "over-tls").await.unwrap();
    assert_echo("over-tls", status, &body);
    let ready = reqwest::get(format!("{}/readyz", b.url())).await.expect("/readyz failed");
    assert_eq!(ready.status(), 200, "relay B cannot reach Redis over TLS:\n{}", b.output_report());

    let startup = b.log_json().into_iter().find(|line| line["fields"]["redis_tls"] == true);
    assert!(startup.is_some(), "no start-up record with redis_tls=true:\n{}", b.output_report());
    let logs = b.log_lines().join("\n") + &b.stderr_lines().join("\n");
    assert!(!logs.contains(&password), "relay B logged the Redis password");
}
