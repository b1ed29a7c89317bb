//! `SnapshotSupervisor`: watches the connections of a shared state store.
//!
//! It pings the store every `interval` while the store responds. After a failed ping it probes
//! again with exponential backoff, and every probe takes a connection from the pool, so the pool
//! drops broken connections and opens new ones: that is the reconnect. It logs a warning when the
//! store stops answering and when it answers again. After `max_attempts` failed probes in a row
//! it logs an error and stops, and actix's `Supervisor` restarts it, which begins a new round of
//! probes. Requests never wait for the supervisor: each store call has its own timeout, and
//! service resumes with the first call that reaches the store again.
//!
//! [`StoreHealth`] holds counters for metrics and the last probe's result.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::StateStore;

/// Counters of one store's connection health, shared by the supervisor and the store.
#[derive(Debug, Default)]
pub struct StoreHealth {
    reachable: AtomicBool,
    pings_succeeded: AtomicU64,
    pings_failed: AtomicU64,
    recoveries: AtomicU64,
    give_ups: AtomicU64,
    restarts: AtomicU64,
    operation_failures: AtomicU64,
}

impl StoreHealth {
    /// Returns whether the last supervisor probe reached the store (false before the first probe).
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Number of supervisor probes that reached the store.
    pub fn pings_succeeded(&self) -> u64 {
        self.pings_succeeded.load(Ordering::Relaxed)
    }

    /// Number of supervisor probes that failed or timed out.
    pub fn pings_failed(&self) -> u64 {
        self.pings_failed.load(Ordering::Relaxed)
    }

    /// Number of times the store responded again after failed probes.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Relaxed)
    }

    /// Number of times the supervisor gave up after `max_attempts` failed probes and stopped.
    pub fn give_ups(&self) -> u64 {
        self.give_ups.load(Ordering::Relaxed)
    }

    /// Number of times actix restarted the supervisor.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Number of store calls of the request path that failed or timed out.
    pub fn operation_failures(&self) -> u64 {
        self.operation_failures.load(Ordering::Relaxed)
    }

    pub(crate) fn record_operation_failure(&self) {
        self.operation_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Probe timing of the supervisor.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorSettings {
    /// Time between pings while the store responds.
    pub interval: Duration,
    /// Delay before the first probe after a failure; doubles with each failure.
    pub first_backoff: Duration,
    /// Maximum delay between two probes after failures.
    pub max_backoff: Duration,
    /// Failed probes in a row after which the supervisor gives up and is restarted.
    pub max_attempts: u32,
}

impl Default for SupervisorSettings {
    /// Pings every 5 s, and after a failure probes at 100 ms, 200 ms, ... up to every 5 s,
    /// giving up after 12 failures in a row: 31 s of backoff plus the time the probes take.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: 12,
        }
    }
}

/// The actor that watches one store. The store keeps its address; the actor holds only a weak
/// reference to the store and stops for good once the store is dropped.
pub struct SnapshotSupervisor {
    store: Weak<dyn StateStore>,
    health: Arc<StoreHealth>,
    settings: SupervisorSettings,
    /// Failed probes in a row in this round.
    failures: u32,
    backoff: Duration,
    /// When the store stopped answering; survives restarts, so the recovery log gives the
    /// whole outage.
    down_since: Option<Instant>,
}

impl SnapshotSupervisor {
    /// Starts the supervisor under actix supervision on the current arbiter.
    pub fn start(
        store: &Arc<dyn StateStore>,
        health: Arc<StoreHealth>,
        settings: SupervisorSettings,
    ) -> Addr<Self> {
        let store = Arc::downgrade(store);
        Supervisor::start(move |_| Self {
            store,
            health,
            settings,
            failures: 0,
            backoff: settings.first_backoff,
            down_since: None,
        })
    }

    fn schedule(&mut self, delay: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(delay, |supervisor, ctx| supervisor.probe(ctx));
    }

    fn probe(&mut self, ctx: &mut Context<Self>) {
        let Some(store) = self.store.upgrade() else {
            ctx.stop();
            return;
        };
        let ping = async move { store.ping().await };
        ctx.spawn(ping.into_actor(self).map(|result, supervisor, ctx| supervisor.record(result, ctx)));
    }

    fn record(&mut self, result: Result<(), crate::StoreError>, ctx: &mut Context<Self>) {
        match result {
            Ok(()) => self.succeeded(ctx),
            Err(error) => self.failed(&error, ctx),
        }
    }

    fn succeeded(&mut self, ctx: &mut Context<Self>) {
        self.health.pings_succeeded.fetch_add(1, Ordering::Relaxed);
        self.health.reachable.store(true, Ordering::Relaxed);
        if let Some(since) = self.down_since.take() {
            self.health.recoveries.fetch_add(1, Ordering::Relaxed);
            let down_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
            tracing::warn!(store = self.kind(), down_ms, "state store reachable again");
        }
        self.failures = 0;
        self.backoff = self.settings.first_backoff;
        self.schedule(self.settings.interval, ctx);
    }

    fn failed(&mut self, error: &crate::StoreError, ctx: &mut Context<Self>) {
        self.health.pings_failed.fetch_add(1, Ordering::Relaxed);
        self.health.reachable.store(false, Ordering::Relaxed);
        self.failures += 1;
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(store = self.kind(), %error, "state store unreachable; reconnecting with backoff");
        } else {
            tracing::debug!(store = self.kind(), %error, attempt = self.failures, "state store still unreachable");
        }
        if self.failures >= self.settings.max_attempts {
            self.health.give_ups.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                store = self.kind(),
                %error,
                attempts = self.failures,
                "state store still unreachable; giving up this round of reconnects, the supervisor restarts and tries again"
            );
            ctx.stop();
            return;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.settings.max_backoff);
        self.schedule(delay, ctx);
    }

    fn kind(&self) -> &'static str {
        self.store.upgrade().map_or("gone", |store| store.kind())
    }
}

impl Actor for SnapshotSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.schedule(Duration::ZERO, ctx);
    }
}

impl Supervised for SnapshotSupervisor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.health.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::info!(store = self.kind(), "state store supervisor restarting");
        self.failures = 0;
        self.backoff = self.settings.first_backoff;
    }
}
