//! Logging: JSON lines on stdout by default (log drivers such as CloudWatch's read stdout), or
//! human-readable with `LOG_FORMAT=pretty`; `DEBUG=true` adds per-exchange debug records.
//!
//! `RequestLog` writes one record when a request ends, unless `REQUEST_LOG=false`: method, route
//! template (`*` for a relayed exchange), status, latency, role and request id. It records no
//! URL, header value or body, so nothing sealed ever reaches a log. It gives tracing-actix-web a
//! span per request only when debug records are on, to tie them to their request.

mod json;
mod writer;

use std::cell::RefCell;
use std::io::{IsTerminal, Write as _};
use std::sync::OnceLock;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{Error, HttpMessage};
use api_relay_protocol::ShortPairId;
use tracing::Span;
use tracing_actix_web::{RequestId, RootSpanBuilder};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use self::writer::WriterGuard;
use crate::config::LogFormat;
use crate::server::{RelayState, Role};

/// Installs the global subscriber. Keep the returned guard until the process ends: dropping it
/// flushes the records still queued.
pub fn init(format: LogFormat, debug: bool) -> WriterGuard {
    init_at(format, if debug { "debug" } else { "info" })
}

/// Installs the global subscriber with `level` (`error`, `warn`, `info` or `debug`) as the floor.
///
/// Records go to stdout in batches from a writer thread (see `writer`), so request handlers do
/// not wait for stdout. Logging blocks only when stdout falls 8 MiB behind, because no record
/// is dropped.
pub fn init_at(format: LogFormat, level: &str) -> WriterGuard {
    // A fixed per-target filter: cheaper per record than `EnvFilter`, which also tracks span
    // fields for directives this relay never uses.
    let level = level.parse::<LevelFilter>().unwrap_or(LevelFilter::INFO);
    let filter = Targets::new().with_default(level).with_targets(
        ["actix_server", "actix_http", "awc", "h2", "rustls"].map(|target| (target, LevelFilter::WARN)),
    );
    let (writer, guard) = writer::spawn(std::io::stdout());
    let layer = tracing_subscriber::fmt::layer().with_writer(writer.clone());
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests or the demo starting twice) keeps the first subscriber.
    let installed = match format {
        LogFormat::Json => registry.with(layer.event_format(json::JsonLines)).try_init(),
        LogFormat::Pretty => {
            registry.with(layer.pretty().with_ansi(std::io::stdout().is_terminal())).try_init()
        }
    };
    if installed.is_ok() && format == LogFormat::Json {
        let _ = JSON_RECORDS.set(writer);
    }
    guard
}

/// The output of the installed subscriber when it writes JSON lines. Request records go there
/// directly, in the same format (see `RequestLog::on_request_end`).
static JSON_RECORDS: OnceLock<writer::BatchWriter> = OnceLock::new();

thread_local! {
    /// The line a worker builds each request record in, kept between records.
    static RECORD_LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

/// Writes `record` straight to the JSON output, as the tracing event would appear there.
/// Returns false when that is not possible, because the subscriber does not write JSON lines or
/// a worker is already building a record on this thread.
fn write_json_record(record: &json::RequestRecord<'_>) -> bool {
    let Some(output) = JSON_RECORDS.get() else { return false };
    RECORD_LINE.with(|line| {
        let Ok(mut line) = line.try_borrow_mut() else { return false };
        line.clear();
        if json::write_request_record(&mut line, record).is_ok() {
            // `writer::RecordSink` returns no error: it only appends to the shared buffer.
            let _ = output.make_writer().write_all(line.as_bytes());
        }
        true
    })
}

/// State of a request that its record and counters read, kept in its extensions as one entry
/// from the start of the request, because each entry is a heap allocation.
#[derive(Default)]
struct RequestState {
    started: Option<Instant>,
    /// The role the handler marked. A request no handler marked counts as `local`.
    role: Option<Role>,
    /// A relayed exchange, served by the catch-all route of its role.
    relayed: bool,
    fields: ExchangeFields,
}

/// Applies `update` to the state of `request`, which it adds first when the request has none.
fn update_state(request: &impl HttpMessage, update: impl FnOnce(&mut RequestState)) {
    let mut extensions = request.extensions_mut();
    match extensions.get_mut::<RequestState>() {
        Some(state) => update(state),
        None => {
            let mut state = RequestState::default();
            update(&mut state);
            extensions.insert(state);
        }
    }
}

/// Exchange details the handlers add to the request record: none of them is secret.
#[derive(Debug, Default, Clone)]
pub struct ExchangeFields {
    /// Relay A: the peer relay's origin. Relay B: relay A's address.
    pub peer: Option<String>,
    /// First 8 hex digits of the pair id.
    pub pair: Option<ShortPairId>,
    /// Status the upstream API returned.
    pub upstream_status: Option<u16>,
}

/// Marks `request` as a relayed exchange, served by the catch-all route of its role: its
/// record's route is `*`.
pub fn relayed(request: &actix_web::HttpRequest) {
    update_state(request, |state| state.relayed = true);
}

/// Marks `request` with its role, for the request record and the request counters.
pub fn mark_role(request: &actix_web::HttpRequest, role: Role) {
    update_state(request, |state| state.role = Some(role));
}

/// Updates the exchange details of `request`'s record.
pub fn note(request: &actix_web::HttpRequest, update: impl FnOnce(&mut ExchangeFields)) {
    update_state(request, |state| update(&mut state.fields));
}

/// The per-request span and record.
pub struct RequestLog;

impl RootSpanBuilder for RequestLog {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let now = Instant::now();
        update_state(request, |state| state.started = Some(now));
        // The record at the end carries every field itself. A span costs work on each poll of
        // the request, so it exists only where debug records need it for context.
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return Span::none();
        }
        let request_id = request.extensions().get::<RequestId>().map(ToString::to_string).unwrap_or_default();
        tracing::info_span!("request", method = %request.method(), request_id = %request_id)
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let Ok(response) = outcome else { return };
        let request = response.request();
        let extensions = request.extensions();
        let state = extensions.get::<RequestState>();
        let role = state.and_then(|state| state.role).unwrap_or(Role::Local);
        let elapsed =
            state.and_then(|state| state.started).map(|started| started.elapsed()).unwrap_or_default();
        let status = response.status().as_u16();
        if let Some(state) = request.app_data::<actix_web::web::Data<RelayState>>() {
            state.metrics.request_done(role, status, elapsed);
            if !state.config.request_log {
                return;
            }
        }
        // Relayed exchanges and the 569 fallback match any path: their route is `*`. Finding
        // the pattern walks the route table, so the exchange handlers mark their requests.
        let relayed = state.is_some_and(|state| state.relayed);
        let pattern = if relayed { None } else { request.match_pattern() };
        let route = pattern.as_deref().unwrap_or("*");
        let mut id_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let request_id = match extensions.get::<RequestId>() {
            Some(id) => &*id.hyphenated().encode_lower(&mut id_text),
            None => "",
        };
        let exchange = state.map(|state| &state.fields);
        let record = json::RequestRecord {
            method: request.method().as_str(),
            route,
            status,
            latency_ms: (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            role: role.as_str(),
            request_id,
            peer: exchange.and_then(|fields| fields.peer.as_deref()).unwrap_or(""),
            pair: exchange.and_then(|fields| fields.pair.as_ref()).map_or("", ShortPairId::as_str),
            upstream_status: exchange.and_then(|fields| fields.upstream_status).unwrap_or(0),
        };
        // Without a span, tracing would add nothing to the JSON record, so the record skips
        // tracing's dispatch, its field visitors and its formatting buffer.
        if span.is_none()
            && tracing::enabled!(target: json::REQUEST_TARGET, tracing::Level::INFO)
            && write_json_record(&record)
        {
            return;
        }
        let _entered = span.enter();
        record.emit();
    }
}
