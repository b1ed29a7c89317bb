//! `PeerSession`: the live state of one pair on this relay, owned by exactly one actor.
//!
//! The actor serialises the pair's state transitions, so two exchanges of one pair never get the
//! same `seq` (relay A) and one `seq` is never accepted twice (relay B). It hands out the pair
//! keys with each `seq`; the sealing itself runs in the caller.
//!
//! A pair expires when it was idle longer than `idle_timeout`, is older than `max_age`, or has
//! carried `max_exchanges` exchanges, which bounds how much traffic one key protects. An expired
//! session stops and removes itself from the registry and the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::{ClientId, PairId, PairKeys, ProtocolError};
use thiserror::Error;

use crate::{PairSnapshot, Role, SessionRegistry};

/// Relay A asks for the next `seq` of this pair. Replies with the exchange to seal, or an error
/// when the pair must be replaced.
#[derive(Debug, Message)]
#[rtype(result = "Result<Exchange, SessionError>")]
pub struct AllocateSeq;

/// Relay B asks to accept `seq` of this pair once. Replies with the exchange to open, or an
/// error when `seq` is a replay or the pair expired.
#[derive(Debug, Message)]
#[rtype(result = "Result<Exchange, SessionError>")]
pub struct AcceptSeq {
    pub seq: u64,
}

/// The expiry timer asks the session to check its limits.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CheckExpiry;

/// What one exchange needs from its session.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub pair_id: PairId,
    pub client_id: ClientId,
    pub seq: u64,
    pub keys: Arc<PairKeys>,
}

/// Why a session refused a `seq`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The `seq` was accepted before or is older than the window.
    #[error(transparent)]
    Replay(#[from] ProtocolError),
    /// The pair reached its maximum age or exchange count, or sat idle too long.
    #[error("pair expired")]
    Expired,
}

/// When pairs expire.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub idle_timeout: Duration,
    pub max_age: Duration,
    pub max_exchanges: u64,
}

/// The actor owning one pair.
pub struct PeerSession {
    snapshot: PairSnapshot,
    limits: SessionLimits,
    last_used: Instant,
    exchanges: u64,
    registry: SessionRegistry,
}

impl PeerSession {
    pub fn new(snapshot: PairSnapshot, limits: SessionLimits, registry: SessionRegistry) -> Self {
        Self { snapshot, limits, last_used: Instant::now(), exchanges: 0, registry }
    }

    fn expired(&self) -> bool {
        self.last_used.elapsed() >= self.limits.idle_timeout
            || self.snapshot.age() >= self.limits.max_age
            || self.exchanges >= self.limits.max_exchanges
    }

    fn exchange(&mut self, seq: u64) -> Exchange {
        self.last_used = Instant::now();
        self.exchanges += 1;
        Exchange {
            pair_id: self.snapshot.pair_id,
            client_id: self.snapshot.client_id.clone(),
            seq,
            keys: Arc::clone(&self.snapshot.keys),
        }
    }

    fn expire(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(pair = %self.snapshot.pair_id.short(), role = self.snapshot.role.as_str(), "pair expired");
        self.registry.forget(self.snapshot.pair_id);
        ctx.stop();
    }
}

impl Actor for PeerSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let period =
            (self.limits.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        ctx.run_interval(period, |_, ctx| ctx.notify(CheckExpiry));
    }
}

impl Handler<CheckExpiry> for PeerSession {
    type Result = ();

    fn handle(&mut self, _: CheckExpiry, ctx: &mut Self::Context) {
        if self.expired() {
            self.expire(ctx);
        }
    }
}

impl Handler<AllocateSeq> for PeerSession {
    type Result = Result<Exchange, SessionError>;

    fn handle(&mut self, _: AllocateSeq, ctx: &mut Self::Context) -> Self::Result {
        if self.snapshot.role != Role::Outbound || self.expired() {
            self.expire(ctx);
            return Err(SessionError::Expired);
        }
        let seq = self.snapshot.next_seq;
        self.snapshot.next_seq += 1;
        Ok(self.exchange(seq))
    }
}

impl Handler<AcceptSeq> for PeerSession {
    type Result = Result<Exchange, SessionError>;

    fn handle(&mut self, message: AcceptSeq, ctx: &mut Self::Context) -> Self::Result {
        if self.expired() {
            self.expire(ctx);
            return Err(SessionError::Expired);
        }
        let window = self.snapshot.window.get_or_insert_with(|| ReplayWindow::new(1024));
        window.check_and_mark(message.seq)?;
        Ok(self.exchange(message.seq))
    }
}
