//! `SessionRegistry`: finds the `PeerSession` of a pair, starting it from the state store when
//! this process does not hold it.
//!
//! The registry is shared by all HTTP workers. Each session actor runs on the worker that
//! created it; its address works from every worker.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use actix::{Actor, Addr};
use api_relay_protocol::{ClientId, PairId, PairKeys};

use crate::{PairSnapshot, PeerSession, SessionLimits, StateStore, StoreError};

/// A live session as the request path sees it: the actor, plus the immutable parts of the pair
/// so a handler can open items before it asks the actor to accept the `seq`.
#[derive(Clone)]
pub struct SessionHandle {
    pub addr: Addr<PeerSession>,
    pub pair_id: PairId,
    pub client_id: ClientId,
    pub keys: Arc<PairKeys>,
}

/// Map from pair id to live session, backed by a state store.
#[derive(Clone)]
pub struct SessionRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    sessions: RwLock<HashMap<PairId, SessionHandle>>,
    store: Arc<dyn StateStore>,
    limits: SessionLimits,
}

impl SessionRegistry {
    pub fn new(store: Arc<dyn StateStore>, limits: SessionLimits) -> Self {
        let inner = Inner { sessions: RwLock::default(), store, limits };
        Self { inner: Arc::new(inner) }
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.inner.store
    }

    /// Stores a new pair and starts its session on the current worker.
    ///
    /// # Errors
    /// `StoreError` when the store did not take the snapshot; the pair must not be used then.
    pub async fn insert(&self, snapshot: PairSnapshot) -> Result<SessionHandle, StoreError> {
        self.inner.store.save_pair(&snapshot).await?;
        Ok(self.start(snapshot))
    }

    /// The session of `pair_id`: from memory, else loaded from the store, else `None`.
    ///
    /// # Errors
    /// `StoreError` when the store could not be asked.
    pub async fn find(&self, pair_id: &PairId) -> Result<Option<SessionHandle>, StoreError> {
        if let Some(addr) = self.live(pair_id) {
            return Ok(Some(addr));
        }
        if !self.inner.store.is_shared() {
            return Ok(None);
        }
        let Some(snapshot) = self.inner.store.load_pair(pair_id).await? else {
            return Ok(None);
        };
        Ok(Some(self.start(snapshot)))
    }

    /// Number of sessions held in memory.
    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops a pair from memory and from the store; called by a session that expired.
    pub fn forget(&self, pair_id: PairId) {
        self.sessions_mut().remove(&pair_id);
        let store = Arc::clone(&self.inner.store);
        actix::spawn(async move {
            if let Err(error) = store.remove_pair(&pair_id).await {
                tracing::warn!(pair = %pair_id.short(), %error, "could not remove expired pair from the state store");
            }
        });
    }

    /// Starts a session unless one is already live for the pair (another worker may have
    /// loaded it meanwhile), and returns the live one.
    fn start(&self, snapshot: PairSnapshot) -> SessionHandle {
        let mut sessions = self.sessions_mut();
        if let Some(handle) = sessions.get(&snapshot.pair_id).filter(|handle| handle.addr.connected()) {
            return handle.clone();
        }
        let pair_id = snapshot.pair_id;
        let client_id = snapshot.client_id.clone();
        let keys = Arc::clone(&snapshot.keys);
        let addr = PeerSession::new(snapshot, self.inner.limits, self.clone()).start();
        let handle = SessionHandle { addr, pair_id, client_id, keys };
        sessions.insert(pair_id, handle.clone());
        handle
    }

    fn live(&self, pair_id: &PairId) -> Option<SessionHandle> {
        self.sessions().get(pair_id).filter(|handle| handle.addr.connected()).cloned()
    }

    fn sessions(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PairId, SessionHandle>> {
        // Every write is a single insert or remove, so a poisoned map is still consistent.
        self.inner.sessions.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sessions_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PairId, SessionHandle>> {
        self.inner.sessions.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
