//! `RelayMetrics`: the Prometheus metrics of one relay, registered on a registry passed in, so
//! tests render their own relay's counters. Labels are low-cardinality: never a pair id, client
//! id or URL.

use std::time::Duration;

use actix_web::HttpMessage;
use actix_web::HttpRequest;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::error::RelayCode;
use crate::server::Role;

pub const REQUESTS_TOTAL: &str = "relay_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "relay_request_duration_seconds";
pub const UPSTREAM_DURATION_SECONDS: &str = "relay_upstream_duration_seconds";
pub const RELAY_ERRORS_TOTAL: &str = "relay_errors_total";
pub const RETRIES_TOTAL: &str = "relay_retries_total";
pub const PAIRINGS_TOTAL: &str = "relay_pairings_total";
pub const ACTIVE_SESSIONS: &str = "relay_active_sessions";

/// Latency buckets in seconds, from a local exchange (about 100 µs) to the default timeout.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// Every metric the relay exports.
pub struct RelayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    relay_errors: IntCounterVec,
    retries: IntCounterVec,
    pairings: IntCounterVec,
    active_sessions: IntGauge,
}

impl RelayMetrics {
    /// Creates the metrics and registers them on `registry`.
    ///
    /// # Errors
    /// When a metric is registered twice on the same registry.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
        };
        let metrics = Self {
            requests: counter(
                REQUESTS_TOTAL,
                "Requests served, by role and status class.",
                &["role", "status_class"],
            )?,
            request_duration: histogram(
                REQUEST_DURATION_SECONDS,
                "Time to answer a request, by role.",
                &["role"],
            )?,
            upstream_duration: histogram(
                UPSTREAM_DURATION_SECONDS,
                "Time the upstream API took to answer relay B.",
                &["role"],
            )?,
            relay_errors: counter(
                RELAY_ERRORS_TOTAL,
                "Relay errors (559-569) sent or received, by code name.",
                &["code"],
            )?,
            retries: counter(
                RETRIES_TOTAL,
                "Exchanges retried after pairing again, by reason.",
                &["reason"],
            )?,
            pairings: counter(PAIRINGS_TOTAL, "Pairing requests answered, by result.", &["result"])?,
            active_sessions: IntGauge::new(ACTIVE_SESSIONS, "Pair sessions held in memory.")?,
            registry,
        };
        metrics.registry.register(Box::new(metrics.requests.clone()))?;
        metrics.registry.register(Box::new(metrics.request_duration.clone()))?;
        metrics.registry.register(Box::new(metrics.upstream_duration.clone()))?;
        metrics.registry.register(Box::new(metrics.relay_errors.clone()))?;
        metrics.registry.register(Box::new(metrics.retries.clone()))?;
        metrics.registry.register(Box::new(metrics.pairings.clone()))?;
        metrics.registry.register(Box::new(metrics.active_sessions.clone()))?;
        Ok(metrics)
    }

    /// Marks the request with its role, for the request log and the request counters.
    pub fn role(&self, request: &HttpRequest, role: Role) {
        request.extensions_mut().insert(role);
    }

    pub fn request_done(&self, role: Role, status: u16, elapsed: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests.with_label_values(&[role.as_str(), class]).inc();
        self.request_duration.with_label_values(&[role.as_str()]).observe(elapsed.as_secs_f64());
    }

    pub fn upstream_duration(&self, elapsed: Duration) {
        self.upstream_duration.with_label_values(&["inbound"]).observe(elapsed.as_secs_f64());
    }

    pub fn relay_error(&self, code: RelayCode) {
        self.relay_errors.with_label_values(&[code.name()]).inc();
    }

    pub fn retry(&self, reason: RelayCode) {
        self.retries.with_label_values(&[reason.name()]).inc();
    }

    pub fn pairing(&self, result: &str) {
        self.pairings.with_label_values(&[result]).inc();
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self, active_sessions: usize) -> String {
        self.active_sessions.set(active_sessions as i64);
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "could not encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
