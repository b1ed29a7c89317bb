//! Black-box tests of `PAIRING_PSK`: pairing with the same key on both relays, an active
//! man-in-the-middle between the relays, and keys that differ or are set on one side only.
//!
//! The man-in-the-middle is a small HTTP server in this file. It responds to relay A's pairing as
//! if it were relay B, with client ids from its own signer, and pairs with relay B on its own. It
//! knows no `PAIRING_PSK` or a wrong one. Every server listens on 127.0.0.1.

mod common;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_relay_protocol::pairing::{self, PairingInitiator, PairingRequest, PairingResponse};
use api_relay_protocol::{ClientId, ClientIdSigner, ProtocolError};
use common::background::BackgroundServer;
use common::http1::{Connection, RequestHead};
use common::{OUTBOUND_TOKEN_VALUE, RelayPair, RelayProcess, Upstream};
use serde_json::Value;

/// Client timeout of every request in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the upstream gets to record a request that relay B might still forward.
const RECORD_WAIT: Duration = Duration::from_millis(500);
/// Text of relay A's error record when key confirmation fails.
const KEY_CONFIRMATION_FAILED: &str = "pairing key confirmation failed";
/// A `PAIRING_PSK` longer than the required 32 characters, a made-up test value.
const PSK: &str = "test-pairing-psk-0d9c4b7a2e6f1358a4c7e90b";
/// Another valid `PAIRING_PSK`, different from [`PSK`].
const OTHER_PSK: &str = "test-pairing-psk-other-5f3e81c0d2a96b47e1";
/// Largest pairing request the man-in-the-middle accepts, like relay B's limit.
const MAX_PAIRS: usize = 16;

fn client() -> reqwest::Client {
    common::no_redirect_client(REQUEST_TIMEOUT)
}

/// Sends `POST /echo/psk` through relay A to `peer` and returns the status and body.
async fn send_through(relay_a: &RelayProcess, peer: &str) -> (u16, Vec<u8>) {
    let response = client()
        .post(format!("{}/echo/psk", relay_a.url()))
        .header("x-mte-outbound-token", OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", peer)
        .body("psk-body")
        .send()
        .await
        .expect("request to relay A failed");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("reading the response body failed").to_vec())
}

/// Checks that relay A logged the key-confirmation failure as an error naming `PAIRING_PSK`.
fn assert_key_confirmation_logged(relay_a: &RelayProcess) {
    let line = relay_a.wait_for_log(Duration::from_secs(5), |line| line.contains(KEY_CONFIRMATION_FAILED));
    let line = line
        .unwrap_or_else(|| panic!("relay A logged no key-confirmation failure\n{}", relay_a.output_report()));
    let record: Value = serde_json::from_str(&line).expect("the record is a JSON log line");
    assert_eq!(record["level"], "ERROR", "{record}");
    assert!(line.contains("PAIRING_PSK"), "the record does not name PAIRING_PSK: {line}");
}

/// Checks that pairing failed as seen by the application and the operator, and that nothing
/// reached the upstream.
async fn assert_pairing_fails(pair: &RelayPair, upstream: &Upstream) {
    let (status, body) = send_through(&pair.a, &pair.b.url()).await;
    assert_eq!(status, 502, "body {}", body.escape_ascii());
    assert_key_confirmation_logged(&pair.a);
    std::thread::sleep(RECORD_WAIT);
    assert_eq!(upstream.request_count(), 0, "a request reached the upstream");
}

#[tokio::test]
async fn same_psk_on_both_relays_pairs() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[("PAIRING_PSK", PSK)]);

    let (status, body) = send_through(&pair.a, &pair.b.url()).await;

    assert_eq!(status, 200, "body {}", body.escape_ascii());
    let echo: Value = serde_json::from_slice(&body).expect("echo body is JSON");
    assert_eq!(echo["target"], "/echo/psk");
    let requests = upstream.wait_for_requests(1, Duration::from_secs(5));
    assert_eq!(requests[0].body, b"psk-body");
    let failure = pair.a.log_lines().into_iter().find(|line| line.contains(KEY_CONFIRMATION_FAILED));
    assert_eq!(failure, None, "relay A logged a key-confirmation failure");
}

#[tokio::test]
async fn different_psks_fail_pairing() {
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &[("PAIRING_PSK", PSK)], &[("PAIRING_PSK", OTHER_PSK)]);

    assert_pairing_fails(&pair, &upstream).await;
}

#[tokio::test]
async fn psk_on_relay_a_only_fails_pairing() {
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &[("PAIRING_PSK", PSK)], &[]);

    assert_pairing_fails(&pair, &upstream).await;
}

#[tokio::test]
async fn psk_on_relay_b_only_fails_pairing() {
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &[], &[("PAIRING_PSK", PSK)]);

    assert_pairing_fails(&pair, &upstream).await;
}

#[tokio::test]
async fn active_man_in_the_middle_fails_pairing() {
    for mitm_psk in [None, Some(OTHER_PSK)] {
        let upstream = Upstream::start();
        let pair = RelayPair::start(&upstream.url(), &[("PAIRING_PSK", PSK)]);
        let mitm = ManInTheMiddle::start(&pair.b.url(), mitm_psk);

        let (status, body) = send_through(&pair.a, &mitm.url()).await;

        let case = format!("man-in-the-middle with PSK {mitm_psk:?}");
        assert_eq!(status, 502, "{case}: body {}", body.escape_ascii());
        assert_key_confirmation_logged(&pair.a);
        let seen = mitm.seen();
        assert!(seen.pairing_requests > 0, "{case}: relay A did not pair through it");
        assert_eq!(seen.other_requests, 0, "{case}: relay A sent it an exchange");
        assert_eq!(
            seen.b_outcomes,
            [Err(ProtocolError::KeyConfirmation)],
            "{case}: its pairing with relay B"
        );
        std::thread::sleep(RECORD_WAIT);
        assert_eq!(upstream.request_count(), 0, "{case}: a request reached the upstream");
    }
}

#[tokio::test]
async fn man_in_the_middle_succeeds_without_psk() {
    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let mitm = ManInTheMiddle::start(&pair.b.url(), None);

    let (status, body) = send_through(&pair.a, &mitm.url()).await;

    // Without the PSK relay A accepts the attacker's keys and sends it the sealed exchange,
    // which the attacker can open. This is the attack PAIRING_PSK prevents.
    assert_eq!(status, 502, "the attacker answers exchanges with 502, body {}", body.escape_ascii());
    let seen = mitm.seen();
    assert!(seen.pairing_requests > 0, "relay A did not pair through it");
    assert!(seen.other_requests > 0, "relay A sent it no sealed exchange");
    assert_eq!(seen.b_outcomes, [Ok(())], "its own pairing with relay B");
    let failure = pair.a.log_lines().into_iter().find(|line| line.contains(KEY_CONFIRMATION_FAILED));
    assert_eq!(failure, None, "relay A noticed the attack although no PSK is set");
}

/// What the man-in-the-middle saw and did.
#[derive(Debug, Default)]
struct Seen {
    /// `POST /api/mte-pair` requests from relay A.
    pairing_requests: usize,
    /// Requests other than the two pairing routes, such as sealed exchanges.
    other_requests: usize,
    /// The result of each of its own pairings with relay B.
    b_outcomes: Vec<Result<(), ProtocolError>>,
}

/// An HTTP server that plays relay B towards relay A, and relay A towards the real relay B.
struct ManInTheMiddle {
    server: BackgroundServer,
    seen: Arc<Mutex<Seen>>,
}

/// Settings and state shared by the connections of one [`ManInTheMiddle`].
struct Attacker {
    relay_b: String,
    psk: Option<&'static str>,
    signer: ClientIdSigner,
    seen: Arc<Mutex<Seen>>,
}

impl ManInTheMiddle {
    fn start(relay_b: &str, psk: Option<&'static str>) -> ManInTheMiddle {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let attacker = Arc::new(Attacker {
            relay_b: relay_b.to_owned(),
            psk,
            signer: ClientIdSigner::new(b"the attacker's own client id secret", None),
            seen: Arc::clone(&seen),
        });
        let server = BackgroundServer::start("man-in-the-middle", move |listener| async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(Connection::new(stream), Arc::clone(&attacker)));
            }
        });
        ManInTheMiddle { server, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

async fn serve(mut connection: Connection, attacker: Arc<Attacker>) {
    loop {
        let head = match connection.read_head().await {
            Ok(Some(head)) => head,
            Ok(None) | Err(_) => return,
        };
        let Ok(body) = read_body(&mut connection, &head).await else { return };
        let response = match (head.method.as_str(), head.path()) {
            ("HEAD", b"/api/mte-relay") => {
                let id = attacker.signer.issue();
                format!("HTTP/1.1 200 OK\r\nx-mte-relay: {id}\r\ncontent-length: 0\r\n\r\n").into_bytes()
            }
            ("POST", b"/api/mte-pair") => attacker.answer_pairing(&body).await,
            _ => {
                attacker.seen.lock().unwrap().other_requests += 1;
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n".to_vec()
            }
        };
        if connection.write_all(&response).await.is_err() {
            return;
        }
    }
}

async fn read_body(connection: &mut Connection, head: &RequestHead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    connection.read_body(head.body_framing()?, |data| body.extend_from_slice(data)).await?;
    Ok(body)
}

impl Attacker {
    /// Responds to relay A's pairing request with the attacker's own keys, after pairing with
    /// relay B itself.
    async fn answer_pairing(&self, body: &[u8]) -> Vec<u8> {
        self.seen.lock().unwrap().pairing_requests += 1;
        let outcome = self.pair_with_b().await;
        self.seen.lock().unwrap().b_outcomes.push(outcome);

        let request: PairingRequest =
            serde_json::from_slice(body).expect("relay A sent a valid pairing request");
        let client_id = match &request.client_id {
            Some(text) => ClientId::parse(text).expect("relay A sent a valid client id"),
            None => self.signer.issue(),
        };
        let psk = self.psk.map(str::as_bytes);
        let (answer, _keys) = pairing::respond(&request, &client_id, psk, MAX_PAIRS)
            .expect("answering relay A's pairing failed");
        let json = serde_json::to_vec(&answer).expect("serialising the pairing answer failed");
        let mut response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            json.len()
        )
        .into_bytes();
        response.extend_from_slice(&json);
        response
    }

    /// Fetches a client id from relay B and pairs with it as relay A would.
    async fn pair_with_b(&self) -> Result<(), ProtocolError> {
        let client = client();
        let head = client
            .head(format!("{}/api/mte-relay", self.relay_b))
            .send()
            .await
            .expect("HEAD to relay B failed");
        let id = head.headers().get("x-mte-relay").expect("relay B issued no client id");
        let id = ClientId::parse(id.to_str().expect("client id is text"))
            .expect("relay B issued a valid client id");
        let initiator = PairingInitiator::new(1);
        let body = serde_json::to_vec(&initiator.request(Some(&id)))
            .expect("serialising the pairing request failed");
        let response = client
            .post(format!("{}/api/mte-pair", self.relay_b))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("pairing request to relay B failed");
        assert_eq!(response.status(), 200, "relay B rejected the attacker's pairing request");
        let bytes = response.bytes().await.expect("reading relay B's pairing answer failed");
        let answer: PairingResponse =
            serde_json::from_slice(&bytes).expect("relay B's pairing answer is JSON");
        initiator.complete(&answer, self.psk.map(str::as_bytes)).map(|_| ())
    }
}
