//! State stores: where pair snapshots live between a relay's sessions.
//!
//! `StateStore` is the interface both backends implement. The embedded `MemoryStore` keeps
//! snapshots in this process: a restarted relay loses its pairs and the peer pairs again.

use std::collections::HashMap;
use std::sync::Mutex;

use api_relay_protocol::PairId;
use async_trait::async_trait;
use thiserror::Error;

use crate::PairSnapshot;

/// A state store failure. Messages never contain key material.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A stored snapshot could not be read back.
    #[error("stored snapshot of pair {pair} is unreadable: {reason}")]
    Corrupt { pair: String, reason: String },
}

/// Where pair snapshots are kept.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Short name for logs and metrics (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Whether other relay processes share this store. Only a shared store's snapshots are
    /// loaded back into sessions: an unshared store's copy of a replay window is not kept
    /// current, so reloading it could accept a replay.
    fn is_shared(&self) -> bool;

    /// Stores a new pair before its pairing answer is sent.
    async fn save_pair(&self, snapshot: &PairSnapshot) -> Result<(), StoreError>;

    /// Loads a pair this process does not hold in memory.
    async fn load_pair(&self, pair_id: &PairId) -> Result<Option<PairSnapshot>, StoreError>;

    /// Removes an expired pair.
    async fn remove_pair(&self, pair_id: &PairId) -> Result<(), StoreError>;

    /// Checks the store answers; drives `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The embedded default: snapshots in a map in this process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    pairs: Mutex<HashMap<PairId, PairSnapshot>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn pairs(&self) -> std::sync::MutexGuard<'_, HashMap<PairId, PairSnapshot>> {
        // A panic while holding this lock leaves a consistent map (every operation is one
        // insert, get or remove), so a poisoned lock is safe to keep using.
        self.pairs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

    async fn save_pair(&self, snapshot: &PairSnapshot) -> Result<(), StoreError> {
        self.pairs().insert(snapshot.pair_id, snapshot.clone());
        Ok(())
    }

    async fn load_pair(&self, pair_id: &PairId) -> Result<Option<PairSnapshot>, StoreError> {
        Ok(self.pairs().get(pair_id).cloned())
    }

    async fn remove_pair(&self, pair_id: &PairId) -> Result<(), StoreError> {
        self.pairs().remove(pair_id);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
