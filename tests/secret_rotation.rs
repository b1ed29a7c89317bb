//! Black-box tests of rotating relay B's `CLIENT_ID_SECRET` while an application keeps sending
//! requests through relay A.
//!
//! Relay B starts with secret S1, restarts with S2 and `CLIENT_ID_SECRET_PREVIOUS=S1`, then
//! restarts with S2 alone. Every application request must get 200 throughout. A forwarder in
//! front of relay B keeps new connections waiting while relay B restarts, as a load balancer that retries
//! its backend would, so requests sent during the restart wait instead of failing to connect.
//!
//! With state in memory, a restarted relay B has lost its pairs and relay A pairs again with the
//! id it holds. With state in Redis the pairs survive, so relay A keeps using its S1-signed id
//! until relay B drops S1, and then recovers from the 566.

mod common;
// This file uses only the plain server. The TLS and restart helpers serve other test files.
#[allow(dead_code)]
#[path = "../actors/tests/support/redis_server.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api_relay_protocol::pairing::PairingInitiator;
use api_relay_protocol::{ClientId, ClientIdSigner};
use common::background::BackgroundServer;
use common::{OUTBOUND_TOKEN_VALUE, RelayBuilder, RelayPair, RelayProcess, Upstream, wait_until};
use redis_server::RedisServer;

/// The first `CLIENT_ID_SECRET` of relay B, a made-up test value.
const SECRET_1: &str = "rotation-secret-one-4b8e2f71c9a05d36e1f7a2c8b4d90e63";
/// The `CLIENT_ID_SECRET` relay B rotates to, a made-up test value.
const SECRET_2: &str = "rotation-secret-two-9d3a6c04e7b1f258a0c4e9d7b3f61a25";
/// Client timeout of every request in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent request loops that play the application.
const LOOPS: usize = 2;
/// Maximum requests one loop sends, so a loop that is never stopped still ends.
const MAX_REQUESTS_PER_LOOP: usize = 2_000;
/// Successful requests each phase waits for before the next restart.
const REQUESTS_PER_PHASE: usize = 30;
/// Maximum time one phase may take to reach [`REQUESTS_PER_PHASE`].
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum time the forwarder retries connecting to relay B.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Message of relay A's log record for each pairing it finishes.
const A_PAIRED: &str = "paired with peer relay";

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("building the reqwest client failed")
}

/// A TCP forwarder on 127.0.0.1 that, for each accepted connection, retries connecting to its
/// target until it succeeds or [`RECONNECT_TIMEOUT`] passes, then copies bytes both ways.
struct ReconnectingForwarder {
    server: BackgroundServer,
}

impl ReconnectingForwarder {
    fn start(target: SocketAddr) -> ReconnectingForwarder {
        assert!(target.ip().is_loopback(), "target {target} is not a loopback address");
        let server = BackgroundServer::start("reconnecting-forwarder", move |listener| async move {
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Some(mut server) = connect_with_retries(target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        ReconnectingForwarder { server }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }
}

async fn connect_with_retries(target: SocketAddr) -> Option<tokio::net::TcpStream> {
    let deadline = Instant::now() + RECONNECT_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(stream) = tokio::net::TcpStream::connect(target).await {
            return Some(stream);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("reconnecting forwarder: {target} did not accept within {RECONNECT_TIMEOUT:?}");
    None
}

/// Request loops that send `POST /echo/rotation/<loop>/<n>` through relay A until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    succeeded: Arc<AtomicUsize>,
    loops: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Traffic {
    fn start(relay_a: &str, peer: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let succeeded = Arc::new(AtomicUsize::new(0));
        let loops = (0..LOOPS)
            .map(|index| {
                let (relay_a, peer) = (relay_a.to_owned(), peer.to_owned());
                let (stop, succeeded) = (Arc::clone(&stop), Arc::clone(&succeeded));
                tokio::spawn(async move { request_loop(index, &relay_a, &peer, &stop, &succeeded).await })
            })
            .collect();
        Traffic { stop, succeeded, loops }
    }

    /// Waits until [`REQUESTS_PER_PHASE`] more requests succeeded than when it was called.
    fn wait_for_more(&self, phase: &str) {
        let target = self.succeeded.load(Ordering::SeqCst) + REQUESTS_PER_PHASE;
        let reached = wait_until(PHASE_TIMEOUT, || self.succeeded.load(Ordering::SeqCst) >= target);
        assert!(
            reached,
            "{phase}: fewer than {REQUESTS_PER_PHASE} requests succeeded within {PHASE_TIMEOUT:?}"
        );
    }

    /// Stops the loops and asserts that every request got 200.
    async fn finish_without_failures(self) {
        let (succeeded, failures) = self.finish().await;
        assert!(
            failures.is_empty(),
            "{} of {} requests failed:\n{}",
            failures.len(),
            succeeded + failures.len(),
            failures.join("\n")
        );
    }

    /// Stops the loops and returns a description of every request that did not get 200.
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for handle in self.loops {
            failures.extend(handle.await.expect("a request loop panicked"));
        }
        (self.succeeded.load(Ordering::SeqCst), failures)
    }
}

async fn request_loop(
    index: usize,
    relay_a: &str,
    peer: &str,
    stop: &AtomicBool,
    succeeded: &AtomicUsize,
) -> Vec<String> {
    let client = client();
    let mut failures = Vec::new();
    for number in 0..MAX_REQUESTS_PER_LOOP {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let path = format!("/echo/rotation/{index}/{number}");
        let result = client
            .post(format!("{relay_a}{path}"))
            .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
            .header("x-mte-upstream", peer)
            .body(path.clone())
            .send()
            .await;
        match result {
            Ok(response) if response.status() == 200 => {
                succeeded.fetch_add(1, Ordering::SeqCst);
            }
            Ok(response) => {
                let status = response.status();
                let body = response.bytes().await.unwrap_or_default();
                failures.push(format!("{path}: {status} {}", body.escape_ascii()));
            }
            Err(error) => failures.push(format!("{path}: {error}")),
        }
    }
    failures
}

/// Sends `POST /api/mte-pair` to `relay_b` with `client_id` and returns the status and the
/// client id of a 200 response.
async fn pair_directly(relay_b: &str, client_id: &ClientId) -> (u16, Option<ClientId>) {
    let initiator = PairingInitiator::new(1);
    let body =
        serde_json::to_vec(&initiator.request(Some(client_id))).expect("serialising the request failed");
    let response = client()
        .post(format!("{relay_b}/api/mte-pair"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("pairing request to relay B failed");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("reading the pairing answer failed");
    let returned = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|json| json["clientId"].as_str().map(str::to_owned))
        .map(|text| ClientId::parse(&text).expect("relay B returned a valid client id"));
    (status, returned)
}

/// Sends `HEAD /api/mte-relay` to `relay_b` presenting `client_id` and returns the id it issues.
async fn fetch_client_id(relay_b: &str, client_id: &ClientId) -> ClientId {
    let response = client()
        .head(format!("{relay_b}/api/mte-relay"))
        .header("x-mte-relay", client_id.to_string())
        .send()
        .await
        .expect("HEAD to relay B failed");
    assert_eq!(response.status(), 200, "HEAD /api/mte-relay");
    let value = response.headers().get("x-mte-relay").expect("relay B issued no client id");
    ClientId::parse(value.to_str().expect("client id is text")).expect("relay B issued a valid client id")
}

fn count_lines(relay: &RelayProcess, text: &str) -> usize {
    relay.log_lines().iter().filter(|line| line.contains(text)).count()
}

fn with_previous_secret(builder: RelayBuilder) -> RelayBuilder {
    builder.env("CLIENT_ID_SECRET", SECRET_2).env("CLIENT_ID_SECRET_PREVIOUS", SECRET_1)
}

fn without_previous_secret(builder: RelayBuilder) -> RelayBuilder {
    builder.env("CLIENT_ID_SECRET", SECRET_2).env_remove("CLIENT_ID_SECRET_PREVIOUS")
}

/// Restarts relay B without stalling the request loops that run on this runtime.
fn restart_b(pair: &mut RelayPair, change: fn(RelayBuilder) -> RelayBuilder) {
    tokio::task::block_in_place(|| pair.restart_b_with(change));
}

fn relay_b_addr(pair: &RelayPair) -> SocketAddr {
    pair.b.addr().parse().expect("relay B's address is host:port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_memory_state_keeps_requests_working() {
    let upstream = Upstream::start();
    let mut pair = RelayPair::start_with(&upstream.url(), &[], &[("CLIENT_ID_SECRET", SECRET_1)]);
    let forwarder = ReconnectingForwarder::start(relay_b_addr(&pair));
    let old_id = ClientIdSigner::new(SECRET_1.as_bytes(), None).issue();
    let new_signer = ClientIdSigner::new(SECRET_2.as_bytes(), None);
    let traffic = Traffic::start(&pair.a.url(), &forwarder.url());
    traffic.wait_for_more("relay B with S1");

    restart_b(&mut pair, with_previous_secret);
    traffic.wait_for_more("relay B with S2 and previous S1");
    let (status, refreshed) = pair_directly(&pair.b.url(), &old_id).await;
    assert_eq!(status, 200, "an S1-signed id must still pair while S1 is the previous secret");
    let refreshed = refreshed.expect("the pairing response names a client id");
    assert_eq!(refreshed.uuid(), old_id.uuid(), "the refreshed id keeps its uuid");
    assert!(new_signer.verify(&refreshed).is_ok(), "the refreshed id is signed with S2");

    restart_b(&mut pair, without_previous_secret);
    traffic.wait_for_more("relay B with S2 only");
    traffic.finish_without_failures().await;
    let (status, _) = pair_directly(&pair.b.url(), &old_id).await;
    assert_eq!(status, 566, "an S1-signed id must be rejected once S1 is gone");
    let issued = fetch_client_id(&pair.b.url(), &old_id).await;
    assert_ne!(issued.uuid(), old_id.uuid(), "HEAD refreshed an S1-signed id instead of issuing a new one");
    assert!(new_signer.verify(&issued).is_ok(), "the issued id is signed with S2");
    assert!(
        count_lines(&pair.a, A_PAIRED) >= 3,
        "relay A did not pair again after each restart\n{}",
        pair.a.output_report()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_redis_state_recovers_from_566() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let redis_env = [("REDIS_URL", redis.url()), ("REDIS_KEY_PREFIX", "rotation-test".to_owned())];
    let mut env_b: Vec<(&str, &str)> = redis_env.iter().map(|(key, value)| (*key, value.as_str())).collect();
    env_b.push(("CLIENT_ID_SECRET", SECRET_1));
    let mut pair = RelayPair::start_with(&upstream.url(), &[], &env_b);
    let forwarder = ReconnectingForwarder::start(relay_b_addr(&pair));
    let old_id = ClientIdSigner::new(SECRET_1.as_bytes(), None).issue();
    let traffic = Traffic::start(&pair.a.url(), &forwarder.url());
    traffic.wait_for_more("relay B with S1");
    assert_eq!(count_lines(&pair.a, A_PAIRED), 1, "relay A paired more than once before any restart");

    restart_b(&mut pair, with_previous_secret);
    traffic.wait_for_more("relay B with S2 and previous S1");
    // The pairs survived in Redis, and relay A still uses its S1-signed id in every exchange.
    assert_eq!(count_lines(&pair.a, A_PAIRED), 1, "relay A paired again although relay B kept its pairs");
    let rejected = pair.b.log_lines().into_iter().find(|line| line.contains("inbound exchange rejected"));
    assert_eq!(rejected, None, "relay B rejected an exchange while S1 was the previous secret");

    restart_b(&mut pair, without_previous_secret);
    traffic.wait_for_more("relay B with S2 only");
    traffic.finish_without_failures().await;
    let retried = pair.a.wait_for_log(Duration::from_secs(5), |line| {
        line.contains("pairing again") && line.contains("\"status\":566")
    });
    assert!(retried.is_some(), "relay A logged no retry after 566\n{}", pair.a.output_report());
    assert!(count_lines(&pair.a, A_PAIRED) >= 2, "relay A did not pair again after the 566");
    let (status, _) = pair_directly(&pair.b.url(), &old_id).await;
    assert_eq!(status, 566, "an S1-signed id must be rejected once S1 is gone");
}
