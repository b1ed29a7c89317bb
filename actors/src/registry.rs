//! `SessionRegistry`: finds the `PeerSession` of a pair, starting it from the state store when
//! this process does not hold it.
//!
//! The registry is shared by all HTTP workers. Each session actor runs on one worker: the one
//! that created or loaded it, or, for relay A's pools, the worker [`Workers`] picked. Its
//! address works from every worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use actix::{Actor, Addr, ArbiterHandle, MailboxError};
use api_relay_protocol::{ClientId, PairId, PairKeys};

use crate::session::{Acceptance, SessionCore};
use crate::workers::Workers;
use crate::{
    AcceptSeq, AllocateSeq, Exchange, PairSnapshot, PeerSession, Role, SessionError, SessionLimits,
    StateStore, StoreError,
};

/// A live session as the request path uses it: the actor, its counters, and the immutable parts
/// of the pair so a handler can open items before it requests the `seq`. Every exchange takes a
/// copy, so a copy is one reference count, shared by all copies.
#[derive(Clone)]
pub struct SessionHandle {
    parts: Arc<SessionParts>,
}

/// Parts of a session that all copies of its [`SessionHandle`] share.
pub struct SessionParts {
    pub addr: Addr<PeerSession>,
    core: Arc<SessionCore>,
    pub pair_id: PairId,
    pub client_id: ClientId,
    pub keys: Arc<PairKeys>,
    pub role: Role,
    /// Index of the worker the actor runs on, when it runs on a registered worker.
    pub worker: Option<usize>,
    /// Number of this session among all sessions the registry started, so a stopping session
    /// removes its own entry and never a newer session of the same pair.
    pub(crate) serial: u64,
}

impl std::ops::Deref for SessionHandle {
    type Target = SessionParts;

    fn deref(&self) -> &SessionParts {
        &self.parts
    }
}

impl SessionHandle {
    /// Relay A: the next `seq` of the pair with its keys. It is handed out on the calling thread
    /// when the session needs no store call and has not reached a limit, and by the actor
    /// otherwise. The outer error means the actor has stopped.
    pub async fn allocate_seq(&self) -> Result<Result<Exchange, SessionError>, MailboxError> {
        match self.core.try_allocate() {
            Some(exchange) => Ok(Ok(exchange)),
            None => self.addr.send(AllocateSeq).await,
        }
    }

    /// Relay B: accepts `seq` of the pair once. The in-memory replay window is checked on the
    /// calling thread. A shared store's check runs in a task on the thread of an exchange that
    /// waits for it, batched with the numbers that arrive meanwhile. An expired pair goes
    /// through the actor. The outer error means the session has stopped.
    pub async fn accept_seq(&self, seq: u64) -> Result<Result<Exchange, SessionError>, MailboxError> {
        match self.core.accept(seq) {
            Acceptance::Ready(reply) => Ok(reply),
            Acceptance::Check => {
                let (sender, receiver) = tokio::sync::oneshot::channel();
                self.core.queue_check(seq, sender, &self.addr);
                receiver.await.map_err(|_| MailboxError::Closed)
            }
            Acceptance::Stopped | Acceptance::Expire => self.addr.send(AcceptSeq { seq }).await,
        }
    }
}

/// Map from pair id and role to live session, backed by a state store.
#[derive(Clone)]
pub struct SessionRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    sessions: RwLock<HashMap<(PairId, Role), SessionHandle>>,
    store: Arc<dyn StateStore>,
    limits: SessionLimits,
    next_serial: AtomicU64,
    workers: Workers,
}

impl SessionRegistry {
    pub fn new(store: Arc<dyn StateStore>, limits: SessionLimits) -> Self {
        let inner = Inner {
            sessions: RwLock::default(),
            store,
            limits,
            next_serial: AtomicU64::new(1),
            workers: Workers::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.inner.store
    }

    pub fn limits(&self) -> SessionLimits {
        self.inner.limits
    }

    /// Returns the worker threads that sessions can be placed on.
    pub fn workers(&self) -> &Workers {
        &self.inner.workers
    }

    /// Stores a new pair and starts its session on the current worker.
    ///
    /// # Errors
    /// `StoreError` when the store did not take the snapshot; the pair must not be used then.
    pub async fn insert(&self, snapshot: PairSnapshot) -> Result<SessionHandle, StoreError> {
        self.insert_on(snapshot, None).await
    }

    /// Stores a new pair and starts its session on the worker [`Workers::pick`] gives for the
    /// `n`-th session of a pool, or on the current worker when none registered.
    ///
    /// # Errors
    /// `StoreError` when the store did not take the snapshot; the pair must not be used then.
    pub async fn insert_spread(&self, snapshot: PairSnapshot, n: usize) -> Result<SessionHandle, StoreError> {
        let worker = self.inner.workers.pick(n);
        self.insert_on(snapshot, worker).await
    }

    async fn insert_on(
        &self,
        snapshot: PairSnapshot,
        worker: Option<(usize, ArbiterHandle)>,
    ) -> Result<SessionHandle, StoreError> {
        let ttl = self.inner.limits.store_ttl(snapshot.created_at).unwrap_or(self.inner.limits.idle_timeout);
        self.inner.store.save_pair(&snapshot, ttl).await?;
        Ok(self.start_on(snapshot, worker))
    }

    /// Finds relay B's session of `pair_id`: in memory, else loaded from a shared store.
    ///
    /// # Errors
    /// `StoreError` when the store could not be asked.
    pub async fn find(&self, pair_id: &PairId) -> Result<Option<SessionHandle>, StoreError> {
        self.find_as(pair_id, Role::Inbound).await
    }

    /// Finds the session of `pair_id` in `role`: in memory, else loaded from a shared store. A
    /// stored pair that is past its maximum age or does not open counts as absent.
    ///
    /// # Errors
    /// `StoreError` when the store could not be asked.
    pub async fn find_as(&self, pair_id: &PairId, role: Role) -> Result<Option<SessionHandle>, StoreError> {
        if let Some(handle) = self.live(pair_id, role) {
            return Ok(Some(handle));
        }
        if !self.inner.store.is_shared() {
            return Ok(None);
        }
        let snapshot = match self.inner.store.load_pair(pair_id, role).await {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return Ok(None),
            Err(error @ StoreError::Corrupt { .. }) => {
                tracing::warn!(pair = %pair_id.short(), role = role.as_str(), %error, "ignoring an unreadable stored pair");
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        if self.inner.limits.store_ttl(snapshot.created_at).is_none() {
            return Ok(None);
        }
        Ok(Some(self.start_on(snapshot, None)))
    }

    /// Number of sessions held in memory.
    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops a pair from memory and from the store; called by a session that expired.
    pub(crate) fn forget(&self, pair_id: PairId, role: Role, serial: u64) {
        self.evict(pair_id, role, serial);
        let store = Arc::clone(&self.inner.store);
        actix::spawn(async move {
            if let Err(error) = store.remove_pair(&pair_id, role).await {
                tracing::warn!(pair = %pair_id.short(), %error, "could not remove expired pair from the state store");
            }
        });
    }

    /// Drops a session from memory only and leaves the pair in the store for other processes.
    /// A session of a shared store calls it when it sat idle in this process.
    pub(crate) fn evict(&self, pair_id: PairId, role: Role, serial: u64) {
        let mut sessions = self.sessions_mut();
        if sessions.get(&(pair_id, role)).is_some_and(|handle| handle.serial == serial) {
            sessions.remove(&(pair_id, role));
        }
    }

    /// Starts a session unless one is already live for the pair (another worker may have
    /// loaded it meanwhile), and returns the live one.
    ///
    /// `worker` names the worker to run a new session on; `None` runs it on the current one.
    fn start_on(&self, snapshot: PairSnapshot, worker: Option<(usize, ArbiterHandle)>) -> SessionHandle {
        let key = (snapshot.pair_id, snapshot.role);
        let mut sessions = self.sessions_mut();
        if let Some(handle) = sessions.get(&key).filter(|handle| handle.addr.connected()) {
            return handle.clone();
        }
        let serial = self.inner.next_serial.fetch_add(1, Ordering::Relaxed);
        let pair_id = snapshot.pair_id;
        let role = snapshot.role;
        let client_id = snapshot.client_id.clone();
        let keys = Arc::clone(&snapshot.keys);
        let session = PeerSession::new(snapshot, self.inner.limits, self.clone(), serial);
        let core = session.core();
        let (addr, worker) = match worker {
            Some((index, arbiter)) => (PeerSession::start_in_arbiter(&arbiter, |_| session), Some(index)),
            None => (session.start(), Workers::current()),
        };
        let handle = SessionHandle {
            parts: Arc::new(SessionParts { addr, core, pair_id, client_id, keys, role, worker, serial }),
        };
        sessions.insert(key, handle.clone());
        handle
    }

    fn live(&self, pair_id: &PairId, role: Role) -> Option<SessionHandle> {
        self.sessions().get(&(*pair_id, role)).filter(|handle| handle.addr.connected()).cloned()
    }

    fn sessions(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(PairId, Role), SessionHandle>> {
        // Every write is a single insert or remove, so a poisoned map is still consistent.
        self.inner.sessions.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sessions_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<(PairId, Role), SessionHandle>> {
        self.inner.sessions.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
