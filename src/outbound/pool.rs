//! The pair pool of relay A: a few pairs per peer origin, created on first use.
//!
//! The first request to a peer pairs (one `POST /api/mte-pair` for the whole pool) while
//! concurrent requests to the same peer wait for that pairing instead of starting their own.
//! The pairs' sessions are spread over the HTTP workers, and later requests take the pool's
//! pairs round-robin among those on their own worker, so an exchange rarely waits for another
//! thread. When the peer reports it lost a pair (560),
//! the pair expired (567) or the client id is no longer valid (566, which also drops the id),
//! the whole generation of pairs is dropped once, and the next request pairs again; a stale
//! report about an older generation changes nothing.
//!
//! With a shared state store, each pairing also stores the pool (client id and pair ids) under
//! the peer origin. On a pool miss relay A looks there before it pairs, so a restarted relay A,
//! or another relay A process sharing the store, reuses the stored pairs. Dropping a generation
//! removes its stored pool too, unless another process has stored a newer one meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use api_relay_actors::{
    PairSnapshot, PoolRecord, Retire, Role, SessionHandle, SessionRegistry, StoreError, Workers,
};
use api_relay_protocol::pairing::{PairingInitiator, PairingResponse};
use api_relay_protocol::{ClientId, ProtocolError};

use crate::error::{RelayCode, RelayError};
use crate::headers;
use crate::metrics::RelayMetrics;
use crate::outbound::peer::{PeerOrigin, resend_while_unreachable, send_error};

/// Maximum bytes of a pairing answer relay A reads: room for 64 pairs of about 1.6 KiB each.
const MAX_PAIRING_RESPONSE_BYTES: usize = 128 * 1024;

/// Smallest number of peers at which a new peer first drops the peers that have no live pair.
const MIN_PRUNE_PEERS: usize = 64;

/// Pairs of every peer this relay talks to.
pub struct PairPool {
    peers: RwLock<Peers>,
    registry: SessionRegistry,
    size: usize,
    window: u64,
    psk: Option<Vec<u8>>,
    timeout: Duration,
}

/// Map from origin key to the peer's pairs.
///
/// An application with the outbound token can name any origin in `x-mte-upstream`, and each one
/// gets an entry, even when pairing with it fails. So a new peer that finds `prune_at` entries
/// first drops those that no request is using and that have no live pair. Then `prune_at`
/// becomes twice the remaining count, at least `MIN_PRUNE_PEERS`. The map grows only with peers
/// that have live pairs, at an amortised constant cost per new peer.
struct Peers {
    by_origin: HashMap<String, Arc<PeerPairs>>,
    prune_at: usize,
}

impl Default for Peers {
    fn default() -> Self {
        Self { by_origin: HashMap::new(), prune_at: MIN_PRUNE_PEERS }
    }
}

impl Peers {
    fn get_or_insert(&mut self, key: &str) -> Arc<PeerPairs> {
        if let Some(peer) = self.by_origin.get(key) {
            return Arc::clone(peer);
        }
        if self.by_origin.len() >= self.prune_at {
            // The map owns one reference, and each request working with the peer owns another.
            self.by_origin.retain(|_, peer| Arc::strong_count(peer) > 1 || peer.has_live_pairs());
            self.prune_at = (2 * self.by_origin.len()).max(MIN_PRUNE_PEERS);
        }
        Arc::clone(self.by_origin.entry(key.to_owned()).or_default())
    }
}

/// Pairs of one peer.
#[derive(Default)]
struct PeerPairs {
    /// Held while pairing, so one request pairs and the others wait for its result.
    pairing: tokio::sync::Mutex<()>,
    state: RwLock<PoolState>,
    next: AtomicUsize,
}

#[derive(Default)]
struct PoolState {
    generation: u64,
    pairs: Vec<SessionHandle>,
    client_id: Option<ClientId>,
    /// The stored pool this generation was saved as or restored from (shared store only).
    record: Option<PoolRecord>,
    /// The stored pool of the last dropped generation, never restored again even while its
    /// removal from the store is still on its way.
    dropped: Option<PoolRecord>,
}

/// One pair taken from the pool for one exchange.
#[derive(Clone)]
pub struct Lease {
    pub session: SessionHandle,
    pub generation: u64,
}

impl PairPool {
    pub fn new(
        registry: SessionRegistry,
        size: usize,
        window: u64,
        psk: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Self {
        Self { peers: RwLock::default(), registry, size, window, psk, timeout }
    }

    /// A pair for `origin`. When the pool is empty, it restores the pool stored in a shared
    /// state store, or else pairs.
    ///
    /// # Errors
    /// `RelayError` when pairing failed (peer unreachable, timed out or rejected the pairing) or
    /// the shared state store did not respond.
    pub async fn acquire(
        &self,
        origin: &PeerOrigin,
        client: &awc::Client,
        metrics: &RelayMetrics,
    ) -> Result<Lease, RelayError> {
        let peer = self.peer(origin);
        if let Some(lease) = peer.take() {
            return Ok(lease);
        }
        let _pairing = peer.pairing.lock().await;
        if let Some(lease) = peer.take() {
            return Ok(lease);
        }
        if let Some(lease) = self.restore(origin, &peer).await? {
            return Ok(lease);
        }
        let client_id = peer.read().client_id.clone();
        let had_client_id = client_id.is_some();
        metrics.pairing("outbound", "started");
        let paired = match self.pair(origin, client, client_id).await {
            // The peer no longer accepts the id this relay held (its secret was rotated out):
            // fetch a new one and pair once more.
            Err(error) if had_client_id && error.relay_code() == Some(RelayCode::InvalidClientId) => {
                peer.write().client_id = None;
                self.pair(origin, client, None).await
            }
            other => other,
        };
        metrics.pairing("outbound", if paired.is_ok() { "succeeded" } else { "failed" });
        let (client_id, sessions) = paired?;
        let record = self.save_pool(origin, &client_id, &sessions).await;
        let mut state = peer.write();
        state.generation += 1;
        state.pairs = sessions;
        state.client_id = Some(client_id);
        state.record = record;
        drop(state);
        peer.take().ok_or_else(|| RelayError::BadGateway {
            hop: "peer relay",
            reason: "pairing returned no pairs".into(),
        })
    }

    /// Drops the generation of pairs `lease` came from; with `forget_client_id`, also the
    /// client id, so the next pairing asks for a new one first.
    pub fn discard(&self, origin: &PeerOrigin, lease: &Lease, forget_client_id: bool) {
        let peer = self.peer(origin);
        let mut state = peer.write();
        if state.generation != lease.generation {
            return;
        }
        // The dropped sessions take no more exchanges here, so they leave memory now instead of
        // once they have been idle for `PAIR_IDLE_TIMEOUT_SECS`. An exchange that still holds a
        // lease of them gets a closed mailbox and takes a pair of the next pool.
        for session in state.pairs.drain(..) {
            session.addr.do_send(Retire);
        }
        if forget_client_id {
            state.client_id = None;
        }
        if let Some(record) = state.record.take() {
            state.dropped = Some(record.clone());
            let store = std::sync::Arc::clone(self.registry.store());
            let key = origin.key().to_owned();
            actix::spawn(async move {
                if let Err(error) = store.remove_pool(&key, &record).await {
                    tracing::warn!(peer = %key, %error, "could not remove dropped pairs from the state store");
                }
            });
        }
    }

    /// Restores the pool stored for `origin` in a shared state store, skipping pairs that are
    /// no longer stored. Returns `None` when there is nothing to restore.
    async fn restore(&self, origin: &PeerOrigin, peer: &PeerPairs) -> Result<Option<Lease>, RelayError> {
        let store = self.registry.store();
        if !store.is_shared() {
            return Ok(None);
        }
        let Some(record) = store.load_pool(origin.key()).await.map_err(store_unavailable)? else {
            return Ok(None);
        };
        if peer.read().dropped.as_ref() == Some(&record) {
            return Ok(None);
        }
        let mut sessions = Vec::with_capacity(record.pair_ids.len());
        for pair_id in &record.pair_ids {
            let found = self.registry.find_as(pair_id, Role::Outbound).await.map_err(store_unavailable)?;
            if let Some(session) = found.filter(|session| session.client_id == record.client_id) {
                sessions.push(session);
            }
        }
        if sessions.is_empty() {
            return Ok(None);
        }
        tracing::info!(peer = %origin, pairs = sessions.len(), client = record.client_id.uuid(), "reusing stored pairs for peer relay");
        let mut state = peer.write();
        state.generation += 1;
        state.pairs = sessions;
        state.client_id = Some(record.client_id.clone());
        state.record = Some(record);
        drop(state);
        Ok(peer.take())
    }

    /// Stores the pool of a new pairing in a shared state store. A failure only costs the reuse
    /// after a restart, so it is logged and the pairs are used anyway.
    async fn save_pool(
        &self,
        origin: &PeerOrigin,
        client_id: &ClientId,
        sessions: &[SessionHandle],
    ) -> Option<PoolRecord> {
        let store = self.registry.store();
        if !store.is_shared() {
            return None;
        }
        let pair_ids = sessions.iter().map(|session| session.pair_id).collect();
        let record = PoolRecord { client_id: client_id.clone(), pair_ids };
        // No stored pair outlives its maximum age, so neither does the pool that lists them.
        let ttl = self.registry.limits().max_age;
        match store.save_pool(origin.key(), &record, ttl).await {
            Ok(()) => Some(record),
            Err(error) => {
                tracing::warn!(peer = %origin, %error, "could not store the pairs for reuse after a restart");
                None
            }
        }
    }

    /// The pairs of `origin`, created empty on first use. Every exchange looks its peer up, so
    /// the lookup takes only the read lock and copies no key. Only the first lookups of a new
    /// peer take the write lock, at most one per worker thread.
    fn peer(&self, origin: &PeerOrigin) -> Arc<PeerPairs> {
        let peers = self.peers.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(peer) = peers.by_origin.get(origin.key()) {
            return Arc::clone(peer);
        }
        drop(peers);
        self.peers.write().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(origin.key())
    }

    async fn pair(
        &self,
        origin: &PeerOrigin,
        client: &awc::Client,
        client_id: Option<ClientId>,
    ) -> Result<(ClientId, Vec<SessionHandle>), RelayError> {
        let client_id = match client_id {
            Some(id) => id,
            None => fetch_client_id(origin, client, self.timeout).await?,
        };
        let initiator = PairingInitiator::new(self.size);
        let request = initiator.request(Some(&client_id));
        let timeout = self.timeout;
        let send = || {
            let sending = client.post(origin.url("/api/mte-pair")).send_json(&request);
            async move { sending.await.map_err(|error| send_error(error, "peer relay", timeout)) }
        };
        let mut response =
            resend_while_unreachable(origin, "pairing request", send(), |_| Some(send())).await?;
        let status = response.status().as_u16();
        if status != 200 {
            tracing::warn!(peer = %origin, status, "peer relay rejected the pairing request");
            return Err(match RelayCode::from_status(status) {
                Some(RelayCode::InvalidClientId) => {
                    RelayError::relay(RelayCode::InvalidClientId, "peer rejected the client id")
                }
                _ => RelayError::PeerRejected { stage: "pairing request", status },
            });
        }
        let answer: PairingResponse =
            response.json().limit(MAX_PAIRING_RESPONSE_BYTES).await.map_err(|error| {
                RelayError::BadGateway { hop: "peer relay", reason: format!("pairing answer: {error}") }
            })?;
        let (client_id, pairs) = initiator.complete(&answer, self.psk.as_deref()).map_err(|error| {
            if error == ProtocolError::KeyConfirmation {
                tracing::error!(peer = %origin, "{error}");
            }
            RelayError::BadGateway { hop: "peer relay", reason: error.to_string() }
        })?;
        let mut sessions = Vec::with_capacity(pairs.len());
        for (index, pair) in pairs.into_iter().enumerate() {
            let snapshot =
                PairSnapshot::new(pair.pair_id, client_id.clone(), Role::Outbound, pair.keys, self.window);
            let session = self.registry.insert_spread(snapshot, index).await.map_err(|error| {
                tracing::error!(peer = %origin, %error, "could not store a new pair");
                RelayError::StoreUnavailable { reason: format!("could not store the new pair: {error}") }
            })?;
            sessions.push(session);
        }
        tracing::info!(peer = %origin, pairs = sessions.len(), client = client_id.uuid(), "paired with peer relay");
        Ok((client_id, sessions))
    }
}

impl PeerPairs {
    /// The next pair in turn among those whose session runs on the calling worker, or among all
    /// pairs when none does.
    fn take(&self) -> Option<Lease> {
        let state = self.read();
        let current_worker = Workers::current();
        let local = |session: &&SessionHandle| current_worker.is_some() && session.worker == current_worker;
        let local_count = state.pairs.iter().filter(local).count();
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let session = match local_count {
            0 if state.pairs.is_empty() => return None,
            0 => &state.pairs[turn % state.pairs.len()],
            count => state.pairs.iter().filter(local).nth(turn % count)?,
        };
        Some(Lease { session: session.clone(), generation: state.generation })
    }

    /// Returns whether any pair of the current generation still has a running session. Sessions
    /// stop when they expire or sit idle, so a peer the application stopped naming ends up with
    /// none.
    fn has_live_pairs(&self) -> bool {
        self.read().pairs.iter().any(|session| session.addr.connected())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, PoolState> {
        // Writers replace whole fields, so a poisoned state is still consistent.
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PoolState> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn store_unavailable(error: StoreError) -> RelayError {
    tracing::error!(%error, "state store lookup of stored pairs failed");
    RelayError::StoreUnavailable { reason: error.to_string() }
}

/// Asks the peer for a new client id with `HEAD /api/mte-relay`.
async fn fetch_client_id(
    origin: &PeerOrigin,
    client: &awc::Client,
    timeout: Duration,
) -> Result<ClientId, RelayError> {
    let send = || {
        let sending = client.head(origin.url("/api/mte-relay")).send();
        async move { sending.await.map_err(|error| send_error(error, "peer relay", timeout)) }
    };
    let response = resend_while_unreachable(origin, "client id request", send(), |_| Some(send())).await?;
    let invalid = |reason: &str| RelayError::BadGateway { hop: "peer relay", reason: reason.to_owned() };
    if !response.status().is_success() {
        return Err(invalid("HEAD /api/mte-relay did not succeed"));
    }
    let value = response
        .headers()
        .get(headers::RELAY)
        .ok_or_else(|| invalid("no x-mte-relay header in the answer"))?;
    let text = value.to_str().map_err(|_| invalid("x-mte-relay is not text"))?;
    ClientId::parse(text).map_err(|_| invalid("x-mte-relay holds no valid client id"))
}

#[cfg(test)]
mod tests {
    use api_relay_actors::{MemoryStore, SessionLimits};
    use api_relay_protocol::{ClientIdSigner, PairId, PairKeys};

    use super::*;

    fn pool() -> PairPool {
        let limits = SessionLimits {
            idle_timeout: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
            max_exchanges: 1000,
        };
        let registry = SessionRegistry::new(Arc::new(MemoryStore::new()), limits);
        PairPool::new(registry, 1, 1024, None, Duration::from_secs(5))
    }

    fn origin(n: usize) -> PeerOrigin {
        PeerOrigin::parse(&format!("http://relay-b-{n}.example.com")).expect("a valid origin")
    }

    fn peer_count(pool: &PairPool) -> usize {
        pool.peers.read().expect("lock not poisoned").by_origin.len()
    }

    #[test]
    fn idle_peers_are_pruned() {
        let pool = pool();
        for n in 0..10 * MIN_PRUNE_PEERS {
            drop(pool.peer(&origin(n)));
        }
        assert!(peer_count(&pool) <= MIN_PRUNE_PEERS, "{} peers remain", peer_count(&pool));
        // The same origin keeps its entry between lookups.
        let first = pool.peer(&origin(0));
        assert!(Arc::ptr_eq(&first, &pool.peer(&origin(0))), "a second lookup made a new entry");
    }

    #[actix::test]
    async fn busy_or_paired_peers_survive_pruning() {
        let pool = pool();
        let in_use = pool.peer(&origin(0));
        let paired = pool.peer(&origin(1));
        let pair_id = PairId::random();
        let keys = PairKeys::derive(&[1; 32], &[2; 64], &pair_id, &[3; 32]).keys;
        let client_id = ClientIdSigner::new(b"secret", None).issue();
        let snapshot = PairSnapshot::new(pair_id, client_id, Role::Outbound, keys, 1024);
        let session = pool.registry.insert(snapshot).await.expect("memory store takes the pair");
        paired.write().pairs.push(session.clone());
        drop(paired);

        for n in 2..10 * MIN_PRUNE_PEERS {
            drop(pool.peer(&origin(n)));
        }
        {
            let remaining = pool.peers.read().expect("lock not poisoned");
            let count = remaining.by_origin.len();
            assert!(count <= MIN_PRUNE_PEERS + 2, "{count} peers remain");
            assert!(Arc::ptr_eq(&remaining.by_origin[origin(0).key()], &in_use), "a peer in use was dropped");
            assert!(remaining.by_origin.contains_key(origin(1).key()), "a peer with a live pair was dropped");
        }

        // Once its session stops, the peer with the pair goes at the next pruning too.
        session.addr.do_send(api_relay_actors::Retire);
        for _ in 0..100 {
            if !session.addr.connected() {
                break;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        for n in 10 * MIN_PRUNE_PEERS..20 * MIN_PRUNE_PEERS {
            drop(pool.peer(&origin(n)));
        }
        let kept = pool.peers.read().expect("lock not poisoned").by_origin.contains_key(origin(1).key());
        assert!(!kept, "a peer whose session stopped was kept");
    }
}
