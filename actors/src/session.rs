//! `PeerSession`: the live state of one pair on this relay, owned by exactly one actor.
//!
//! The actor serialises the pair's state transitions, so two exchanges of one pair never get the
//! same `seq` (relay A) and one `seq` is never accepted twice (relay B). It hands out the pair
//! keys with each `seq`; the sealing itself runs in the caller.
//!
//! With the in-memory store, the actor itself keeps relay A's next `seq` and relay B's replay
//! window. With a shared store, several processes may have a session of the same pair, so the
//! store decides. Relay A reserves blocks of [`SEQ_BLOCK`] numbers with one atomic increment in
//! the store and hands them out one by one. Relay B runs the store's atomic replay check for
//! every `seq`. A store that does not answer makes the message fail with
//! [`SessionError::Store`]; nothing is handed out or accepted then.
//!
//! A pair expires when it was idle longer than `idle_timeout`, is older than `max_age`, or has
//! carried `max_exchanges` exchanges, which bounds how much traffic one key protects. An expired
//! session stops and removes itself from the registry and the store. With a shared store, a
//! session idle in this process only leaves this process's memory: the store expires the pair
//! once no process has used it for `idle_timeout`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::{ClientId, PairId, PairKeys, ProtocolError};
use thiserror::Error;

use crate::snapshot::unix_now;
use crate::store::{SeqCheck, StoreError};
use crate::{PairSnapshot, Role, SessionRegistry};

/// Sequence numbers relay A reserves from a shared store at once. A process that stops skips
/// the rest of its block, so a crash loses at most this many numbers and never repeats one.
pub const SEQ_BLOCK: u64 = 64;

/// Replay window of a pair whose snapshot carries none (the protocol default).
const DEFAULT_WINDOW: u64 = 1024;

/// Maximum number of sequence numbers relay B sends to a shared store in one replay check.
pub const MAX_CHECK_BATCH: usize = 128;

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

/// Relay A dropped the pool this pair belonged to, so no exchange of this process uses it again.
/// The session stops at once, as it would after `idle_timeout`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Retire;

/// The expiry timer asks the session to check its limits.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CheckExpiry;

/// Relay B with a shared store: start the replay check of the waiting numbers, unless one runs.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CheckWaiting;

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
    /// The shared store did not respond, so the session could not decide safely.
    #[error("{0}")]
    Store(String),
}

/// When pairs expire.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub idle_timeout: Duration,
    pub max_age: Duration,
    pub max_exchanges: u64,
}

impl SessionLimits {
    /// Remaining lifetime a store gives a pair created at `created_at` (Unix seconds): the idle
    /// timeout, capped at the time left until the maximum age. `None` once the maximum age passed.
    pub fn store_ttl(&self, created_at: u64) -> Option<Duration> {
        let age = Duration::from_secs(unix_now().saturating_sub(created_at));
        let left = self.max_age.checked_sub(age).filter(|left| !left.is_zero())?;
        Some(left.min(self.idle_timeout))
    }
}

/// The actor owning one pair.
pub struct PeerSession {
    snapshot: PairSnapshot,
    limits: SessionLimits,
    last_used: Instant,
    exchanges: u64,
    registry: SessionRegistry,
    serial: u64,
    /// Whether the store is shared, so `seq` and the replay window live there.
    shared: bool,
    /// Relay A with a shared store: the next number of the reserved block.
    reserved_next: u64,
    /// Relay A with a shared store: the last number of the reserved block.
    reserved_last: u64,
    /// Relay A with a shared store: when the pair's lifetime in the store was last set.
    refreshed: Instant,
    /// Relay B with a shared store: numbers waiting for the replay check, with their callers.
    waiting: Waiting,
    /// Relay B with a shared store: a replay check is running in the store.
    checking: bool,
    /// Relay B with a shared store: a `CheckWaiting` message is queued.
    check_due: bool,
}

type Reply = Result<Exchange, SessionError>;

/// Numbers waiting for the replay check and where each outcome goes. The session and the replies
/// of its `AcceptSeq` handler share it: the handler runs before actix hands the reply its
/// sender, so the reply adds the sender itself.
type Waiting = Arc<Mutex<Vec<(u64, OneshotSender<Reply>)>>>;

impl PeerSession {
    pub fn new(
        snapshot: PairSnapshot,
        limits: SessionLimits,
        registry: SessionRegistry,
        serial: u64,
    ) -> Self {
        let shared = registry.store().is_shared();
        Self {
            snapshot,
            limits,
            last_used: Instant::now(),
            exchanges: 0,
            registry,
            serial,
            shared,
            reserved_next: 1,
            reserved_last: 0,
            refreshed: Instant::now(),
            waiting: Waiting::default(),
            checking: false,
            check_due: false,
        }
    }

    /// Returns whether the pair reached its maximum age or exchange count, in whichever process
    /// it was used.
    fn worn_out(&self) -> bool {
        self.snapshot.age() >= self.limits.max_age || self.exchanges >= self.limits.max_exchanges
    }

    fn idle(&self) -> bool {
        self.last_used.elapsed() >= self.limits.idle_timeout
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

    /// Stops the session and removes the pair from memory and from the store.
    fn expire(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(pair = %self.snapshot.pair_id.short(), role = self.snapshot.role.as_str(), "pair expired");
        self.registry.forget(self.snapshot.pair_id, self.snapshot.role, self.serial);
        self.reply_to_waiting(|| Err(SessionError::Expired));
        ctx.stop();
    }

    /// Stops a session this process no longer uses: with a shared store other processes may
    /// still use the pair, so it stays stored, otherwise it is removed.
    fn leave_memory(&mut self, ctx: &mut Context<Self>) {
        if self.shared {
            self.evict(ctx);
        } else {
            self.expire(ctx);
        }
    }

    /// Stops the session and removes it from this process's memory only.
    fn evict(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(pair = %self.snapshot.pair_id.short(), role = self.snapshot.role.as_str(), "pair left memory");
        self.registry.evict(self.snapshot.pair_id, self.snapshot.role, self.serial);
        self.reply_to_waiting(|| Err(SessionError::Expired));
        ctx.stop();
    }

    /// Takes up to `limit` waiting numbers with their callers, oldest first.
    fn take_waiting(&self, limit: usize) -> Vec<(u64, OneshotSender<Reply>)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let count = waiting.len().min(limit);
        waiting.drain(..count).collect()
    }

    /// Sends `reply()` to every waiting caller, because the session stops and no check will run.
    fn reply_to_waiting(&self, reply: impl Fn() -> Reply) {
        for (_, sender) in self.take_waiting(usize::MAX) {
            // A caller that stopped waiting drops the reply.
            let _ = sender.send(reply());
        }
    }

    /// Relay A with a shared store: sets the pair's lifetime in the store again after use, so
    /// that the pair stays stored while this process uses numbers of a reserved block.
    fn refresh(&mut self, ctx: &mut Context<Self>) {
        let Some(ttl) = self.limits.store_ttl(self.snapshot.created_at) else { return };
        self.refreshed = Instant::now();
        let store = Arc::clone(self.registry.store());
        let pair_id = self.snapshot.pair_id;
        let touch = async move { store.touch_pair(&pair_id, Role::Outbound, ttl).await };
        ctx.spawn(touch.into_actor(self).map(move |result, _, _| match result {
            Ok(true) => {}
            Ok(false) => tracing::debug!(pair = %pair_id.short(), "pair is no longer in the state store"),
            Err(error) => {
                tracing::debug!(pair = %pair_id.short(), %error, "could not refresh the pair's lifetime")
            }
        }));
    }

    /// Hands out `seq` of a reserved block, unless it passes the exchange limit.
    fn reserved_exchange(&mut self, seq: u64, ctx: &mut Context<Self>) -> Reply {
        if seq > self.limits.max_exchanges {
            self.expire(ctx);
            return Err(SessionError::Expired);
        }
        Ok(self.exchange(seq))
    }

    /// Relay A with a shared store: reserves the next block and hands out its first number.
    fn reserve_block(&mut self, ctx: &mut Context<Self>) -> SeqReply {
        let Some(ttl) = self.limits.store_ttl(self.snapshot.created_at) else {
            self.expire(ctx);
            return SeqReply::Now(Err(SessionError::Expired));
        };
        let store = Arc::clone(self.registry.store());
        let pair_id = self.snapshot.pair_id;
        let reserve = async move { store.reserve_seqs(&pair_id, SEQ_BLOCK, ttl).await };
        let handled = reserve.into_actor(self).map(|result, session, ctx| match result {
            Ok(Some(block)) => {
                session.refreshed = Instant::now();
                session.reserved_next = block.start() + 1;
                session.reserved_last = *block.end();
                session.reserved_exchange(*block.start(), ctx)
            }
            // Expired in the store (idle or too old) or removed by another process.
            Ok(None) => {
                session.evict(ctx);
                Err(SessionError::Expired)
            }
            Err(error) => Err(SessionError::Store(error.to_string())),
        });
        SeqReply::Atomic(AtomicResponse::new(Box::pin(handled)))
    }

    /// Relay B with a shared store: queues `seq` for the store's atomic replay check, which runs
    /// once the current message is handled, or after the check that is running now.
    fn accept_shared(&mut self, seq: u64, ctx: &mut Context<Self>) -> SeqReply {
        let ttl = self.limits.store_ttl(self.snapshot.created_at);
        if ttl.is_none() || self.worn_out() || seq > self.limits.max_exchanges {
            self.expire(ctx);
            return SeqReply::Now(Err(SessionError::Expired));
        }
        if !self.checking && !self.check_due {
            self.check_due = true;
            ctx.notify(CheckWaiting);
        }
        SeqReply::Wait { seq, waiting: Arc::clone(&self.waiting) }
    }

    /// Relay B with a shared store: sends the waiting numbers to the store in one replay check
    /// and replies to their callers when it returns. Then it checks the numbers that came meanwhile.
    fn check_waiting(&mut self, ctx: &mut Context<Self>) {
        if self.waiting.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
            return;
        }
        // Expiring replies to every waiting caller.
        let Some(ttl) = self.limits.store_ttl(self.snapshot.created_at) else {
            self.expire(ctx);
            return;
        };
        let batch = self.take_waiting(MAX_CHECK_BATCH);
        self.checking = true;
        let store = Arc::clone(self.registry.store());
        let pair_id = self.snapshot.pair_id;
        let window = self.snapshot.window.as_ref().map_or(DEFAULT_WINDOW, ReplayWindow::size);
        let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
        let check = async move { store.accept_seqs(&pair_id, &seqs, window, ttl).await };
        ctx.spawn(check.into_actor(self).map(move |result, session, ctx| {
            session.checking = false;
            session.reply_to_batch(batch, result, ctx);
            if ctx.state().alive() {
                session.check_waiting(ctx);
            }
        }));
    }

    /// Replies to the callers of one replay check, in the order the store returned the outcomes.
    fn reply_to_batch(
        &mut self,
        batch: Vec<(u64, OneshotSender<Reply>)>,
        result: Result<Vec<SeqCheck>, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let outcomes = match result {
            Ok(outcomes) if outcomes.len() == batch.len() => outcomes,
            failed => {
                let reason = match failed {
                    Err(error) => error.to_string(),
                    Ok(_) => "replay check returned the wrong number of outcomes".to_owned(),
                };
                for (_, sender) in batch {
                    let _ = sender.send(Err(SessionError::Store(reason.clone())));
                }
                return;
            }
        };
        let mut pair_missing = false;
        for ((seq, sender), outcome) in batch.into_iter().zip(outcomes) {
            let reply = match outcome {
                SeqCheck::Accepted => Ok(self.exchange(seq)),
                SeqCheck::Replayed => Err(SessionError::Replay(ProtocolError::Replayed { seq })),
                SeqCheck::Stale => Err(SessionError::Replay(ProtocolError::Stale { seq })),
                SeqCheck::PairNotFound => {
                    pair_missing = true;
                    Err(SessionError::Expired)
                }
            };
            // A caller that stopped waiting drops the reply.
            let _ = sender.send(reply);
        }
        // Expired in the store (idle or too old) or removed by another process.
        if pair_missing {
            self.evict(ctx);
        }
    }
}

/// A session's reply to `AllocateSeq` or `AcceptSeq`: sent at once, after a store call, or
/// after the replay check the `seq` waits for.
///
/// A reply known at once is sent before the handler returns, so it arrives even when the
/// session stops in the same step (an expired pair). Actix drops the futures of a stopping
/// actor, so a future reply would be lost there. A stopping session replies to its waiting
/// callers before it stops.
pub enum SeqReply {
    /// Sent at once.
    Now(Reply),
    /// After a store call that holds back the session's other messages (relay A's block
    /// reservation, so concurrent allocations wait for one block instead of reserving many).
    Atomic(AtomicResponse<PeerSession, Reply>),
    /// After relay B's replay check in a shared store: the caller waits in `waiting` until the
    /// session's next check replies.
    Wait { seq: u64, waiting: Waiting },
}

impl<M: Message<Result = Reply>> MessageResponse<PeerSession, M> for SeqReply {
    fn handle(self, ctx: &mut Context<PeerSession>, tx: Option<OneshotSender<Reply>>) {
        match self {
            SeqReply::Now(reply) => {
                if let Some(tx) = tx {
                    // The sender stopped waiting, so the reply is dropped.
                    let _ = tx.send(reply);
                }
            }
            SeqReply::Atomic(response) => MessageResponse::<PeerSession, M>::handle(response, ctx, tx),
            SeqReply::Wait { seq, waiting } => {
                // A message sent with `do_send` has no sender; its seq is not checked either, so
                // the window keeps it free for a later copy.
                if let Some(tx) = tx {
                    waiting.lock().unwrap_or_else(PoisonError::into_inner).push((seq, tx));
                }
            }
        }
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
        if self.worn_out() {
            self.expire(ctx);
        } else if self.idle() {
            self.leave_memory(ctx);
        } else if self.shared && self.snapshot.role == Role::Outbound && self.last_used > self.refreshed {
            self.refresh(ctx);
        }
    }
}

impl Handler<Retire> for PeerSession {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        self.leave_memory(ctx);
    }
}

impl Handler<CheckWaiting> for PeerSession {
    type Result = ();

    fn handle(&mut self, _: CheckWaiting, ctx: &mut Self::Context) {
        self.check_due = false;
        if !self.checking {
            self.check_waiting(ctx);
        }
    }
}

impl Handler<AllocateSeq> for PeerSession {
    type Result = SeqReply;

    fn handle(&mut self, _: AllocateSeq, ctx: &mut Self::Context) -> Self::Result {
        let idle_here = !self.shared && self.idle();
        if self.snapshot.role != Role::Outbound || self.worn_out() || idle_here {
            self.expire(ctx);
            return SeqReply::Now(Err(SessionError::Expired));
        }
        if !self.shared {
            let seq = self.snapshot.next_seq;
            self.snapshot.next_seq += 1;
            return SeqReply::Now(Ok(self.exchange(seq)));
        }
        if self.reserved_next <= self.reserved_last {
            let seq = self.reserved_next;
            self.reserved_next += 1;
            return SeqReply::Now(self.reserved_exchange(seq, ctx));
        }
        self.reserve_block(ctx)
    }
}

impl Handler<AcceptSeq> for PeerSession {
    type Result = SeqReply;

    fn handle(&mut self, message: AcceptSeq, ctx: &mut Self::Context) -> Self::Result {
        if self.shared {
            return self.accept_shared(message.seq, ctx);
        }
        if self.worn_out() || self.idle() {
            self.expire(ctx);
            return SeqReply::Now(Err(SessionError::Expired));
        }
        let window = self.snapshot.window.get_or_insert_with(|| ReplayWindow::new(DEFAULT_WINDOW));
        let reply = match window.check_and_mark(message.seq) {
            Ok(()) => Ok(self.exchange(message.seq)),
            Err(error) => Err(SessionError::Replay(error)),
        };
        SeqReply::Now(reply)
    }
}
