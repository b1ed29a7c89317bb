//! State stores: where pair snapshots, sequence numbers, replay windows and relay A's pair pools
//! live between a relay's sessions.
//!
//! `StateStore` is the interface both backends implement. The embedded `MemoryStore` keeps
//! everything in this process: a restarted relay loses its pairs and the peer pairs again. The
//! `RedisStore` (see [`crate::redis_store`]) is shared by several relay processes.
//!
//! Sessions of an unshared store keep `seq` and the replay window in the session actor and never
//! call [`StateStore::reserve_seqs`] or [`StateStore::accept_seqs`]. Sessions of a shared store
//! call them for every block of sequence numbers (relay A) and every batch of exchanges (relay
//! B), because another process may use the same pair at the same time.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::{ClientId, PairId, ProtocolError};
use async_trait::async_trait;
use thiserror::Error;

use crate::supervisor::StoreHealth;
use crate::{PairSnapshot, Role};

/// A state store failure. Messages never contain key material or store credentials.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store could not be reached or did not respond in time.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A stored snapshot could not be read back.
    #[error("stored snapshot of pair {pair} is unreadable: {reason}")]
    Corrupt { pair: String, reason: String },
    /// A new pair was not stored because a pair with the same id and role exists.
    #[error("pair {pair} already exists in the state store")]
    PairExists { pair: String },
}

/// Outcome of checking one `seq` of relay B against a pair's replay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The `seq` was not seen before and is now marked.
    Accepted,
    /// The `seq` was accepted before.
    Replayed,
    /// The `seq` is 0, or older than the window.
    Stale,
    /// The store contains no such pair: it expired or was removed.
    PairNotFound,
}

impl SeqCheck {
    /// Converts a rejection into the protocol error the relay reports; `None` for `Accepted`
    /// and `PairNotFound`.
    pub fn protocol_error(self, seq: u64) -> Option<ProtocolError> {
        match self {
            SeqCheck::Replayed => Some(ProtocolError::Replayed { seq }),
            SeqCheck::Stale => Some(ProtocolError::Stale { seq }),
            SeqCheck::Accepted | SeqCheck::PairNotFound => None,
        }
    }
}

/// Relay A's pairs for one peer origin, kept so a restarted relay A reuses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRecord {
    pub client_id: ClientId,
    pub pair_ids: Vec<PairId>,
}

/// Where pair snapshots are kept.
///
/// Every method with a `ttl` sets the stored pair's remaining lifetime: the store may drop the
/// pair once `ttl` passes without another call that sets it.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Short name for logs and metrics (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Whether other relay processes share this store. Only a shared store's snapshots are
    /// loaded back into sessions, and only sessions of a shared store ask the store for `seq`
    /// blocks and replay checks.
    fn is_shared(&self) -> bool;

    /// Health counters of the store's connections, when it has a supervisor.
    fn health(&self) -> Option<Arc<StoreHealth>> {
        None
    }

    /// Stores a new pair before its pairing answer is sent.
    ///
    /// # Errors
    /// `PairExists` when a pair with this id and role is stored already; the new pair must not
    /// be used then, because the stored one may be live.
    async fn save_pair(&self, snapshot: &PairSnapshot, ttl: Duration) -> Result<(), StoreError>;

    /// Loads a pair this process does not hold in memory.
    async fn load_pair(&self, pair_id: &PairId, role: Role) -> Result<Option<PairSnapshot>, StoreError>;

    /// Removes a pair that reached its maximum age or exchange count.
    async fn remove_pair(&self, pair_id: &PairId, role: Role) -> Result<(), StoreError>;

    /// Sets the remaining lifetime of a pair in use. Returns false when the pair is not stored.
    async fn touch_pair(&self, pair_id: &PairId, role: Role, ttl: Duration) -> Result<bool, StoreError>;

    /// Relay A: reserves the next `count` sequence numbers of a pair for this process. Returns
    /// `None` when the pair is not stored. Numbers of a block that a process never uses are
    /// skipped, never handed out again.
    async fn reserve_seqs(
        &self,
        pair_id: &PairId,
        count: u64,
        ttl: Duration,
    ) -> Result<Option<RangeInclusive<u64>>, StoreError>;

    /// Relay B: checks each of `seqs` in turn against the pair's replay window and marks it, as
    /// one atomic step, and returns one outcome per number in the same order. `window` is the
    /// window size in sequence numbers, a multiple of 64. A session sends the numbers of all
    /// exchanges that arrived while its previous check ran, so a busy pair costs one store round
    /// trip per batch rather than one per exchange.
    async fn accept_seqs(
        &self,
        pair_id: &PairId,
        seqs: &[u64],
        window: u64,
        ttl: Duration,
    ) -> Result<Vec<SeqCheck>, StoreError>;

    /// Relay B: [`StateStore::accept_seqs`] for one number.
    async fn accept_seq(
        &self,
        pair_id: &PairId,
        seq: u64,
        window: u64,
        ttl: Duration,
    ) -> Result<SeqCheck, StoreError> {
        let checks = self.accept_seqs(pair_id, &[seq], window, ttl).await?;
        checks
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Unavailable("replay check returned no outcome".into()))
    }

    /// Relay A: stores the pairs of one peer origin, replacing the previous record.
    async fn save_pool(&self, origin: &str, record: &PoolRecord, ttl: Duration) -> Result<(), StoreError>;

    /// Relay A: loads the pairs of one peer origin.
    async fn load_pool(&self, origin: &str) -> Result<Option<PoolRecord>, StoreError>;

    /// Relay A: removes the pool record of `origin` if it still lists exactly `record`'s pairs,
    /// so that dropping an old generation never removes a newer one.
    async fn remove_pool(&self, origin: &str, record: &PoolRecord) -> Result<(), StoreError>;

    /// Checks the store answers; drives `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// One stored pair of the memory store: the snapshot plus the state a shared session would
/// keep in the store.
#[derive(Debug)]
struct MemoryPair {
    snapshot: PairSnapshot,
    reserved: u64,
    window: ReplayWindow,
}

#[derive(Debug, Default)]
struct MemoryState {
    pairs: HashMap<(PairId, Role), MemoryPair>,
    pools: HashMap<String, PoolRecord>,
}

/// The embedded default: snapshots in maps in this process. It ignores `ttl`: sessions expire
/// their pairs themselves and remove them from this store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding this lock leaves consistent maps (every operation is one
        // insert, get, update or remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn save_pair(&self, snapshot: &PairSnapshot, _ttl: Duration) -> Result<(), StoreError> {
        let mut state = self.state();
        let key = (snapshot.pair_id, snapshot.role);
        if state.pairs.contains_key(&key) {
            return Err(StoreError::PairExists { pair: snapshot.pair_id.short().to_string() });
        }
        let window = snapshot.window.clone().unwrap_or_else(|| ReplayWindow::new(64));
        let pair = MemoryPair { snapshot: snapshot.clone(), reserved: snapshot.next_seq - 1, window };
        state.pairs.insert(key, pair);
        Ok(())
    }

    async fn load_pair(&self, pair_id: &PairId, role: Role) -> Result<Option<PairSnapshot>, StoreError> {
        Ok(self.state().pairs.get(&(*pair_id, role)).map(|pair| pair.snapshot.clone()))
    }

    async fn remove_pair(&self, pair_id: &PairId, role: Role) -> Result<(), StoreError> {
        self.state().pairs.remove(&(*pair_id, role));
        Ok(())
    }

    async fn touch_pair(&self, pair_id: &PairId, role: Role, _ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.state().pairs.contains_key(&(*pair_id, role)))
    }

    async fn reserve_seqs(
        &self,
        pair_id: &PairId,
        count: u64,
        _ttl: Duration,
    ) -> Result<Option<RangeInclusive<u64>>, StoreError> {
        let mut state = self.state();
        let Some(pair) = state.pairs.get_mut(&(*pair_id, Role::Outbound)) else {
            return Ok(None);
        };
        let first = pair.reserved + 1;
        pair.reserved += count.max(1);
        Ok(Some(first..=pair.reserved))
    }

    async fn accept_seqs(
        &self,
        pair_id: &PairId,
        seqs: &[u64],
        _window: u64,
        _ttl: Duration,
    ) -> Result<Vec<SeqCheck>, StoreError> {
        let mut state = self.state();
        let Some(pair) = state.pairs.get_mut(&(*pair_id, Role::Inbound)) else {
            return Ok(vec![SeqCheck::PairNotFound; seqs.len()]);
        };
        let mut check = |seq| match pair.window.check_and_mark(seq) {
            Ok(()) => SeqCheck::Accepted,
            Err(ProtocolError::Replayed { .. }) => SeqCheck::Replayed,
            Err(_) => SeqCheck::Stale,
        };
        Ok(seqs.iter().map(|&seq| check(seq)).collect())
    }

    async fn save_pool(&self, origin: &str, record: &PoolRecord, _ttl: Duration) -> Result<(), StoreError> {
        self.state().pools.insert(origin.to_owned(), record.clone());
        Ok(())
    }

    async fn load_pool(&self, origin: &str) -> Result<Option<PoolRecord>, StoreError> {
        Ok(self.state().pools.get(origin).cloned())
    }

    async fn remove_pool(&self, origin: &str, record: &PoolRecord) -> Result<(), StoreError> {
        let mut state = self.state();
        if state.pools.get(origin) == Some(record) {
            state.pools.remove(origin);
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
