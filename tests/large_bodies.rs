//! Black-box tests that 1 GiB bodies stream through a relay pair in both directions, intact,
//! while the resident memory of each relay stays small.
//!
//! Each test samples `VmRSS` of both relay processes from `/proc/<pid>/status` while the body
//! streams and reads `VmHWM`, the peak since the process started, at the end. Run with
//! `--nocapture` to see the measured peaks and the transfer time. The two tests take a shared
//! lock, so their timings and memory figures do not include each other's load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{RelayPair, Upstream, pattern_bytes, pattern_sha256_hex};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Body size of both tests: 1 GiB.
const BODY_BYTES: u64 = 1 << 30;
/// Maximum resident memory of each relay while a body streams: 100 MiB.
const MAX_RELAY_RSS_KIB: u64 = 100 * 1024;
/// Size of each piece of the generated request body.
const PIECE_BYTES: usize = 64 * 1024;
/// Period of the deterministic pattern: byte i depends only on i % 251.
const PATTERN_PERIOD: usize = 251;
/// Interval between two memory samples.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Maximum time for one 1 GiB transfer, far above the expected time, so a stalled stream
/// fails the test instead of hanging it.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Serialises the tests of this file.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Returns the SHA-256 of the 1 GiB pattern body, computed once for both tests because it takes
/// seconds in a debug build.
fn expected_sha256() -> &'static str {
    static SHA256: OnceLock<String> = OnceLock::new();
    SHA256.get_or_init(|| pattern_sha256_hex(BODY_BYTES))
}

fn start_pair(upstream: &Upstream) -> RelayPair {
    let env = [("MAX_BODY_BYTES", "2147483648"), ("UPSTREAM_TIMEOUT_SECS", "600")];
    RelayPair::start(&upstream.url(), &env)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(TRANSFER_TIMEOUT).build().expect("building the reqwest client failed")
}

/// Returns the request body: the first `len` pattern bytes in pieces of [`PIECE_BYTES`],
/// generated as the client sends them.
fn pattern_body(len: u64) -> reqwest::Body {
    // One period of slack lets every piece start at its offset's position in the pattern.
    let window = Bytes::from(pattern_bytes(PIECE_BYTES + PATTERN_PERIOD));
    let pieces = futures_util::stream::unfold(0u64, move |offset| {
        let window = window.clone();
        async move {
            if offset >= len {
                return None;
            }
            let size = PIECE_BYTES.min((len - offset) as usize);
            let start = (offset % PATTERN_PERIOD as u64) as usize;
            Some((Ok::<_, std::io::Error>(window.slice(start..start + size)), offset + size as u64))
        }
    });
    reqwest::Body::wrap_stream(pieces)
}

/// Memory figures of one process, in KiB.
#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn read_memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("reading /proc/{pid}/status failed: {error}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} line in /proc/{pid}/status"))
    };
    Memory { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:") }
}

/// Samples `VmRSS` of both relays until stopped, and keeps the largest value of each.
struct MemorySampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<[u64; 2]>,
}

impl MemorySampler {
    fn start(pids: [u32; 2]) -> MemorySampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut largest = [0u64; 2];
            while !stopped.load(Ordering::Relaxed) {
                for (slot, pid) in largest.iter_mut().zip(pids) {
                    *slot = (*slot).max(read_memory(pid).rss_kib);
                }
                thread::sleep(SAMPLE_INTERVAL);
            }
            largest
        });
        MemorySampler { stop, thread }
    }

    /// Stops sampling and returns the largest sampled `VmRSS` of each relay.
    fn finish(self) -> [u64; 2] {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the memory sampler panicked")
    }
}

/// Prints the memory figures of both relays and checks each peak against the limit.
fn check_relay_memory(label: &str, pair: &RelayPair, sampled_rss: [u64; 2], elapsed: Duration) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let throughput = BODY_BYTES as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64();
    eprintln!("{label}: 1 GiB in {:.1} s ({throughput:.0} MiB/s)", elapsed.as_secs_f64());
    for (name, relay, sampled) in [("relay A", &pair.a, sampled_rss[0]), ("relay B", &pair.b, sampled_rss[1])]
    {
        let memory = read_memory(relay.pid());
        // The kernel updates VmHWM lazily, so a sample can be a little above it.
        let peak = memory.hwm_kib.max(sampled);
        eprintln!(
            "{label}: {name} peak RSS (VmHWM) {:.1} MiB, largest sampled VmRSS {:.1} MiB, now {:.1} MiB",
            mib(memory.hwm_kib),
            mib(sampled),
            mib(memory.rss_kib)
        );
        assert!(
            peak < MAX_RELAY_RSS_KIB,
            "{label}: {name} peak RSS {:.1} MiB is not under {} MiB",
            mib(peak),
            MAX_RELAY_RSS_KIB / 1024
        );
    }
}

#[tokio::test]
async fn gigabyte_request_body_streams_through_pair() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let upstream = Upstream::start();
    let pair = start_pair(&upstream);
    let expected_sha256 = expected_sha256();
    let sampler = MemorySampler::start([pair.a.pid(), pair.b.pid()]);
    let started = Instant::now();

    let response = client()
        .request(Method::POST, format!("{}/sink", pair.a.url()))
        .header("x-mte-outbound-token", common::OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", pair.b.url())
        .body(pattern_body(BODY_BYTES))
        .send()
        .await
        .expect("sending 1 GiB through the relays failed");
    let status = response.status();
    let response_body = response.bytes().await.expect("reading the /sink response failed");

    let elapsed = started.elapsed();
    let sampled = sampler.finish();
    assert_eq!(status, 200, "response: {}", response_body.escape_ascii());
    let summary: Value = serde_json::from_slice(&response_body).expect("the /sink response is JSON");
    assert_eq!(summary["body_len"], BODY_BYTES, "bytes the upstream received");
    assert_eq!(summary["body_sha256"], expected_sha256, "SHA-256 of the body the upstream received");
    assert_eq!(upstream.request_count(), 1);
    check_relay_memory("request body", &pair, sampled, elapsed);
}

#[tokio::test]
async fn gigabyte_response_body_streams_through_pair() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let upstream = Upstream::start();
    let pair = start_pair(&upstream);
    let expected_sha256 = expected_sha256();
    let sampler = MemorySampler::start([pair.a.pid(), pair.b.pid()]);
    let started = Instant::now();

    let response = client()
        .get(format!("{}/big?bytes={BODY_BYTES}", pair.a.url()))
        .header("x-mte-outbound-token", common::OUTBOUND_TOKEN_VALUE)
        .header("x-mte-upstream", pair.b.url())
        .send()
        .await
        .expect("requesting 1 GiB through the relays failed");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    while let Some(piece) = body.next().await {
        let piece =
            piece.unwrap_or_else(|error| panic!("response body failed after {received} bytes: {error}"));
        received += piece.len() as u64;
        hasher.update(&piece);
    }

    let elapsed = started.elapsed();
    let sampled = sampler.finish();
    assert_eq!(received, BODY_BYTES, "bytes the application received");
    assert_eq!(
        hex::encode(hasher.finalize()),
        expected_sha256,
        "SHA-256 of the body the application received"
    );
    check_relay_memory("response body", &pair, sampled, elapsed);
}
