//! `RelayMetrics`: the Prometheus metrics of one relay, registered on a registry passed in, so
//! tests render their own relay's counters. Labels are low-cardinality: never a pair id, client
//! id or URL. docs/operations.md lists every metric with its meaning.

use std::time::Duration;

use actix_web::HttpRequest;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::error::RelayCode;
use crate::server::Role;

pub const REQUESTS_TOTAL: &str = "relay_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "relay_request_duration_seconds";
pub const UPSTREAM_DURATION_SECONDS: &str = "relay_upstream_duration_seconds";
pub const BODY_BYTES_TOTAL: &str = "relay_body_bytes_total";
pub const RELAY_ERRORS_TOTAL: &str = "relay_errors_total";
pub const RETRIES_TOTAL: &str = "relay_retries_total";
pub const REPAIRS_TOTAL: &str = "relay_repairs_total";
pub const PAIRINGS_TOTAL: &str = "relay_pairings_total";
pub const ACTIVE_SESSIONS: &str = "relay_active_sessions";
pub const REPLAYS_REJECTED_TOTAL: &str = "relay_replays_rejected_total";
pub const TAMPERED_TOTAL: &str = "relay_tampered_total";
pub const STORE_OPERATIONS_TOTAL: &str = "relay_store_operations_total";
pub const STORE_REACHABLE: &str = "relay_store_reachable";
pub const STORE_RECOVERIES_TOTAL: &str = "relay_store_recoveries_total";
pub const STORE_GIVE_UPS_TOTAL: &str = "relay_store_give_ups_total";

/// Latency buckets in seconds, from a local exchange (about 100 µs) to the default timeout.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// State store operations counted in `relay_store_operations_total`.
#[derive(Debug, Clone, Copy)]
pub enum StoreOperation {
    /// Relay B looking up the pair of an exchange.
    FindPair,
    /// Relay B storing one pair of a pairing request.
    SavePair,
}

impl StoreOperation {
    const ALL: [StoreOperation; 2] = [StoreOperation::FindPair, StoreOperation::SavePair];

    fn as_str(self) -> &'static str {
        match self {
            StoreOperation::FindPair => "find_pair",
            StoreOperation::SavePair => "save_pair",
        }
    }
}

/// Which body of an exchange bytes belong to.
#[derive(Debug, Clone, Copy)]
pub enum BodyDirection {
    Request,
    Response,
}

/// Every metric the relay exports.
pub struct RelayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    body_bytes: IntCounterVec,
    relay_errors: IntCounterVec,
    retries: IntCounterVec,
    repairs: IntCounterVec,
    pairings: IntCounterVec,
    active_sessions: IntGauge,
    replays_rejected: IntCounter,
    tampered: IntCounter,
    store_operations: IntCounterVec,
    store_reachable: IntGauge,
    store_recoveries: IntCounter,
    store_give_ups: IntCounter,
    /// Supervisor counts already added to the two counters above.
    store_seen: std::sync::Mutex<(u64, u64)>,
    hot: HotSeries,
}

/// Status classes of `relay_requests_total`, in the order [`status_class`] numbers them.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const ROLES: [Role; 3] = [Role::Outbound, Role::Inbound, Role::Local];
const DIRECTIONS: [BodyDirection; 2] = [BodyDirection::Request, BodyDirection::Response];
/// Results of `relay_store_operations_total`, in the order `HotSeries` keeps them.
const STORE_RESULTS: [&str; 2] = ["ok", "failed"];

/// The series every request updates, looked up once at start-up, because a lookup by label
/// values hashes the values and takes a lock each time.
struct HotSeries {
    /// By role, then status class.
    requests: [[IntCounter; 5]; 3],
    /// By role.
    request_duration: [Histogram; 3],
    upstream_duration: Histogram,
    /// By role (outbound, inbound), then direction.
    body_bytes: [[IntCounter; 2]; 2],
    /// By operation, then result (ok, failed).
    store_operations: [[IntCounter; 2]; 2],
}

impl HotSeries {
    fn new(
        requests: &IntCounterVec,
        request_duration: &HistogramVec,
        upstream_duration: &HistogramVec,
        body_bytes: &IntCounterVec,
        store_operations: &IntCounterVec,
    ) -> Self {
        Self {
            requests: ROLES
                .map(|role| STATUS_CLASSES.map(|class| requests.with_label_values(&[role.as_str(), class]))),
            request_duration: ROLES.map(|role| request_duration.with_label_values(&[role.as_str()])),
            upstream_duration: upstream_duration.with_label_values::<&str>(&[]),
            body_bytes: [Role::Outbound, Role::Inbound].map(|role| {
                DIRECTIONS.map(|direction| body_bytes.with_label_values(&[role.as_str(), direction.as_str()]))
            }),
            store_operations: StoreOperation::ALL.map(|operation| {
                STORE_RESULTS.map(|result| store_operations.with_label_values(&[operation.as_str(), result]))
            }),
        }
    }
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Outbound => 0,
        Role::Inbound => 1,
        Role::Local => 2,
    }
}

/// Index of `status`'s class in [`STATUS_CLASSES`].
fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

impl BodyDirection {
    fn as_str(self) -> &'static str {
        match self {
            BodyDirection::Request => "request",
            BodyDirection::Response => "response",
        }
    }
}

impl RelayMetrics {
    /// Creates the metrics and registers them, plus the process metrics (CPU, memory, open file
    /// descriptors), on `registry`.
    ///
    /// # Errors
    /// When a metric is registered twice on the same registry.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
        };
        let requests =
            counter(REQUESTS_TOTAL, "Requests served, by role and status class.", &["role", "status_class"])?;
        let request_duration = histogram(
            REQUEST_DURATION_SECONDS,
            "Time until the response head was ready, by role.",
            &["role"],
        )?;
        let upstream_duration = histogram(
            UPSTREAM_DURATION_SECONDS,
            "Time the upstream API took to return its response head to relay B.",
            &[],
        )?;
        let body_bytes = counter(
            BODY_BYTES_TOTAL,
            "Plaintext body bytes sealed or opened, by role and direction (request, response).",
            &["role", "direction"],
        )?;
        let store_operations = counter(
            STORE_OPERATIONS_TOTAL,
            "State store operations by operation and result (ok, failed).",
            &["operation", "result"],
        )?;
        let hot =
            HotSeries::new(&requests, &request_duration, &upstream_duration, &body_bytes, &store_operations);
        let metrics = Self {
            requests,
            request_duration,
            upstream_duration,
            body_bytes,
            relay_errors: counter(
                RELAY_ERRORS_TOTAL,
                "Relay errors (559-569) sent by relay B or received by relay A, by code name.",
                &["code"],
            )?,
            retries: counter(
                RETRIES_TOTAL,
                "Exchanges relay A sent again after pairing again, by reason.",
                &["reason"],
            )?,
            repairs: counter(
                REPAIRS_TOTAL,
                "Pair pools relay A dropped to pair again, by reason.",
                &["reason"],
            )?,
            pairings: counter(
                PAIRINGS_TOTAL,
                "Pairings by side (outbound: relay A asking, inbound: relay B answering) and result.",
                &["side", "result"],
            )?,
            active_sessions: IntGauge::new(ACTIVE_SESSIONS, "Pair sessions held in memory.")?,
            replays_rejected: IntCounter::new(
                REPLAYS_REJECTED_TOTAL,
                "Exchanges relay B rejected because their seq was seen before or is older than the window.",
            )?,
            tampered: IntCounter::new(
                TAMPERED_TOTAL,
                "Sealed items or body framing that failed authentication or parsing (562, 565).",
            )?,
            store_operations,
            store_reachable: IntGauge::new(
                STORE_REACHABLE,
                "1 while the state store responds, 0 while it does not.",
            )?,
            store_recoveries: IntCounter::new(
                STORE_RECOVERIES_TOTAL,
                "Times the state store responded again after failed health probes.",
            )?,
            store_give_ups: IntCounter::new(
                STORE_GIVE_UPS_TOTAL,
                "Times the state store supervisor gave up reconnecting and was restarted.",
            )?,
            store_seen: std::sync::Mutex::new((0, 0)),
            hot,
            registry,
        };
        metrics.register_all()?;
        metrics.initialize_known_series();
        Ok(metrics)
    }

    /// Creates every series whose label values are known in advance at 0, so each family is
    /// exported from start-up. Without this, a dashboard query for a family that has not moved
    /// yet returns no data, and `rate` or `increase` misses the first event of a series.
    fn initialize_known_series(&self) {
        // Request counts, durations, body bytes and store operations exist already, because
        // `HotSeries` created them.
        for (code, _) in RelayCode::ALL {
            self.relay_errors.with_label_values(&[code.name()]);
        }
        // The codes after which relay A drops its pairs and retries (see outbound::relay_exchange).
        for code in [RelayCode::StateNotFound, RelayCode::PairExpired, RelayCode::InvalidClientId] {
            self.retries.with_label_values(&[code.name()]);
            self.repairs.with_label_values(&[code.name()]);
        }
        for side in ["outbound", "inbound"] {
            for result in ["started", "succeeded", "failed"] {
                self.pairings.with_label_values(&[side, result]);
            }
        }
    }

    fn register_all(&self) -> prometheus::Result<()> {
        let registry = &self.registry;
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.request_duration.clone()))?;
        registry.register(Box::new(self.upstream_duration.clone()))?;
        registry.register(Box::new(self.body_bytes.clone()))?;
        registry.register(Box::new(self.relay_errors.clone()))?;
        registry.register(Box::new(self.retries.clone()))?;
        registry.register(Box::new(self.repairs.clone()))?;
        registry.register(Box::new(self.pairings.clone()))?;
        registry.register(Box::new(self.active_sessions.clone()))?;
        registry.register(Box::new(self.replays_rejected.clone()))?;
        registry.register(Box::new(self.tampered.clone()))?;
        registry.register(Box::new(self.store_operations.clone()))?;
        registry.register(Box::new(self.store_reachable.clone()))?;
        registry.register(Box::new(self.store_recoveries.clone()))?;
        registry.register(Box::new(self.store_give_ups.clone()))?;
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
    }

    /// Marks the request with its role, for the request log and the request counters.
    pub fn role(&self, request: &HttpRequest, role: Role) {
        crate::telemetry::mark_role(request, role);
    }

    pub fn request_done(&self, role: Role, status: u16, elapsed: Duration) {
        let role = role_index(role);
        self.hot.requests[role][status_class(status)].inc();
        self.hot.request_duration[role].observe(elapsed.as_secs_f64());
    }

    pub fn upstream_duration(&self, elapsed: Duration) {
        self.hot.upstream_duration.observe(elapsed.as_secs_f64());
    }

    /// The counter of plaintext body bytes for one role and direction, to update while streaming.
    pub fn body_bytes(&self, role: Role, direction: BodyDirection) -> IntCounter {
        let index = match direction {
            BodyDirection::Request => 0,
            BodyDirection::Response => 1,
        };
        match role {
            Role::Outbound => self.hot.body_bytes[0][index].clone(),
            Role::Inbound => self.hot.body_bytes[1][index].clone(),
            Role::Local => self.body_bytes.with_label_values(&[role.as_str(), direction.as_str()]),
        }
    }

    /// Counts a relay error, and a rejected replay or a tampered message where the code says so.
    pub fn relay_error(&self, code: RelayCode) {
        self.relay_errors.with_label_values(&[code.name()]).inc();
    }

    /// Counts a relay error that relay B detected itself.
    pub fn rejected(&self, code: RelayCode) {
        self.relay_error(code);
        match code {
            RelayCode::Replayed => self.replays_rejected.inc(),
            RelayCode::OpenFailed | RelayCode::MalformedBody => self.tampered.inc(),
            _ => {}
        }
    }

    pub fn retry(&self, reason: RelayCode) {
        self.retries.with_label_values(&[reason.name()]).inc();
    }

    pub fn repair(&self, reason: RelayCode) {
        self.repairs.with_label_values(&[reason.name()]).inc();
    }

    /// Counts a pairing step: `side` is `outbound` or `inbound`, `result` is `started`,
    /// `succeeded` or `failed`.
    pub fn pairing(&self, side: &str, result: &str) {
        self.pairings.with_label_values(&[side, result]).inc();
    }

    pub fn store_operation(&self, operation: StoreOperation, ok: bool) {
        self.hot.store_operations[operation as usize][usize::from(!ok)].inc();
    }

    /// Copies the state store supervisor's health into the store metrics. A store without a
    /// supervisor (the in-memory store) is always reachable.
    pub fn observe_store(&self, health: Option<&api_relay_actors::StoreHealth>) {
        let Some(health) = health else {
            self.store_reachable.set(1);
            return;
        };
        self.store_reachable.set(i64::from(health.is_reachable()));
        let mut seen = self.store_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (recoveries, give_ups) = (health.recoveries(), health.give_ups());
        self.store_recoveries.inc_by(recoveries.saturating_sub(seen.0));
        self.store_give_ups.inc_by(give_ups.saturating_sub(seen.1));
        *seen = (recoveries.max(seen.0), give_ups.max(seen.1));
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self, active_sessions: usize) -> String {
        self.active_sessions.set(i64::try_from(active_sessions).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "could not encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Families with labels, which must be exported before anything is counted.
    const LABELLED_FAMILIES: [&str; 9] = [
        REQUESTS_TOTAL,
        REQUEST_DURATION_SECONDS,
        UPSTREAM_DURATION_SECONDS,
        BODY_BYTES_TOTAL,
        RELAY_ERRORS_TOTAL,
        RETRIES_TOTAL,
        REPAIRS_TOTAL,
        PAIRINGS_TOTAL,
        STORE_OPERATIONS_TOTAL,
    ];

    #[test]
    fn rendering_names_every_family() {
        let metrics = RelayMetrics::new(Registry::new()).unwrap();
        metrics.request_done(Role::Outbound, 200, Duration::from_millis(3));
        metrics.upstream_duration(Duration::from_millis(1));
        metrics.body_bytes(Role::Inbound, BodyDirection::Request).inc_by(10);
        metrics.rejected(RelayCode::Replayed);
        metrics.rejected(RelayCode::OpenFailed);
        metrics.retry(RelayCode::StateNotFound);
        metrics.repair(RelayCode::StateNotFound);
        metrics.pairing("outbound", "started");
        metrics.store_operation(StoreOperation::SavePair, true);
        metrics.store_operation(StoreOperation::FindPair, false);
        let text = metrics.render(3);
        let others =
            [ACTIVE_SESSIONS, REPLAYS_REJECTED_TOTAL, TAMPERED_TOTAL, "process_resident_memory_bytes"];
        for name in LABELLED_FAMILIES.into_iter().chain(others) {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains("relay_active_sessions 3"), "{text}");
        for (series, value) in [
            (r#"relay_store_operations_total{operation="save_pair",result="ok"}"#, 1),
            (r#"relay_store_operations_total{operation="save_pair",result="failed"}"#, 0),
            (r#"relay_store_operations_total{operation="find_pair",result="failed"}"#, 1),
            (r#"relay_store_operations_total{operation="find_pair",result="ok"}"#, 0),
        ] {
            assert!(text.contains(&format!("{series} {value}\n")), "{series} is not {value} in:\n{text}");
        }
    }

    #[test]
    fn fresh_metrics_export_every_family_at_zero() {
        let metrics = RelayMetrics::new(Registry::new()).unwrap();
        let text = metrics.render(0);
        for family in LABELLED_FAMILIES {
            assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing from:\n{text}");
        }
        assert!(text.contains("relay_retries_total{reason=\"state_not_found\"} 0"), "{text}");
        assert!(text.contains("relay_upstream_duration_seconds_count 0"), "{text}");
    }
}
