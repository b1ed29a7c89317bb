//! The HTTP server: shared state, the route table and start-up.
//!
//! Route order decides the role. A request with `x-mte-outbound-token` is outbound whatever its
//! path, and so is a request with `x-mte-upstream` and no `x-mte-relay`, so that a missing token
//! gets 401. Then come the pairing routes, then a request with `x-mte-relay` is inbound, then the
//! local routes. Anything else gets 569.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::dev::Server;
use actix_web::guard::{self, GuardContext};
use actix_web::middleware::DefaultHeaders;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use api_relay_actors::{
    MemoryStore, RedisSettings, RedisStore, SessionLimits, SessionRegistry, StateStore, SupervisorSettings,
};
use api_relay_protocol::ClientIdSigner;
use api_relay_protocol::fields::FieldLimits;
use tracing_actix_web::TracingLogger;

use crate::client::{self, HopClients};
use crate::config::Config;
use crate::headers;
use crate::metrics::RelayMetrics;
use crate::outbound::pool::PairPool;
use crate::telemetry::RequestLog;
use crate::{inbound, outbound, routes};

/// Which role served a request; a label on request metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Outbound,
    Inbound,
    Local,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Outbound => "outbound",
            Role::Inbound => "inbound",
            Role::Local => "local",
        }
    }
}

/// State shared by every worker.
pub struct RelayState {
    pub config: Arc<Config>,
    pub signer: ClientIdSigner,
    pub registry: SessionRegistry,
    pub pool: PairPool,
    pub metrics: RelayMetrics,
    /// False until the listener is up, and again while draining.
    pub ready: AtomicBool,
    pub pairing_limits: crate::inbound::limits::PairingLimits,
    /// `UPSTREAM`'s origin and path prefix, which every proxied path is appended to.
    pub upstream_base: String,
}

impl RelayState {
    /// Builds the state with the Redis store when `REDIS_URL` is set, else the embedded
    /// in-memory store. Must run inside an actix system, which the Redis store's supervisor
    /// actor needs.
    ///
    /// # Errors
    /// When the metrics cannot be registered or the Redis URL is rejected by the Redis client.
    pub fn new(config: Arc<Config>, registry: prometheus::Registry) -> anyhow::Result<Self> {
        let store: Arc<dyn StateStore> = match &config.redis_url {
            Some(url) => {
                let settings = RedisSettings {
                    url: url.expose().to_owned(),
                    pool_size: config.redis_pool_size,
                    // The HTTP workers and the thread of the actix system.
                    threads: u32::try_from(config.workers + 1).unwrap_or(u32::MAX),
                    timeout: config.redis_timeout,
                    key_prefix: config.redis_key_prefix.clone(),
                    secret: config.client_id_secret.expose().as_bytes().to_vec(),
                    previous_secret: config
                        .client_id_secret_previous
                        .as_ref()
                        .map(|secret| secret.expose().as_bytes().to_vec()),
                    supervisor: SupervisorSettings::default(),
                };
                RedisStore::start(settings).context("setting up the Redis state store")?
            }
            None => Arc::new(MemoryStore::new()),
        };
        let limits = SessionLimits {
            idle_timeout: config.pair_idle_timeout,
            max_age: config.pair_max_age,
            max_exchanges: config.pair_max_exchanges,
        };
        let sessions = SessionRegistry::new(store, limits);
        let psk = config.pairing_psk.as_ref().map(|psk| psk.expose().as_bytes().to_vec());
        let pool = PairPool::new(
            sessions.clone(),
            config.pair_pool_size,
            config.replay_window,
            psk,
            config.upstream_timeout,
        );
        let signer = ClientIdSigner::new(
            config.client_id_secret.expose().as_bytes(),
            config.client_id_secret_previous.as_ref().map(|secret| secret.expose().as_bytes()),
        );
        let metrics = RelayMetrics::new(registry).context("registering metrics")?;
        let pairing_limits = crate::inbound::limits::PairingLimits::new(
            config.max_concurrent_pairings,
            config.pairing_requests_per_minute,
        );
        Ok(Self {
            signer,
            registry: sessions,
            pool,
            metrics,
            ready: AtomicBool::new(false),
            pairing_limits,
            upstream_base: crate::inbound::upstream_base(&config.upstream),
            config,
        })
    }

    /// Decoding limits for header blocks.
    pub fn field_limits(&self) -> FieldLimits {
        // One extra line for the pseudo-field.
        FieldLimits { max_fields: self.config.max_header_count + 1, max_bytes: self.config.max_header_bytes }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// A started server and the address it listens on.
pub struct Running {
    pub server: Server,
    pub address: SocketAddr,
    pub state: web::Data<RelayState>,
}

/// Binds the listener and starts the workers; the returned server must be awaited.
///
/// # Errors
/// When the TLS roots cannot be loaded or the address cannot be bound.
pub fn start(config: Config) -> anyhow::Result<Running> {
    let config = Arc::new(config);
    let tls = client::tls_config(&config)?;
    let state = web::Data::new(RelayState::new(Arc::clone(&config), prometheus::Registry::new())?);
    tracing::info!(kem = "ML-KEM-768 + P-256 (HPKE)", aead = "AES-256-GCM", "crypto ready");
    let app_state = state.clone();
    let app_config = Arc::clone(&config);
    let server = HttpServer::new(move || {
        // The factory runs once on each worker thread.
        app_state.registry.workers().register_current();
        let mut default_headers = DefaultHeaders::new();
        for (name, value) in &app_config.headers {
            default_headers = default_headers.add((name.clone(), value.clone()));
        }
        App::new()
            .app_data(app_state.clone())
            .app_data(web::Data::new(HopClients::new(&app_config, &tls)))
            .app_data(web::PayloadConfig::new(256 * 1024))
            .wrap(default_headers)
            .wrap(TracingLogger::<RequestLog>::new())
            // Catch-all scopes match by an empty prefix, which costs no pattern matching.
            .service(
                web::scope("").guard(guard::fn_guard(is_outbound)).default_service(web::to(outbound::handle)),
            )
            .service(web::resource("/api/mte-relay").route(web::head().to(inbound::pairing::client_id)))
            .service(web::resource("/api/mte-pair").route(web::post().to(inbound::pairing::pair)))
            .service(
                web::scope("").guard(guard::fn_guard(is_inbound)).default_service(web::to(inbound::handle)),
            )
            .configure(routes::local)
    })
    .workers(config.workers)
    // Responses go out as soon as they are written: with Nagle's algorithm, the last segment
    // of a response would wait for the client's delayed acknowledgement.
    .tcp_nodelay(true)
    .keep_alive(config.keep_alive)
    .client_request_timeout(config.client_request_timeout)
    .max_connections(config.max_connections)
    .shutdown_timeout(config.shutdown_grace.as_secs())
    .disable_signals()
    .bind((config.bind_address, config.port))
    .with_context(|| format!("binding {}:{}", config.bind_address, config.port))?;
    let address = server.addrs().first().copied().context("listener has no address")?;
    let server = server.run();
    state.ready.store(true, Ordering::Relaxed);
    Ok(Running { server, address, state })
}

/// Installs the SIGTERM and SIGINT handlers, then returns the future that waits for either and
/// drains: `/readyz` turns 503, the listener stops accepting, and in-flight requests get
/// `SHUTDOWN_GRACE_SECS` to finish before the process exits. Call it before announcing the
/// listener, because until the handlers exist SIGTERM kills the process without draining.
pub fn drain_on_signal(
    handle: actix_web::dev::ServerHandle,
    state: web::Data<RelayState>,
) -> impl std::future::Future<Output = ()> {
    let signals = install_stop_signals();
    async move {
        let signal = wait_for_stop_signal(signals).await;
        state.ready.store(false, Ordering::Relaxed);
        let grace = state.config.shutdown_grace.as_secs();
        tracing::info!(
            signal,
            grace_secs = grace,
            "draining: finishing in-flight requests, accepting no new ones"
        );
        handle.stop(true).await;
    }
}

/// SIGTERM and SIGINT streams. A signal that arrives after they are created and before they are
/// awaited is still delivered.
type StopSignals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn install_stop_signals() -> Option<StopSignals> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(terminate), Ok(interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("could not install signal handlers; stop the relay with SIGKILL");
        return None;
    };
    Some((terminate, interrupt))
}

async fn wait_for_stop_signal(signals: Option<StopSignals>) -> &'static str {
    let Some((mut terminate, mut interrupt)) = signals else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

/// Logs the effective non-secret configuration and every warning.
pub fn log_startup(config: &Config) {
    tracing::info!(
        upstream = %config.upstream,
        store = if config.redis_url.is_some() { "redis" } else { "memory" },
        debug = config.debug,
        request_log = config.request_log,
        workers = config.workers,
        pair_pool_size = config.pair_pool_size,
        replay_window = config.replay_window,
        max_body_bytes = config.max_body_bytes,
        upstream_timeout_secs = config.upstream_timeout.as_secs(),
        allowlist_entries = config.outbound_allowlist.len(),
        pairing_psk = config.pairing_psk.is_some(),
        "configuration loaded"
    );
    if let Some(url) = &config.redis_url {
        // Only host and port: the URL may carry a password.
        let address = url::Url::parse(url.expose())
            .ok()
            .map(|url| format!("{}:{}", url.host_str().unwrap_or_default(), url.port().unwrap_or(6379)))
            .unwrap_or_default();
        tracing::info!(
            redis_address = address,
            redis_tls = url.expose().starts_with("rediss:"),
            redis_key_prefix = config.redis_key_prefix,
            redis_pool_size = config.redis_pool_size,
            redis_timeout_ms = u64::try_from(config.redis_timeout.as_millis()).unwrap_or(u64::MAX),
            "state store: Redis, shared with the other relays that use it"
        );
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
}

/// Returns whether the application sent the request to relay A: it carries the outbound token,
/// or it names a peer with `x-mte-upstream` and is not an exchange from a peer.
fn is_outbound(context: &GuardContext<'_>) -> bool {
    let present = |name: &actix_web::http::header::HeaderName| context.head().headers().contains_key(name);
    present(&headers::name::OUTBOUND_TOKEN)
        || (present(&headers::name::UPSTREAM) && !present(&headers::name::RELAY))
}

fn is_inbound(context: &GuardContext<'_>) -> bool {
    context.head().headers().contains_key(&headers::name::RELAY)
}
