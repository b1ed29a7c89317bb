//! `PeerSession`: the live state of one pair on this relay, owned by exactly one actor.
//!
//! The pair's counters sit in a [`SessionCore`] behind one short lock, which the actor and the
//! handles of its callers share. Every step that only changes the counters runs under that lock
//! on the caller's thread: relay A's next `seq` and relay B's check against the in-memory replay
//! window. So two exchanges of one pair never get the same `seq` (relay A) and one `seq` is never
//! accepted twice (relay B), and an exchange needs no message to the actor. The lock hands out
//! the pair keys with each `seq`; the sealing itself runs in the caller.
//!
//! With the in-memory store, the core keeps relay A's next `seq` and relay B's replay window.
//! With a shared store, several processes may have a session of the same pair, so the store
//! decides. Relay A reserves blocks of [`SEQ_BLOCK`] numbers with one atomic increment in the
//! store, through the actor, which serialises the reservations, and hands them out one by one
//! under the lock. Relay B runs the store's atomic replay check for every `seq`: a check task,
//! started on the thread of an exchange that found none running, sends the numbers that wait
//! in batches until none is left. A store that does not respond makes the step fail with
//! [`SessionError::Store`]; nothing is handed out or accepted then. Stopping the session goes
//! through the actor too.
//!
//! A pair expires when it was idle longer than `idle_timeout`, is older than `max_age`, or has
//! carried `max_exchanges` exchanges, which bounds how much traffic one key protects. An expired
//! session stops and removes itself from the registry and the store. With a shared store, a
//! session idle in this process only leaves this process's memory: the store expires the pair
//! once no process has used it for `idle_timeout`.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::{ClientId, PairId, PairKeys, ProtocolError};
use thiserror::Error;

use crate::snapshot::unix_now;
use crate::store::{SeqCheck, StoreError};
use crate::{PairSnapshot, Role, SessionRegistry, StateStore};

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

/// The counters of one pair that its exchanges read and change, shared by the session actor and
/// every [`SessionHandle`](crate::SessionHandle) of it. The lock is held only to read and bump
/// counters, never across a store call.
pub struct SessionCore {
    pair_id: PairId,
    client_id: ClientId,
    keys: Arc<PairKeys>,
    role: Role,
    /// Seconds since the Unix epoch when the pairing finished.
    created_at: u64,
    limits: SessionLimits,
    /// Whether the store is shared, so `seq` and the replay window live there.
    shared: bool,
    /// Size of relay B's replay window, for the checks in a shared store.
    window_size: u64,
    store: Arc<dyn StateStore>,
    counters: Mutex<Counters>,
}

struct Counters {
    /// The actor stopped or is stopping, so callers go to it and learn why.
    stopped: bool,
    last_used: Instant,
    exchanges: u64,
    /// Relay A with the in-memory store: the next `seq` to hand out.
    next_seq: u64,
    /// Relay A with a shared store: the next number of the reserved block.
    reserved_next: u64,
    /// Relay A with a shared store: the last number of the reserved block.
    reserved_last: u64,
    /// Relay B with the in-memory store: the replay window.
    window: Option<ReplayWindow>,
    /// Relay B with a shared store: numbers waiting for the next replay check, with their callers.
    waiting: Vec<(u64, OneshotSender<Reply>)>,
    /// Relay B with a shared store: a task runs replay checks until no number waits.
    checking: bool,
}

/// Outcome of allocating relay A's next `seq` under the lock.
enum Allocation {
    Ready(Exchange),
    /// The session is stopping.
    Stopped,
    /// The pair reached a limit, so the session must stop.
    Expire,
    /// The reserved block is used up, so the next one comes from the store.
    Reserve,
}

/// Outcome of relay B's check of one `seq` under the lock.
pub(crate) enum Acceptance {
    Ready(Reply),
    /// The session is stopping.
    Stopped,
    /// The pair reached a limit, so the session must stop.
    Expire,
    /// The shared store checks the `seq`.
    Check,
}

impl SessionCore {
    fn new(snapshot: PairSnapshot, limits: SessionLimits, store: Arc<dyn StateStore>) -> Self {
        let window = snapshot.window;
        let window_size = window.as_ref().map_or(DEFAULT_WINDOW, ReplayWindow::size);
        let counters = Counters {
            stopped: false,
            last_used: Instant::now(),
            exchanges: 0,
            next_seq: snapshot.next_seq,
            reserved_next: 1,
            reserved_last: 0,
            window,
            waiting: Vec::new(),
            checking: false,
        };
        Self {
            pair_id: snapshot.pair_id,
            client_id: snapshot.client_id,
            keys: snapshot.keys,
            role: snapshot.role,
            created_at: snapshot.created_at,
            limits,
            shared: store.is_shared(),
            window_size,
            store,
            counters: Mutex::new(counters),
        }
    }

    /// Relay A: the next `seq` with the pair keys, when the lock alone can hand it out.
    pub fn try_allocate(&self) -> Option<Exchange> {
        match self.allocate() {
            Allocation::Ready(exchange) => Some(exchange),
            Allocation::Stopped | Allocation::Expire | Allocation::Reserve => None,
        }
    }

    fn allocate(&self) -> Allocation {
        let now = Instant::now();
        let mut counters = self.lock();
        if counters.stopped {
            return Allocation::Stopped;
        }
        let idle_here = !self.shared && self.idle(&counters, now);
        if self.role != Role::Outbound || self.worn_out(&counters) || idle_here {
            return Allocation::Expire;
        }
        let seq = if !self.shared {
            counters.next_seq += 1;
            counters.next_seq - 1
        } else if counters.reserved_next <= counters.reserved_last {
            counters.reserved_next += 1;
            counters.reserved_next - 1
        } else {
            return Allocation::Reserve;
        };
        if seq > self.limits.max_exchanges {
            return Allocation::Expire;
        }
        Allocation::Ready(self.exchange(&mut counters, seq, now))
    }

    /// Relay A with a shared store: takes a newly reserved block and hands out its first number.
    fn allocate_from(&self, block: RangeInclusive<u64>) -> Allocation {
        let now = Instant::now();
        let mut counters = self.lock();
        counters.reserved_next = block.start() + 1;
        counters.reserved_last = *block.end();
        if counters.stopped {
            return Allocation::Stopped;
        }
        if *block.start() > self.limits.max_exchanges {
            return Allocation::Expire;
        }
        Allocation::Ready(self.exchange(&mut counters, *block.start(), now))
    }

    pub(crate) fn accept(&self, seq: u64) -> Acceptance {
        let now = Instant::now();
        let mut counters = self.lock();
        if counters.stopped {
            return Acceptance::Stopped;
        }
        if self.shared {
            let past_age = self.limits.store_ttl(self.created_at).is_none();
            if past_age || self.worn_out(&counters) || seq > self.limits.max_exchanges {
                return Acceptance::Expire;
            }
            return Acceptance::Check;
        }
        if self.worn_out(&counters) || self.idle(&counters, now) {
            return Acceptance::Expire;
        }
        let window = counters.window.get_or_insert_with(|| ReplayWindow::new(DEFAULT_WINDOW));
        match window.check_and_mark(seq) {
            Ok(()) => Acceptance::Ready(Ok(self.exchange(&mut counters, seq, now))),
            Err(error) => Acceptance::Ready(Err(SessionError::Replay(error))),
        }
    }

    /// Counts an exchange the shared store accepted.
    fn accepted(&self, seq: u64) -> Exchange {
        let now = Instant::now();
        let mut counters = self.lock();
        self.exchange(&mut counters, seq, now)
    }

    /// Relay B with a shared store: queues `seq` for the store's atomic replay check, whose
    /// outcome goes to `sender`. Unless a check task runs, one starts on the calling thread. It
    /// checks the waiting numbers in batches until none is left, so the store call and the
    /// replies stay on the thread of the exchange that started it. `session` receives `Retire`
    /// when the pair must leave memory.
    pub(crate) fn queue_check(
        self: &Arc<Self>,
        seq: u64,
        sender: OneshotSender<Reply>,
        session: &Addr<PeerSession>,
    ) {
        let start = {
            let mut counters = self.lock();
            if counters.stopped {
                drop(counters);
                let _ = sender.send(Err(SessionError::Expired));
                return;
            }
            counters.waiting.push((seq, sender));
            !std::mem::replace(&mut counters.checking, true)
        };
        if start {
            actix::spawn(Arc::clone(self).run_checks(session.clone()));
        }
    }

    /// Sends the waiting numbers to the store, at most [`MAX_CHECK_BATCH`] per call, and replies
    /// to their callers, until no number waits.
    async fn run_checks(self: Arc<Self>, session: Addr<PeerSession>) {
        let mut task = CheckTask { core: Arc::clone(&self), done: false };
        loop {
            // Lets the other exchanges that are ready on this thread queue their numbers first,
            // so that under load one call checks more of them.
            tokio::task::yield_now().await;
            let batch: Vec<(u64, OneshotSender<Reply>)> = {
                let mut counters = self.lock();
                if counters.waiting.is_empty() {
                    counters.checking = false;
                    task.done = true;
                    return;
                }
                let count = counters.waiting.len().min(MAX_CHECK_BATCH);
                counters.waiting.drain(..count).collect()
            };
            let Some(ttl) = self.limits.store_ttl(self.created_at) else {
                // Past its maximum age: the store drops the pair by its lifetime.
                for (_, sender) in batch {
                    let _ = sender.send(Err(SessionError::Expired));
                }
                session.do_send(Retire);
                continue;
            };
            let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
            let result = self.store.accept_seqs(&self.pair_id, &seqs, self.window_size, ttl).await;
            if self.reply_to_batch(batch, result) {
                // Expired in the store (idle or too old) or removed by another process.
                session.do_send(Retire);
            }
        }
    }

    /// Replies to the callers of one replay check, in the order the store returned the
    /// outcomes. Returns whether the store no longer has the pair.
    fn reply_to_batch(
        &self,
        batch: Vec<(u64, OneshotSender<Reply>)>,
        result: Result<Vec<SeqCheck>, StoreError>,
    ) -> bool {
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
                return false;
            }
        };
        let mut pair_missing = false;
        for ((seq, sender), outcome) in batch.into_iter().zip(outcomes) {
            let reply = match outcome {
                SeqCheck::Accepted => Ok(self.accepted(seq)),
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
        pair_missing
    }

    /// Marks the session stopped and replies to every waiting caller, because no check will run
    /// for them.
    fn stop(&self) {
        self.fail_waiting(|counters| counters.stopped = true, || Err(SessionError::Expired));
    }

    /// Applies `mark` to the counters and sends `reply()` to every number waiting for a check,
    /// under one lock, so no number can queue in between.
    fn fail_waiting(&self, mark: impl FnOnce(&mut Counters), reply: impl Fn() -> Reply) {
        let waiting = {
            let mut counters = self.lock();
            mark(&mut counters);
            std::mem::take(&mut counters.waiting)
        };
        for (_, sender) in waiting {
            // A caller that stopped waiting drops the reply.
            let _ = sender.send(reply());
        }
    }

    fn exchange(&self, counters: &mut Counters, seq: u64, now: Instant) -> Exchange {
        counters.last_used = now;
        counters.exchanges += 1;
        Exchange {
            pair_id: self.pair_id,
            client_id: self.client_id.clone(),
            seq,
            keys: Arc::clone(&self.keys),
        }
    }

    /// Returns whether the pair reached its maximum age or exchange count, in whichever process
    /// it was used.
    fn worn_out(&self, counters: &Counters) -> bool {
        let age = Duration::from_secs(unix_now().saturating_sub(self.created_at));
        age >= self.limits.max_age || counters.exchanges >= self.limits.max_exchanges
    }

    fn idle(&self, counters: &Counters, now: Instant) -> bool {
        now.saturating_duration_since(counters.last_used) >= self.limits.idle_timeout
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // Every change under the lock is a few plain assignments, so a poisoned lock is consistent.
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Relay B's running check task. A task that is dropped before it finished (its worker stopped)
/// lets the next caller start a new one, and fails the numbers waiting for it, so no caller
/// waits for a task that is gone.
struct CheckTask {
    core: Arc<SessionCore>,
    done: bool,
}

impl Drop for CheckTask {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let reason = "replay check task stopped before it finished";
        self.core.fail_waiting(
            |counters| counters.checking = false,
            || Err(SessionError::Store(reason.to_owned())),
        );
    }
}

/// The actor owning one pair.
pub struct PeerSession {
    core: Arc<SessionCore>,
    registry: SessionRegistry,
    serial: u64,
    /// Relay A with a shared store: when the pair's lifetime in the store was last set.
    refreshed: Instant,
}

type Reply = Result<Exchange, SessionError>;

impl PeerSession {
    pub fn new(
        snapshot: PairSnapshot,
        limits: SessionLimits,
        registry: SessionRegistry,
        serial: u64,
    ) -> Self {
        let store = Arc::clone(registry.store());
        let core = Arc::new(SessionCore::new(snapshot, limits, store));
        Self { core, registry, serial, refreshed: Instant::now() }
    }

    /// Returns the counters this session shares with the handles of its callers.
    pub fn core(&self) -> Arc<SessionCore> {
        Arc::clone(&self.core)
    }

    /// Stops the session and removes the pair from memory and from the store.
    fn expire(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(pair = %self.core.pair_id.short(), role = self.core.role.as_str(), "pair expired");
        self.stop(ctx);
        self.registry.forget(self.core.pair_id, self.core.role, self.serial);
    }

    /// Stops a session this process no longer uses: with a shared store other processes may
    /// still use the pair, so it stays stored, otherwise it is removed.
    fn leave_memory(&mut self, ctx: &mut Context<Self>) {
        if self.core.shared {
            self.evict(ctx);
        } else {
            self.expire(ctx);
        }
    }

    /// Stops the session and removes it from this process's memory only.
    fn evict(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(pair = %self.core.pair_id.short(), role = self.core.role.as_str(), "pair left memory");
        self.stop(ctx);
        self.registry.evict(self.core.pair_id, self.core.role, self.serial);
    }

    /// Marks the core stopped, so callers come to the actor and find it gone, replies to every
    /// waiting caller and stops the actor.
    fn stop(&mut self, ctx: &mut Context<Self>) {
        self.core.stop();
        ctx.stop();
    }

    /// Relay A with a shared store: sets the pair's lifetime in the store again after use, so
    /// that the pair stays stored while this process uses numbers of a reserved block.
    fn refresh(&mut self, ctx: &mut Context<Self>) {
        let Some(ttl) = self.core.limits.store_ttl(self.core.created_at) else { return };
        self.refreshed = Instant::now();
        let store = Arc::clone(self.registry.store());
        let pair_id = self.core.pair_id;
        let touch = async move { store.touch_pair(&pair_id, Role::Outbound, ttl).await };
        ctx.spawn(touch.into_actor(self).map(move |result, _, _| match result {
            Ok(true) => {}
            Ok(false) => tracing::debug!(pair = %pair_id.short(), "pair is no longer in the state store"),
            Err(error) => {
                tracing::debug!(pair = %pair_id.short(), %error, "could not refresh the pair's lifetime")
            }
        }));
    }

    /// Replies with a ready exchange, or stops the session for an expired pair.
    fn allocation_reply(&mut self, allocation: Allocation, ctx: &mut Context<Self>) -> Reply {
        match allocation {
            Allocation::Ready(exchange) => Ok(exchange),
            Allocation::Stopped => Err(SessionError::Expired),
            // `allocate_from` never returns `Reserve`, so this arm only stops an expired pair.
            Allocation::Expire | Allocation::Reserve => {
                self.expire(ctx);
                Err(SessionError::Expired)
            }
        }
    }

    /// Relay A with a shared store: reserves the next block and hands out its first number.
    fn reserve_block(&mut self, ctx: &mut Context<Self>) -> SeqReply {
        let Some(ttl) = self.core.limits.store_ttl(self.core.created_at) else {
            self.expire(ctx);
            return SeqReply::Now(Err(SessionError::Expired));
        };
        let store = Arc::clone(self.registry.store());
        let pair_id = self.core.pair_id;
        let reserve = async move { store.reserve_seqs(&pair_id, SEQ_BLOCK, ttl).await };
        let handled = reserve.into_actor(self).map(|result, session, ctx| match result {
            Ok(Some(block)) => {
                session.refreshed = Instant::now();
                let allocation = session.core.allocate_from(block);
                session.allocation_reply(allocation, ctx)
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
}

/// A session's reply to `AllocateSeq` or `AcceptSeq`: sent at once, after a store call, or
/// after the replay check the `seq` waits for.
///
/// A reply known at once is sent before the handler returns, so it arrives even when the
/// session stops in the same step (an expired pair). Actix drops the futures of a stopping
/// actor, so a future reply would be lost there. Replay checks run in a task of their own, and
/// a stopping session replies to the callers still waiting for one.
pub enum SeqReply {
    /// Sent at once.
    Now(Reply),
    /// After a store call that holds back the session's other messages (relay A's block
    /// reservation, so concurrent allocations wait for one block instead of reserving many).
    Atomic(AtomicResponse<PeerSession, Reply>),
    /// After relay B's replay check in a shared store, which the session's check task runs.
    Check { seq: u64, core: Arc<SessionCore> },
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
            SeqReply::Check { seq, core } => {
                // A message sent with `do_send` has no sender; its seq is not checked either, so
                // the window keeps it free for a later copy.
                if let Some(tx) = tx {
                    core.queue_check(seq, tx, &ctx.address());
                }
            }
        }
    }
}

impl Actor for PeerSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let period =
            (self.core.limits.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        ctx.run_interval(period, |_, ctx| ctx.notify(CheckExpiry));
    }
}

impl Handler<CheckExpiry> for PeerSession {
    type Result = ();

    fn handle(&mut self, _: CheckExpiry, ctx: &mut Self::Context) {
        let (worn_out, idle, last_used) = {
            let counters = self.core.lock();
            (self.core.worn_out(&counters), self.core.idle(&counters, Instant::now()), counters.last_used)
        };
        if worn_out {
            self.expire(ctx);
        } else if idle {
            self.leave_memory(ctx);
        } else if self.core.shared && self.core.role == Role::Outbound && last_used > self.refreshed {
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

impl Handler<AllocateSeq> for PeerSession {
    type Result = SeqReply;

    fn handle(&mut self, _: AllocateSeq, ctx: &mut Self::Context) -> Self::Result {
        match self.core.allocate() {
            Allocation::Reserve => self.reserve_block(ctx),
            allocation => SeqReply::Now(self.allocation_reply(allocation, ctx)),
        }
    }
}

impl Handler<AcceptSeq> for PeerSession {
    type Result = SeqReply;

    fn handle(&mut self, message: AcceptSeq, ctx: &mut Self::Context) -> Self::Result {
        match self.core.accept(message.seq) {
            Acceptance::Ready(reply) => SeqReply::Now(reply),
            Acceptance::Check => SeqReply::Check { seq: message.seq, core: self.core() },
            Acceptance::Stopped => SeqReply::Now(Err(SessionError::Expired)),
            Acceptance::Expire => {
                self.expire(ctx);
                SeqReply::Now(Err(SessionError::Expired))
            }
        }
    }
}
