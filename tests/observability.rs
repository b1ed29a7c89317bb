//! Black-box tests of what operators rely on: the Prometheus metrics after known traffic, the
//! metric names the Grafana dashboard queries, the request log and what it must never contain,
//! graceful shutdown on SIGTERM, and the health and readiness routes.
//!
//! Every test starts its own upstream and relay processes on 127.0.0.1.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::marker;
use common::{
    OUTBOUND_TOKEN_VALUE, RawRequest, RelayPair, RelayProcess, TcpRecorder, Upstream, parse_responses,
    relay_builder, send_raw, wait_until,
};
use reqwest::{Method, RequestBuilder};
use serde_json::Value;

/// Maximum time one request through the relays may take in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time the upstream gets to record a request that already got its response.
const RECORD_WAIT: Duration = Duration::from_secs(5);
/// Time a relay gets to write the log records of requests that already got their responses.
const LOG_WAIT: Duration = Duration::from_secs(5);
/// Name of the header that carries the sealed header block.
const RELAY_EH_HEADER: &str = "x-mte-relay-eh";
/// Worker threads of relay A in the metrics test. Without `PAIR_POOL_SIZE`, relay A creates one
/// pair per worker, so both relays keep this many sessions.
const WORKERS_A: &str = "3";
/// Route template that outbound and inbound exchanges match.
const EXCHANGE_ROUTE: &str = "*";
/// Path of the Grafana dashboard, relative to the package root.
const DASHBOARD_PATH: &str = "grafana/dashboards/api-relay.json";

fn client() -> reqwest::Client {
    common::no_redirect_client(REQUEST_TIMEOUT)
}

/// Returns a request to relay A at `path` with `token` and `x-mte-upstream: peer`.
fn outbound_with_token(
    client: &reqwest::Client,
    relay_a: &str,
    peer: &str,
    token: &str,
    method: Method,
    path: &str,
) -> RequestBuilder {
    common::outbound_request(client, relay_a, peer, token, method, path)
}

/// Returns a request to relay A at `path` with the harness's outbound token.
fn outbound(
    client: &reqwest::Client,
    relay_a: &str,
    peer: &str,
    method: Method,
    path: &str,
) -> RequestBuilder {
    outbound_with_token(client, relay_a, peer, OUTBOUND_TOKEN_VALUE, method, path)
}

/// Returns a random secret of 64 hex digits after `label`.
fn random_secret(label: &str) -> String {
    format!("{label}-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

// Prometheus text format.

/// One sample line of a scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `/metrics` response.
struct Scrape {
    samples: Vec<Sample>,
    /// Metric family names from the `# TYPE` lines, with their type.
    families: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    /// Parses the Prometheus text format: `# TYPE` lines name the families, other `#` lines are
    /// skipped, and every remaining line is `name{label="value",...} value [timestamp]`. Panics
    /// on a line that does not parse.
    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut families = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                let mut parts = declaration.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    panic!("invalid # TYPE line {line:?}");
                };
                families.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample =
                parse_sample(line).unwrap_or_else(|error| panic!("invalid sample {line:?}: {error}"));
            samples.push(sample);
        }
        Scrape { samples, families, text: text.to_owned() }
    }

    /// Returns the value of the sample named `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> =
            labels.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect();
        self.samples
            .iter()
            .find(|sample| sample.name == name && sample.labels == wanted)
            .map(|sample| sample.value)
    }

    /// Returns the sum of every sample named `name`, whatever its labels.
    fn total(&self, name: &str) -> f64 {
        self.samples.iter().filter(|sample| sample.name == name).map(|sample| sample.value).sum()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or("no value after the name")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inside) = rest.strip_prefix('{') {
        rest = parse_labels(inside, &mut labels)?;
    }
    let value = rest.split_whitespace().next().ok_or("missing value")?;
    // Rust's f64 parser accepts the format's +Inf, -Inf and NaN spellings.
    let value = value.parse::<f64>().map_err(|error| format!("invalid value {value:?}: {error}"))?;
    Ok(Sample { name, labels, value })
}

/// Parses `key="value",...}` into `labels` and returns the text after the closing brace.
/// Values may contain the escapes `\\`, `\"` and `\n`.
fn parse_labels<'a>(mut text: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str, String> {
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok(rest);
        }
        let equals = text.find('=').ok_or("label without =")?;
        let key = text[..equals].trim().to_owned();
        let quoted = text[equals + 1..].strip_prefix('"').ok_or("label value is not quoted")?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (index, '"') => break index,
                (_, '\\') => match chars.next().ok_or("unterminated escape")?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, other) => value.push(other),
            }
        };
        labels.insert(key, value);
        text = &quoted[end + 1..];
    }
}

/// Fetches and parses `GET /metrics` of `relay`.
async fn scrape(client: &reqwest::Client, relay: &str) -> Scrape {
    let response = client.get(format!("{relay}/metrics")).send().await.expect("GET /metrics failed");
    assert_eq!(response.status(), 200, "GET {relay}/metrics");
    let content_type = response.headers().get("content-type").cloned();
    let content_type = content_type.as_ref().and_then(|value| value.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "content type of /metrics: {content_type:?}");
    Scrape::parse(&response.text().await.expect("reading /metrics failed"))
}

/// Expected values of one relay's samples, compared all at once so that a failure lists every
/// sample that differs.
struct MetricCheck<'a> {
    relay: &'static str,
    scrape: &'a Scrape,
    mismatches: Vec<String>,
}

impl<'a> MetricCheck<'a> {
    fn new(relay: &'static str, scrape: &'a Scrape) -> Self {
        MetricCheck { relay, scrape, mismatches: Vec::new() }
    }

    /// Expects the sample `name{labels}` to be exported with the value `expected`. The relay
    /// exports every series with known label values from start-up, so a 0 is exported too.
    fn expect(&mut self, name: &str, labels: &[(&str, &str)], expected: f64) {
        let actual = self.scrape.value(name, labels);
        if actual != Some(expected) {
            let actual_text = actual.map_or_else(|| "absent".to_owned(), |value| value.to_string());
            self.mismatches.push(format!(
                "relay {}: {name}{labels:?}: expected {expected}, actual {actual_text}",
                self.relay
            ));
        }
    }

    /// Expects the sum of every `name` sample to equal `expected`.
    fn expect_total(&mut self, name: &str, expected: f64) {
        let actual = self.scrape.total(name);
        if actual != expected {
            self.mismatches
                .push(format!("relay {}: sum of {name}: expected {expected}, actual {actual}", self.relay));
        }
    }

    /// Expects the sample `name{labels}` to be present with a value above 0.
    fn expect_positive(&mut self, name: &str, labels: &[(&str, &str)]) {
        match self.scrape.value(name, labels) {
            Some(value) if value > 0.0 => {}
            other => self.mismatches.push(format!(
                "relay {}: {name}{labels:?}: expected a value above 0, actual {other:?}",
                self.relay
            )),
        }
    }
}

/// Fails with every mismatch of `checks`, followed by each relay's `/metrics` text.
fn assert_metrics_match<const N: usize>(checks: [MetricCheck<'_>; N]) {
    let mismatches: Vec<&str> =
        checks.iter().flat_map(|check| check.mismatches.iter().map(String::as_str)).collect();
    let scrapes: String = checks
        .iter()
        .map(|check| format!("\n--- relay {} /metrics ---\n{}", check.relay, check.scrape.text))
        .collect();
    assert!(
        mismatches.is_empty(),
        "metrics differ from the traffic sent:\n{}{scrapes}",
        mismatches.join("\n")
    );
}

// Raw exchanges between the relays.

/// Returns every sealed exchange in the bytes relay A sent through `recorder`, in order.
fn recorded_exchanges(recorder: &TcpRecorder) -> Vec<RawRequest> {
    recorded_requests(recorder)
        .into_iter()
        .filter(|request| request.header(RELAY_EH_HEADER).is_some())
        .collect()
}

/// Returns every request relay A sent through `recorder`: client id, pairing and exchanges.
fn recorded_requests(recorder: &TcpRecorder) -> Vec<RawRequest> {
    recorder.client_to_server().iter().flat_map(|bytes| RawRequest::split_all(bytes)).collect()
}

/// Returns a copy of `exchange` with one character in the middle of its sealed header block
/// changed, which relay B must reject with 562.
fn with_header_block_changed(exchange: &RawRequest) -> Vec<u8> {
    let mut block = exchange.header(RELAY_EH_HEADER).expect("exchange has a header block").to_vec();
    let middle = block.len() / 2;
    block[middle] = if block[middle] == b'A' { b'B' } else { b'A' };
    exchange.with_header_value(RELAY_EH_HEADER, &block)
}

/// Sends `request` to `addr` and returns the status of the first response. A `GET /healthz`
/// with `Connection: close` follows on the same connection, so relay B closes the connection
/// after responding instead of waiting for its keep-alive timeout. Relay B counts that
/// request as a local one.
async fn send_exchange_bytes(addr: &str, request: &[u8]) -> u16 {
    let mut bytes = request.to_vec();
    bytes.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: relay-b\r\nConnection: close\r\n\r\n");
    let addr = addr.to_owned();
    let raw = tokio::task::spawn_blocking(move || send_raw(&addr, &bytes)).await.expect("send_raw panicked");
    assert!(!raw.is_empty(), "relay B closed the connection without a response");
    let responses = parse_responses(&raw);
    assert_eq!(responses.len(), 2, "expected the exchange's response and the /healthz response");
    responses[0].status
}

// Metrics.

#[tokio::test]
async fn metrics_follow_real_traffic() {
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &[("WORKERS", WORKERS_A)], &[]);
    let recorder = TcpRecorder::start(&pair.b.url());
    let client = client();
    // Bodies from 1 byte to several 64 KiB records, and one padded MTE body.
    let bodies = [(1, "MKE"), (100, "MKE"), (4096, "MTE"), (70_000, "MKE"), (200_000, "MKE")];
    let mut request_bytes = 0;
    let mut response_bytes = 0;

    for (size, encode_type) in bodies {
        let response = outbound(&client, &pair.a.url(), &recorder.url(), Method::POST, "/sink")
            .header("x-mte-encode-type", encode_type)
            .body(common::pattern_bytes(size))
            .send()
            .await
            .expect("request through the relays failed");
        let status = response.status();
        let body = response.bytes().await.expect("reading the response failed");
        assert_eq!(status, 200, "{encode_type} body of {size} bytes: {}", body.escape_ascii());
        let summary: Value = serde_json::from_slice(&body).expect("the /sink response is JSON");
        assert_eq!(summary["body_len"], size, "{encode_type} body of {size} bytes");
        request_bytes += size;
        response_bytes += body.len();
    }
    upstream.wait_for_requests(bodies.len(), RECORD_WAIT);

    let exchange = recorded_exchanges(&recorder).remove(0);
    let replayed = send_exchange_bytes(&pair.b.addr(), &exchange.bytes).await;
    assert_eq!(replayed, 563, "status of the replayed exchange");
    let tampered = send_exchange_bytes(&pair.b.addr(), &with_header_block_changed(&exchange)).await;
    assert_eq!(tampered, 562, "status of the tampered exchange");

    let wrong_token =
        outbound_with_token(&client, &pair.a.url(), &recorder.url(), "wrong-token", Method::POST, "/sink")
            .body("not counted")
            .send()
            .await
            .expect("request to relay A failed");
    assert_eq!(wrong_token.status(), 401);
    assert_eq!(upstream.request_count(), bodies.len(), "only the five exchanges reach the upstream");

    let a = scrape(&client, &pair.a.url()).await;
    let b = scrape(&client, &pair.b.url()).await;
    let (request_bytes, response_bytes) = (request_bytes as f64, response_bytes as f64);

    let mut relay_a = MetricCheck::new("A", &a);
    relay_a.expect("relay_requests_total", &[("role", "outbound"), ("status_class", "2xx")], 5.0);
    relay_a.expect("relay_requests_total", &[("role", "outbound"), ("status_class", "4xx")], 1.0);
    relay_a.expect("relay_requests_total", &[("role", "outbound"), ("status_class", "5xx")], 0.0);
    // A scrape is counted when its response is ready, so this first scrape is not in it.
    relay_a.expect_total("relay_requests_total", 6.0);
    relay_a.expect("relay_request_duration_seconds_count", &[("role", "outbound")], 6.0);
    relay_a.expect_total("relay_request_duration_seconds_count", 6.0);
    relay_a.expect_total("relay_upstream_duration_seconds_count", 0.0);
    relay_a.expect(
        "relay_body_bytes_total",
        &[("role", "outbound"), ("direction", "request")],
        request_bytes,
    );
    relay_a.expect(
        "relay_body_bytes_total",
        &[("role", "outbound"), ("direction", "response")],
        response_bytes,
    );
    relay_a.expect("relay_body_bytes_total", &[("role", "inbound"), ("direction", "request")], 0.0);
    relay_a.expect("relay_pairings_total", &[("side", "outbound"), ("result", "started")], 1.0);
    relay_a.expect("relay_pairings_total", &[("side", "outbound"), ("result", "succeeded")], 1.0);
    relay_a.expect("relay_pairings_total", &[("side", "outbound"), ("result", "failed")], 0.0);
    relay_a.expect_total("relay_pairings_total", 2.0);
    let pool_size: f64 = WORKERS_A.parse().expect("a number");
    relay_a.expect("relay_active_sessions", &[], pool_size);
    relay_a.expect_total("relay_errors_total", 0.0);
    relay_a.expect_total("relay_retries_total", 0.0);
    relay_a.expect_total("relay_repairs_total", 0.0);
    relay_a.expect("relay_replays_rejected_total", &[], 0.0);
    relay_a.expect("relay_tampered_total", &[], 0.0);
    relay_a.expect_positive("process_resident_memory_bytes", &[]);

    let mut relay_b = MetricCheck::new("B", &b);
    // Five exchanges and the pairing request are inbound, the replay and the tampered copy get
    // 5xx relay statuses, and the client id request and the two /healthz requests are local.
    relay_b.expect("relay_requests_total", &[("role", "inbound"), ("status_class", "2xx")], 6.0);
    relay_b.expect("relay_requests_total", &[("role", "inbound"), ("status_class", "5xx")], 2.0);
    relay_b.expect("relay_requests_total", &[("role", "local"), ("status_class", "2xx")], 3.0);
    relay_b.expect_total("relay_requests_total", 11.0);
    relay_b.expect("relay_request_duration_seconds_count", &[("role", "inbound")], 8.0);
    relay_b.expect("relay_request_duration_seconds_count", &[("role", "local")], 3.0);
    relay_b.expect("relay_upstream_duration_seconds_count", &[], 5.0);
    relay_b.expect("relay_body_bytes_total", &[("role", "inbound"), ("direction", "request")], request_bytes);
    relay_b.expect(
        "relay_body_bytes_total",
        &[("role", "inbound"), ("direction", "response")],
        response_bytes,
    );
    relay_b.expect("relay_body_bytes_total", &[("role", "outbound"), ("direction", "request")], 0.0);
    relay_b.expect("relay_pairings_total", &[("side", "inbound"), ("result", "started")], 1.0);
    relay_b.expect("relay_pairings_total", &[("side", "inbound"), ("result", "succeeded")], 1.0);
    relay_b.expect("relay_pairings_total", &[("side", "inbound"), ("result", "failed")], 0.0);
    relay_b.expect_total("relay_pairings_total", 2.0);
    relay_b.expect("relay_active_sessions", &[], pool_size);
    relay_b.expect("relay_replays_rejected_total", &[], 1.0);
    relay_b.expect("relay_tampered_total", &[], 1.0);
    relay_b.expect("relay_errors_total", &[("code", "replayed")], 1.0);
    relay_b.expect("relay_errors_total", &[("code", "open_failed")], 1.0);
    relay_b.expect_total("relay_errors_total", 2.0);
    relay_b.expect_total("relay_retries_total", 0.0);
    // One save per pair of the pool, one lookup per exchange: five accepted and two rejected.
    relay_b.expect(
        "relay_store_operations_total",
        &[("operation", "save_pair"), ("result", "ok")],
        pool_size,
    );
    relay_b.expect("relay_store_operations_total", &[("operation", "find_pair"), ("result", "ok")], 7.0);
    relay_b.expect_total("relay_store_operations_total", pool_size + 7.0);
    relay_b.expect_positive("process_resident_memory_bytes", &[]);

    assert_metrics_match([relay_a, relay_b]);

    let again = scrape(&client, &pair.a.url()).await;
    let local = [("role", "local"), ("status_class", "2xx")];
    assert_eq!(
        again.value("relay_requests_total", &local),
        a.value("relay_requests_total", &local).map(|count| count + 1.0),
        "the first scrape of relay A must count as one local 2xx request in the second"
    );
}

// Dashboard.

/// One dashboard panel with a query: its title and the PromQL of its targets.
struct Panel {
    title: String,
    exprs: Vec<String>,
}

impl Panel {
    fn metric_names(&self) -> BTreeSet<String> {
        self.exprs.iter().flat_map(|expr| metric_names(expr)).collect()
    }
}

/// Collects every panel with at least one `expr`, including panels nested in rows.
fn collect_panels(value: &Value, panels: &mut Vec<Panel>) {
    match value {
        Value::Object(object) => {
            let exprs: Vec<String> = object
                .get("targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|target| target.get("expr").and_then(Value::as_str).map(str::to_owned))
                .collect();
            if !exprs.is_empty() {
                let title = object.get("title").and_then(Value::as_str).unwrap_or_default().to_owned();
                panels.push(Panel { title, exprs });
            }
            for (key, nested) in object {
                if key != "targets" {
                    collect_panels(nested, panels);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_panels(item, panels)),
        _ => {}
    }
}

/// Collects every `expr` string anywhere in the dashboard, so that no query is missed.
fn collect_exprs(value: &Value, exprs: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (key, nested) in object {
                match (key.as_str(), nested) {
                    ("expr", Value::String(expr)) => exprs.push(expr.clone()),
                    _ => collect_exprs(nested, exprs),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, exprs)),
        _ => {}
    }
}

/// Returns the metric families a PromQL expression names: identifiers outside string literals
/// that start with `relay_` or `process_`, with a histogram's `_bucket`, `_sum` or `_count`
/// suffix removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut identifier = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if let Some(open) = quote {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, c) if c == open => quote = None,
                _ => {}
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            identifier.push(c);
            continue;
        }
        if identifier.starts_with("relay_") || identifier.starts_with("process_") {
            names.insert(histogram_family(&identifier).to_owned());
        }
        identifier.clear();
        if matches!(c, '"' | '\'' | '`') {
            quote = Some(c);
        }
    }
    names
}

fn histogram_family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name)
}

#[tokio::test]
async fn dashboard_queries_name_exported_metrics() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD_PATH);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {DASHBOARD_PATH}: {error}"));
    let dashboard: Value =
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{DASHBOARD_PATH}: {error}"));
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let mut panels = Vec::new();
    collect_panels(&dashboard, &mut panels);
    assert!(!exprs.is_empty(), "{DASHBOARD_PATH} has no queries");
    let used: BTreeSet<String> = exprs.iter().flat_map(|expr| metric_names(expr)).collect();

    let upstream = Upstream::start();
    let pair = RelayPair::start(&upstream.url(), &[]);
    let client = client();
    let response = outbound(&client, &pair.a.url(), &pair.b.url(), Method::POST, "/echo/dashboard")
        .body("dashboard")
        .send()
        .await
        .expect("request through the relays failed");
    assert_eq!(response.status(), 200);

    for (relay, url) in [("A", pair.a.url()), ("B", pair.b.url())] {
        let exported = scrape(&client, &url).await.families;
        let missing: Vec<&String> = used.iter().filter(|name| !exported.contains_key(*name)).collect();
        assert!(
            missing.is_empty(),
            "{DASHBOARD_PATH} queries {missing:?}, which relay {relay} does not export; exported families: {:?}",
            exported.keys().collect::<Vec<_>>()
        );
        // docs/operations.md promises that the dashboard plots every relay metric.
        let unplotted: Vec<&String> =
            exported.keys().filter(|name| name.starts_with("relay_") && !used.contains(*name)).collect();
        assert!(
            unplotted.is_empty(),
            "relay {relay} exports {unplotted:?}, which {DASHBOARD_PATH} does not plot"
        );
    }

    let panel_using = |metric: &str, extra: &dyn Fn(&Panel) -> bool| {
        panels.iter().any(|panel| panel.metric_names().contains(metric) && extra(panel))
    };
    let titles: Vec<&str> = panels.iter().map(|panel| panel.title.as_str()).collect();
    let any = |_: &Panel| true;
    let grouped_by = |label: &'static str| {
        move |panel: &Panel| panel.exprs.iter().any(|expr| expr.contains("by (") && expr.contains(label))
    };
    let percentiles_by_role = |panel: &Panel| {
        panel.exprs.iter().any(|expr| expr.contains("histogram_quantile") && expr.contains("role"))
    };
    assert!(
        panel_using("relay_requests_total", &grouped_by("role")),
        "no traffic panel by role in {titles:?}"
    );
    assert!(panel_using("relay_errors_total", &grouped_by("code")), "no errors-by-code panel in {titles:?}");
    assert!(
        panel_using("relay_request_duration_seconds", &percentiles_by_role),
        "no latency percentile panel per role in {titles:?}"
    );
    assert!(panel_using("relay_pairings_total", &any), "no pairings panel in {titles:?}");
    assert!(panel_using("relay_repairs_total", &any), "no re-pairs panel in {titles:?}");
    assert!(panel_using("relay_replays_rejected_total", &any), "no replays panel in {titles:?}");
    assert!(panel_using("relay_tampered_total", &any), "no tampering panel in {titles:?}");
    assert!(panel_using("process_cpu_seconds_total", &any), "no CPU panel in {titles:?}");
    assert!(panel_using("process_resident_memory_bytes", &any), "no memory panel in {titles:?}");
}

// Logs.

/// Returns the records of `relay` whose message is `request`.
fn request_records(relay: &RelayProcess) -> Vec<Value> {
    relay.log_json().into_iter().filter(|record| record["fields"]["message"] == "request").collect()
}

/// Returns the request records of `relay` for `route`.
fn records_for_route(relay: &RelayProcess, route: &str) -> Vec<Value> {
    request_records(relay).into_iter().filter(|record| record["fields"]["route"] == route).collect()
}

/// Checks the fields every request record carries, whatever the route.
fn check_request_record(relay: &str, record: &Value) {
    let fields = &record["fields"];
    assert_eq!(record["level"], "INFO", "relay {relay}: level of {record}");
    for name in ["method", "route", "role", "request_id"] {
        let value = fields[name].as_str().unwrap_or_default();
        assert!(!value.is_empty(), "relay {relay}: field {name} missing or empty in {record}");
    }
    assert!(fields["status"].as_u64().is_some_and(|status| (100..600).contains(&status)), "{record}");
    assert!(fields["latency_ms"].as_f64().is_some_and(|latency| latency >= 0.0), "{record}");
}

/// Checks the request record of one exchange: route, status, role and its peer and pair.
fn check_exchange_record(relay: &str, record: &Value, role: &str, peer: &str) {
    check_request_record(relay, record);
    let fields = &record["fields"];
    assert_eq!(fields["method"], "POST", "relay {relay}: {record}");
    assert_eq!(fields["status"], 200, "relay {relay}: {record}");
    assert_eq!(fields["role"], role, "relay {relay}: {record}");
    assert_eq!(fields["peer"], peer, "relay {relay}: {record}");
    let pair = fields["pair"].as_str().unwrap_or_default();
    assert!(
        pair.len() == 8 && pair.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "relay {relay}: pair must be 8 hex digits in {record}"
    );
}

/// Splits request records into those with status 200 and the others.
fn split_by_status(records: Vec<Value>) -> (Vec<Value>, Vec<Value>) {
    records.into_iter().partition(|record| record["fields"]["status"] == 200)
}

/// Returns the `pair` fields of `records`.
fn pairs_of(records: &[Value]) -> BTreeSet<String> {
    records.iter().filter_map(|record| record["fields"]["pair"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn logs_contain_no_secrets() {
    let psk = random_secret("psk");
    let (secret_a, token_a) = (random_secret("client-id-secret-a"), random_secret("outbound-token-a"));
    let (secret_b, token_b) = (random_secret("client-id-secret-b"), random_secret("outbound-token-b"));
    let env_a = [
        ("DEBUG", "true"),
        ("PAIRING_PSK", psk.as_str()),
        ("CLIENT_ID_SECRET", secret_a.as_str()),
        ("OUTBOUND_TOKEN", token_a.as_str()),
    ];
    let env_b = [
        ("DEBUG", "true"),
        ("PAIRING_PSK", psk.as_str()),
        ("CLIENT_ID_SECRET", secret_b.as_str()),
        ("OUTBOUND_TOKEN", token_b.as_str()),
    ];
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &env_a, &env_b);
    let recorder = TcpRecorder::start(&pair.b.url());
    let client = client();
    let mut markers = Vec::new();

    for encode_type in ["MKE", "MTE"] {
        let path = marker("path");
        let query = marker("query");
        let header_value = marker("value");
        let authorization = marker("bearer");
        let cookie = marker("cookie");
        let body_marker = marker("body");
        let target = format!("/echo/{path}?q={query}");
        let request_body = format!("{{\"card\":\"{body_marker}\"}}");
        let response =
            outbound_with_token(&client, &pair.a.url(), &recorder.url(), &token_a, Method::POST, &target)
                .header("x-mte-encode-type", encode_type)
                .header("x-private", &header_value)
                .header("authorization", format!("Bearer {authorization}"))
                .header("cookie", format!("session={cookie}"))
                .body(request_body.clone())
                .send()
                .await
                .expect("request through the relays failed");
        let status = response.status();
        let body = response.text().await.expect("reading the response failed");
        assert_eq!(status, 200, "{encode_type}: {body}");
        for sent in [&path, &query, &header_value, &authorization, &cookie] {
            assert!(
                body.contains(sent.as_str()),
                "{encode_type}: the upstream did not receive {sent}: {body}"
            );
        }
        let echo: Value = serde_json::from_str(&body).expect("the /echo response is JSON");
        assert_eq!(echo["body_sha256"], common::sha256_hex(request_body.as_bytes()), "{encode_type}: body");
        markers.extend([path, query, header_value, authorization, cookie, body_marker]);
    }
    upstream.wait_for_requests(2, RECORD_WAIT);

    let exchanges = recorded_exchanges(&recorder);
    assert_eq!(exchanges.len(), 2, "expected one sealed exchange per request");
    let mut sealed = Vec::new();
    for exchange in &exchanges {
        let block = String::from_utf8(exchange.header(RELAY_EH_HEADER).unwrap().to_vec()).unwrap();
        let url = exchange.target().trim_start_matches('/').to_owned();
        assert!(url.len() >= 22, "sealed URL {url:?} is shorter than an AES-GCM tag in base64url");
        sealed.extend([block, url]);
    }

    // Rejections log warnings, so a replay, a tampered copy and a wrong token check that those
    // records leak nothing either. A wrong token may be a typo of the real one.
    let replayed = send_exchange_bytes(&pair.b.addr(), &exchanges[0].bytes).await;
    assert_eq!(replayed, 563, "status of the replayed exchange");
    let tampered = send_exchange_bytes(&pair.b.addr(), &with_header_block_changed(&exchanges[1])).await;
    assert_eq!(tampered, 562, "status of the tampered exchange");
    let wrong_token = marker("wrong-token");
    let rejected =
        outbound_with_token(&client, &pair.a.url(), &recorder.url(), &wrong_token, Method::GET, "/echo")
            .send()
            .await
            .expect("request to relay A failed");
    assert_eq!(rejected.status(), 401);
    markers.push(wrong_token);

    // Relay A serves the three requests above. Relay B serves what passed the recorder (client
    // id, pairing and two exchanges) and, sent directly, two exchanges and two /healthz requests.
    let relayed = recorded_requests(&recorder).len();
    let served_by_b = relayed + 4;
    let all_logged = || request_records(&pair.a).len() >= 3 && request_records(&pair.b).len() >= served_by_b;
    assert!(
        wait_until(LOG_WAIT, all_logged),
        "request records missing\n{}\n{}",
        pair.a.output_report(),
        pair.b.output_report()
    );

    // No secret, marker or sealed value in any output line of either relay. Sealed values are
    // checked by their first 32 characters, so a shortened copy is found too.
    let mut forbidden: Vec<(String, String)> = vec![
        ("PAIRING_PSK".to_owned(), psk.clone()),
        ("CLIENT_ID_SECRET of A".to_owned(), secret_a.clone()),
        ("OUTBOUND_TOKEN of A".to_owned(), token_a.clone()),
        ("CLIENT_ID_SECRET of B".to_owned(), secret_b.clone()),
        ("OUTBOUND_TOKEN of B".to_owned(), token_b.clone()),
    ];
    forbidden.extend(markers.iter().map(|marker| ("marker".to_owned(), marker.clone())));
    forbidden
        .extend(sealed.iter().map(|value| ("sealed value".to_owned(), value.chars().take(32).collect())));
    let mut leaks = Vec::new();
    for (name, relay) in [("A", &pair.a), ("B", &pair.b)] {
        for line in relay.log_lines().iter().chain(relay.stderr_lines().iter()) {
            for (label, value) in &forbidden {
                if line.contains(value.as_str()) {
                    leaks.push(format!("relay {name} logged a {label} ({value}): {line}"));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets in the logs:\n{}", leaks.join("\n"));

    for (name, relay) in [("A", &pair.a), ("B", &pair.b)] {
        let lines = relay.log_lines();
        let invalid: Vec<&String> =
            lines.iter().filter(|line| serde_json::from_str::<Value>(line).is_err()).collect();
        assert!(invalid.is_empty(), "relay {name}: stdout lines that are not JSON: {invalid:?}");
        let records = request_records(relay);
        records.iter().for_each(|record| check_request_record(name, record));
        let ids: BTreeSet<&str> =
            records.iter().filter_map(|record| record["fields"]["request_id"].as_str()).collect();
        assert_eq!(ids.len(), records.len(), "relay {name}: request ids must be unique: {records:?}");
        let debug = relay.log_json().into_iter().filter(|record| record["level"] == "DEBUG").count();
        assert!(debug > 0, "relay {name} wrote no debug record with DEBUG=true\n{}", relay.output_report());
    }

    let (outbound_records, unauthorized) = split_by_status(request_records(&pair.a));
    assert_eq!(outbound_records.len(), 2, "relay A: one request record per exchange: {outbound_records:?}");
    let peer = format!("http://{}", recorder.addr());
    for record in &outbound_records {
        assert_eq!(record["fields"]["route"], EXCHANGE_ROUTE, "{record}");
        check_exchange_record("A", record, "outbound", &peer);
    }
    let statuses: Vec<&Value> = unauthorized.iter().map(|record| &record["fields"]["status"]).collect();
    assert_eq!(statuses, [401], "relay A: one record for the wrong token: {unauthorized:?}");
    assert_eq!(unauthorized[0]["fields"]["role"], "outbound", "{}", unauthorized[0]);

    let (inbound_records, rejected) = split_by_status(records_for_route(&pair.b, EXCHANGE_ROUTE));
    assert_eq!(inbound_records.len(), 2, "relay B: one request record per exchange: {inbound_records:?}");
    for record in &inbound_records {
        check_exchange_record("B", record, "inbound", "127.0.0.1");
    }
    assert_eq!(pairs_of(&outbound_records), pairs_of(&inbound_records), "both relays name the same pairs");
    let mut statuses: Vec<u64> =
        rejected.iter().filter_map(|record| record["fields"]["status"].as_u64()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [562, 563], "relay B: one record per rejected exchange: {rejected:?}");
    assert_eq!(pairs_of(&rejected), pairs_of(&inbound_records), "rejected records name their pairs");
    let pairing = records_for_route(&pair.b, "/api/mte-pair");
    assert_eq!(pairing.len(), 1, "relay B: one record for the pairing request: {pairing:?}");
    assert_eq!(pairing[0]["fields"]["role"], "inbound");
    assert_eq!(pairing[0]["fields"]["status"], 200);
    let client_id = records_for_route(&pair.b, "/api/mte-relay");
    assert_eq!(client_id.len(), 1, "relay B: one record for the client id request: {client_id:?}");
    assert_eq!(client_id[0]["fields"]["method"], "HEAD");
    assert_eq!(records_for_route(&pair.b, "/healthz").len(), 2, "relay B: one record per /healthz request");
    assert_eq!(
        request_records(&pair.b).len(),
        served_by_b,
        "relay B: one request record per request it served"
    );

    let messages = |relay: &RelayProcess| -> Vec<String> {
        relay
            .log_json()
            .iter()
            .filter(|record| record["level"] == "DEBUG")
            .filter_map(|record| record["fields"]["message"].as_str().map(str::to_owned))
            .collect()
    };
    let debug_a = messages(&pair.a);
    let debug_b = messages(&pair.b);
    assert!(
        debug_a.iter().any(|message| message == "outbound exchange sealed"),
        "relay A debug records: {debug_a:?}"
    );
    assert!(
        debug_b.iter().any(|message| message == "inbound exchange accepted"),
        "relay B debug records: {debug_b:?}"
    );
}

#[tokio::test]
async fn request_log_off_keeps_warnings_and_metrics() {
    let quiet = [("REQUEST_LOG", "false")];
    let upstream = Upstream::start();
    let pair = RelayPair::start_with(&upstream.url(), &quiet, &quiet);
    let client = client();

    let response = outbound(&client, &pair.a.url(), &pair.b.url(), Method::POST, "/sink")
        .body("counted, not logged")
        .send()
        .await
        .expect("request through the relays failed");
    assert_eq!(response.status(), 200);
    let wrong_token =
        outbound_with_token(&client, &pair.a.url(), &pair.b.url(), "wrong-token", Method::POST, "/sink")
            .send()
            .await
            .expect("request to relay A failed");
    assert_eq!(wrong_token.status(), 401);

    let warning =
        pair.a.wait_for_log(LOG_WAIT, |line| line.contains("invalid or missing x-mte-outbound-token"));
    assert!(warning.is_some(), "relay A logged no warning for the wrong token:\n{}", pair.a.output_report());
    let a = scrape(&client, &pair.a.url()).await;
    let b = scrape(&client, &pair.b.url()).await;
    let mut relay_a = MetricCheck::new("A", &a);
    relay_a.expect("relay_requests_total", &[("role", "outbound"), ("status_class", "2xx")], 1.0);
    relay_a.expect("relay_requests_total", &[("role", "outbound"), ("status_class", "4xx")], 1.0);
    let mut relay_b = MetricCheck::new("B", &b);
    // The pairing request and the exchange.
    relay_b.expect("relay_requests_total", &[("role", "inbound"), ("status_class", "2xx")], 2.0);
    assert_metrics_match([relay_a, relay_b]);

    // The writer sends records within 10 ms, so a request record would have followed the warning.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (name, relay) in [("A", &pair.a), ("B", &pair.b)] {
        let records = request_records(relay);
        assert!(records.is_empty(), "relay {name} wrote request records with REQUEST_LOG=false: {records:?}");
    }
}

// Shutdown.

/// Returns whether a TCP connection to `addr` fails within 500 ms.
fn connection_fails(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_in_flight_requests_finish() {
    const SLOW_MS: u64 = 2000;
    let upstream = Upstream::start();
    let mut pair = RelayPair::start_with(&upstream.url(), &[("SHUTDOWN_GRACE_SECS", "10")], &[]);
    let address: SocketAddr = pair.a.addr().parse().expect("relay A address");

    // The client lives until relay A has exited, so its connections stay open and idle once the
    // responses are read, as a load balancer's would. They must not hold up the exit.
    let client = client();
    let requests: Vec<_> = (0..3)
        .map(|index| {
            let request = outbound(
                &client,
                &pair.a.url(),
                &pair.b.url(),
                Method::GET,
                &format!("/slow?ms={SLOW_MS}&n={index}"),
            );
            tokio::spawn(async move {
                let response =
                    request.send().await.unwrap_or_else(|error| panic!("request {index}: {error}"));
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_else(|error| panic!("body {index}: {error}"));
                (index, status, body)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(upstream.wait_for_requests(3, RECORD_WAIT).len(), 3, "all three requests must be in flight");
    assert!(requests.iter().all(|request| !request.is_finished()), "a request finished before SIGTERM");
    assert!(!connection_fails(address), "relay A must accept connections before SIGTERM");

    pair.a.terminate();
    let terminated = Instant::now();
    let draining = pair.a.wait_for_log(LOG_WAIT, |line| line.contains("draining"));
    assert!(draining.is_some(), "relay A logged no draining record\n{}", pair.a.output_report());
    assert!(
        wait_until(Duration::from_secs(2), || connection_fails(address)),
        "relay A still accepts connections after it started draining"
    );

    for request in requests {
        let (index, status, body) = request.await.expect("request task panicked");
        assert_eq!(status, 200, "in-flight request {index}: {body}");
        assert_eq!(body, "slow", "in-flight request {index}");
    }
    let finished = Instant::now();
    let exit = pair.a.wait_exit(Duration::from_secs(5));
    let exited_after = terminated.elapsed();
    let status = exit.unwrap_or_else(|| {
        panic!(
            "relay A still runs 5 s after its last request finished, {:?} after SIGTERM\n{}",
            finished.duration_since(terminated),
            pair.a.output_report()
        )
    });
    assert!(
        status.success(),
        "relay A exited with {status} after {exited_after:?}\n{}",
        pair.a.output_report()
    );

    let stopped = pair.a.log_json().iter().any(|record| record["fields"]["message"] == "stopped");
    assert!(stopped, "relay A logged no stopped record\n{}", pair.a.output_report());
    let record: Value = serde_json::from_str(&draining.unwrap()).expect("the draining record is JSON");
    assert_eq!(record["fields"]["signal"], "SIGTERM", "{record}");
    assert_eq!(record["fields"]["grace_secs"], 10, "{record}");
    assert!(pair.b.is_running(), "relay B must keep running");
    drop(client);
}

#[test]
fn sigterm_exits_promptly_when_idle() {
    let mut relay = relay_builder("http://127.0.0.1:9").spawn();

    // Sent right after the listening record, so the signal handlers must exist by then.
    relay.terminate();
    let status = relay.wait_exit(Duration::from_secs(2));

    let status = status
        .unwrap_or_else(|| panic!("idle relay still runs 2 s after SIGTERM\n{}", relay.output_report()));
    assert!(status.success(), "idle relay exited with {status}\n{}", relay.output_report());
}

// Health and readiness.

#[tokio::test]
async fn readyz_reports_ready_and_healthz_alive() {
    let relay = relay_builder("http://127.0.0.1:9").spawn();
    let client = client();

    let health = client.get(format!("{}/healthz", relay.url())).send().await.expect("GET /healthz failed");
    assert_eq!(health.status(), 200);
    let health: Value =
        serde_json::from_slice(&health.bytes().await.unwrap()).expect("the /healthz body is JSON");
    assert_eq!(health["status"], "ok", "{health}");

    let ready = client.get(format!("{}/readyz", relay.url())).send().await.expect("GET /readyz failed");
    assert_eq!(ready.status(), 200);
    let ready: Value =
        serde_json::from_slice(&ready.bytes().await.unwrap()).expect("the /readyz body is JSON");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["listener"], true, "{ready}");
    assert_eq!(ready["store"], "memory", "{ready}");
    assert_eq!(ready["storeReachable"], true, "{ready}");
}
