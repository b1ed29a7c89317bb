//! Abuse limits against real relays: a pairing flood is cut off per client while exchanges on
//! existing pairs go on, and a client that never finishes its request head is disconnected.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api_relay_protocol::ClientId;
use api_relay_protocol::pairing::PairingInitiator;
use common::{OUTBOUND_TOKEN_VALUE, RelayPair, Upstream};

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
            let request = PairingInitiator::new(1).request(Some(&id));
            let response = client
                .post(format!("{}/api/mte-pair", pair.b.url()))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&request).expect("pairing request JSON"))
                .send()
                .await
                .expect("pairing request");
            statuses.push(response.status().as_u16());
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
    let rejections =
        pair.b.log_lines().iter().filter(|line| line.contains("too many pairing requests")).count();
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
