//! `RedisStore`: the state store that several relay processes share, so that relays behind a
//! load balancer serve each other's pairs and a restarted relay picks its pairs up again.
//!
//! Keys, with `P` the key prefix (`REDIS_KEY_PREFIX`, default `api-relay`) and `H` the 32 hex
//! digits of a pair id:
//!
//! | key | type | content |
//! |---|---|---|
//! | `P:pair:outbound:{H}` | hash | relay A's record of a pair: `version`, `client`, `created`, `keys` (sealed), `reserved` (last `seq` reserved) |
//! | `P:pair:inbound:{H}` | hash | relay B's record: `version`, `client`, `created`, `window`, `keys` (sealed), `highest`, `floor` |
//! | `P:window:{H}` | string | relay B's replay bitmap of the pair, `window` bits |
//! | `P:pool:<origin>` | string | relay A's pairs for one peer origin: JSON `{"clientId": ..., "pairs": [H, ...]}` |
//!
//! The role is part of the pair key, so relay A and relay B may share one Redis and one prefix.
//! All keys of one pair carry the hash tag `{H}`, so in Redis Cluster they live in one slot and
//! the Lua scripts may touch them together. The key material is sealed with a key derived from
//! `CLIENT_ID_SECRET` (see [`crate::sealing`]). Everything else is stored in clear because none
//! of it is secret: client ids and pair ids travel in clear in `x-mte-relay`.
//!
//! Lifetimes: every pair key expires after the pair's idle timeout, capped at the time left
//! until its maximum age. Each use sets the expiry again (the `seq` reservation of relay A, a
//! periodic refresh while relay A uses a pair, every replay check of relay B), so an idle pair
//! disappears from the store by itself. Pool records expire after the maximum pair age.
//!
//! Every call is bounded by `REDIS_TIMEOUT_MS`, covering the wait for a pooled connection and
//! the command. A pooled connection is not pinged before each use, because that would double the
//! round trips of every exchange. Instead, a connection whose command failed with a connection
//! error or timed out is dropped from the pool, and the next call gets a new one.
//!
//! NOTE: the redis crate (1.8) also gives each command of a connection made by bb8-redis its
//! default response timeout of 500 ms, so a larger `REDIS_TIMEOUT_MS` only gives more time to
//! connect.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::thread::ThreadId;
use std::time::Duration;

use actix::Addr;
use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::{ClientId, PairId};
use async_trait::async_trait;
use bb8_redis::RedisConnectionManager;
use bb8_redis::bb8::{self, PooledConnection, RunError};
use bb8_redis::redis::io::tcp::TcpSettings;
use bb8_redis::redis::{self, ConnectionInfo, IntoConnectionInfo, RedisError, Script};
use serde::{Deserialize, Serialize};

use crate::sealing::{RecordBinding, RecordSealer};
use crate::store::{PoolRecord, SeqCheck};
use crate::supervisor::{SnapshotSupervisor, StoreHealth, SupervisorSettings};
use crate::{PairSnapshot, Role, StateStore, StoreError};

/// Version of the pair record layout, stored in the field `version`.
const RECORD_VERSION: &str = "1";
/// Largest `seq` the replay script handles exactly: Lua numbers are IEEE doubles. At one
/// million exchanges a second a pair would need 285 years to get there.
const MAX_SCRIPT_SEQ: u64 = 1 << 53;
/// Largest replay window a stored record may name (16 Mi sequence numbers, a 2 MiB bitmap), so
/// a corrupt record cannot make the reader allocate without limit.
/// The relay's configuration rejects a larger `REPLAY_WINDOW`.
const MAX_STORED_WINDOW: u64 = 1 << 24;

/// Settings of a Redis store.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL, credentials allowed.
    pub url: String,
    /// Maximum number of connections the store opens, shared out among `threads`.
    pub pool_size: u32,
    /// Threads that call the store: the HTTP workers and the thread of the actix system, which
    /// runs the connection supervisor.
    pub threads: u32,
    /// Bound on every store call, waiting for a connection included.
    pub timeout: Duration,
    /// First part of every key; must not contain `{` or `}`.
    pub key_prefix: String,
    /// `CLIENT_ID_SECRET`, from which the key that seals pair keys at rest is derived.
    pub secret: Vec<u8>,
    /// `CLIENT_ID_SECRET_PREVIOUS`, so records sealed before a rotation still open.
    pub previous_secret: Option<Vec<u8>>,
    /// Probe timing of the connection supervisor.
    pub supervisor: SupervisorSettings,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("pool_size", &self.pool_size)
            .field("threads", &self.threads)
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

/// Names of the keys of one store.
#[derive(Debug, Clone)]
struct KeyNames {
    prefix: String,
}

impl KeyNames {
    fn pair(&self, pair_id: &PairId, role: Role) -> String {
        format!("{}:pair:{}:{{{pair_id}}}", self.prefix, role.as_str())
    }

    fn window(&self, pair_id: &PairId) -> String {
        format!("{}:window:{{{pair_id}}}", self.prefix)
    }

    fn pool(&self, origin: &str) -> String {
        format!("{}:pool:{origin}", self.prefix)
    }
}

/// The Lua scripts, loaded into Redis on first use and again after Redis restarts.
struct Scripts {
    save_pair: Script,
    reserve_seqs: Script,
    accept_seqs: Script,
    remove_pool: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            save_pair: Script::new(include_str!("lua/save_pair.lua")),
            reserve_seqs: Script::new(include_str!("lua/reserve_seqs.lua")),
            accept_seqs: Script::new(include_str!("lua/accept_seqs.lua")),
            remove_pool: Script::new(include_str!("lua/remove_pool.lua")),
        }
    }
}

/// The stored form of a [`PoolRecord`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredPool {
    client_id: String,
    pairs: Vec<String>,
}

impl StoredPool {
    fn text(record: &PoolRecord) -> String {
        let stored = StoredPool {
            client_id: record.client_id.to_string(),
            pairs: record.pair_ids.iter().map(PairId::to_string).collect(),
        };
        serde_json::to_string(&stored).expect("strings serialise")
    }

    fn parse(text: &str) -> Option<PoolRecord> {
        let stored: StoredPool = serde_json::from_str(text).ok()?;
        let client_id = ClientId::parse(&stored.client_id).ok()?;
        let pair_ids = stored.pairs.iter().map(|hex| PairId::parse(hex)).collect::<Result<_, _>>().ok()?;
        Some(PoolRecord { client_id, pair_ids })
    }
}

/// The shared state store on Redis, with a bb8 pool of connections for each thread that calls
/// it.
///
/// A Redis connection reads its replies in a task on the thread that opened it. A call over a
/// connection of another thread wakes that thread to send the command and again to hand back
/// the reply, so each thread opens and uses its own connections.
pub struct RedisStore {
    pools: RwLock<HashMap<ThreadId, bb8::Pool<Manager>>>,
    manager: RedisConnectionManager,
    /// Maximum connections of each thread's pool.
    thread_pool_size: u32,
    timeout: Duration,
    keys: KeyNames,
    sealer: RecordSealer,
    scripts: Scripts,
    health: Arc<StoreHealth>,
    supervisor: OnceLock<Addr<SnapshotSupervisor>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool's manager contains the URL with its password, so it is left out.
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Creates the store and starts its [`SnapshotSupervisor`]. It connects lazily, so an
    /// unreachable Redis is not an error here: the supervisor keeps trying, and `/readyz`
    /// reports the store unreachable. Must run inside an actix system.
    ///
    /// # Errors
    /// `Unavailable` when the URL is not a valid Redis URL or the key prefix contains a brace.
    pub fn start(settings: RedisSettings) -> Result<Arc<Self>, StoreError> {
        if settings.key_prefix.contains(['{', '}']) {
            return Err(StoreError::Unavailable("the key prefix must not contain { or }".into()));
        }
        let manager = RedisConnectionManager::new(connection_info(&settings.url)?).map_err(invalid_url)?;
        let store = Arc::new(Self {
            pools: RwLock::default(),
            manager,
            thread_pool_size: (settings.pool_size / settings.threads.max(1)).max(1),
            timeout: settings.timeout,
            keys: KeyNames { prefix: settings.key_prefix },
            sealer: RecordSealer::new(&settings.secret, settings.previous_secret.as_deref()),
            scripts: Scripts::new(),
            health: Arc::new(StoreHealth::default()),
            supervisor: OnceLock::new(),
        });
        let probed: Arc<dyn StateStore> = Arc::clone(&store) as Arc<dyn StateStore>;
        let supervisor = SnapshotSupervisor::start(&probed, Arc::clone(&store.health), settings.supervisor);
        // The store was created above, so the cell is empty.
        let _ = store.supervisor.set(supervisor);
        Ok(store)
    }

    /// Health counters kept by the supervisor and by every store call.
    pub fn health_counters(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// Runs `work` with a pooled connection, bounded by the store timeout as a whole. A
    /// connection whose command failed on the connection itself, or timed out, leaves the pool.
    async fn bounded<T, F>(&self, operation: &'static str, work: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&mut redis::aio::MultiplexedConnection) -> Result<T, RedisError>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = || {
            StoreError::Unavailable(format!("{operation} timed out after {} ms", self.timeout.as_millis()))
        };
        let result = match tokio::time::timeout_at(deadline, self.connection(operation)).await {
            Err(_) => Err(timed_out()),
            Ok(Err(error)) => Err(error),
            Ok(Ok(mut connection)) => {
                match tokio::time::timeout_at(deadline, work(&mut connection.inner)).await {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(error)) => {
                        connection.broken = is_connection_error(&error);
                        Err(failed(operation, &error))
                    }
                    Err(_) => {
                        connection.broken = true;
                        Err(timed_out())
                    }
                }
            }
        };
        if result.is_err() {
            self.health.record_operation_failure();
        }
        result
    }

    /// Returns the pool of the calling thread, creating it on the thread's first call. A thread
    /// that ends leaves its pool behind, so a process keeps at most one pool per thread it ran.
    fn thread_pool(&self) -> bb8::Pool<Manager> {
        let thread = std::thread::current().id();
        let pools = self.pools.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.get(&thread) {
            return pool.clone();
        }
        drop(pools);
        let mut pools = self.pools.write().unwrap_or_else(PoisonError::into_inner);
        let pool = pools.entry(thread).or_insert_with(|| {
            bb8::Pool::builder()
                .max_size(self.thread_pool_size)
                .connection_timeout(self.timeout)
                .test_on_check_out(false)
                .build_unchecked(Manager { inner: self.manager.clone() })
        });
        pool.clone()
    }

    async fn connection(
        &self,
        operation: &'static str,
    ) -> Result<PooledConnection<'static, Manager>, StoreError> {
        self.thread_pool().get_owned().await.map_err(|error| match error {
            RunError::User(error) => failed(operation, &error),
            RunError::TimedOut => StoreError::Unavailable(format!(
                "{operation}: no connection within {} ms",
                self.timeout.as_millis()
            )),
        })
    }
}

/// Reads a Redis URL into connection settings with `TCP_NODELAY` on, as Redis sets it on its own
/// side of each connection. Nagle's algorithm then never delays a short command while an earlier
/// short segment is unacknowledged.
///
/// # Errors
/// `Unavailable` when the URL is not a valid Redis URL.
fn connection_info(url: &str) -> Result<ConnectionInfo, StoreError> {
    let info = url.into_connection_info().map_err(invalid_url)?;
    Ok(info.set_tcp_settings(TcpSettings::default().set_nodelay(true)))
}

/// Builds the error for a URL that is not a valid Redis URL. The message never repeats the URL,
/// which may contain a password.
fn invalid_url(error: RedisError) -> StoreError {
    StoreError::Unavailable(format!(
        "invalid Redis URL ({:?}), expected redis://host:6379 or rediss://host:6379",
        error.kind()
    ))
}

/// Returns whether `error` means the connection itself is unusable, rather than a command that
/// failed on a working connection.
fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

/// bb8's connection manager for the store: bb8-redis's, plus a flag that takes a failed
/// connection out of the pool.
struct Manager {
    inner: RedisConnectionManager,
}

/// A pooled Redis connection and whether a command on it failed on the connection itself.
struct RedisConnection {
    inner: redis::aio::MultiplexedConnection,
    broken: bool,
}

impl bb8::ManageConnection for Manager {
    type Connection = RedisConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<RedisConnection, RedisError> {
        let inner = self.inner.connect().await?;
        Ok(RedisConnection { inner, broken: false })
    }

    async fn is_valid(&self, connection: &mut RedisConnection) -> Result<(), RedisError> {
        self.inner.is_valid(&mut connection.inner).await
    }

    fn has_broken(&self, connection: &mut RedisConnection) -> bool {
        connection.broken
    }
}

/// Reads a pair record as `HGETALL` returns it and opens its sealed keys.
///
/// # Errors
/// `Corrupt` when a field is missing, malformed or out of range, or the keys do not open.
pub fn read_record(
    sealer: &RecordSealer,
    pair_id: &PairId,
    role: Role,
    fields: &HashMap<String, Vec<u8>>,
) -> Result<PairSnapshot, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { pair: pair_id.short().to_string(), reason };
    let text = |name: &str| {
        let value = fields.get(name).ok_or_else(|| corrupt(format!("field {name} missing")))?;
        std::str::from_utf8(value).map_err(|_| corrupt(format!("field {name} is not text")))
    };
    let number = |name: &str| -> Result<u64, StoreError> {
        match fields.get(name) {
            None => Ok(0),
            Some(_) => text(name)?.parse().map_err(|_| corrupt(format!("field {name} is not a number"))),
        }
    };

    let version = text("version")?;
    if version != RECORD_VERSION {
        return Err(corrupt(format!("record version {version:?}, expected {RECORD_VERSION}")));
    }
    let client_id = ClientId::parse(text("client")?).map_err(|_| corrupt("invalid client id".into()))?;
    let created_at = text("created")?.parse().map_err(|_| corrupt("invalid creation time".into()))?;
    let sealed = fields.get("keys").ok_or_else(|| corrupt("field keys missing".into()))?;
    let binding = RecordBinding { pair_id, role, created_at, client_id: &client_id };
    let keys = sealer.open(sealed, &binding).map_err(|error| corrupt(error.to_string()))?;

    let window = match role {
        Role::Inbound => match number("window")? {
            size @ 0..=MAX_STORED_WINDOW => Some(ReplayWindow::new(size)),
            size => return Err(corrupt(format!("window {size} is larger than {MAX_STORED_WINDOW}"))),
        },
        Role::Outbound => None,
    };
    let next_seq =
        number("reserved")?.checked_add(1).ok_or_else(|| corrupt("field reserved is u64::MAX".into()))?;
    Ok(PairSnapshot {
        pair_id: *pair_id,
        client_id,
        role,
        keys: Arc::new(keys),
        created_at,
        next_seq,
        window,
    })
}

fn failed(operation: &str, error: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("{operation} failed: {error}"))
}

/// Milliseconds for `PEXPIRE`, at least 1 because Redis rejects 0.
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl StateStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn health(&self) -> Option<Arc<StoreHealth>> {
        Some(Arc::clone(&self.health))
    }

    async fn save_pair(&self, snapshot: &PairSnapshot, ttl: Duration) -> Result<(), StoreError> {
        let binding = RecordBinding {
            pair_id: &snapshot.pair_id,
            role: snapshot.role,
            created_at: snapshot.created_at,
            client_id: &snapshot.client_id,
        };
        let sealed = self.sealer.seal(&snapshot.keys, &binding);
        let mut invocation = self.scripts.save_pair.key(self.keys.pair(&snapshot.pair_id, snapshot.role));
        if snapshot.role == Role::Inbound {
            invocation.key(self.keys.window(&snapshot.pair_id));
        }
        invocation
            .arg(ttl_millis(ttl))
            .arg("version")
            .arg(RECORD_VERSION)
            .arg("client")
            .arg(snapshot.client_id.as_str())
            .arg("created")
            .arg(snapshot.created_at)
            .arg("keys")
            .arg(sealed);
        match snapshot.role {
            Role::Outbound => invocation.arg("reserved").arg(snapshot.next_seq.saturating_sub(1)),
            Role::Inbound => {
                let window = snapshot.window.as_ref().map_or(64, ReplayWindow::size);
                invocation.arg("window").arg(window).arg("highest").arg(0)
            }
        };
        let created: i64 =
            self.bounded("save_pair", async |connection| invocation.invoke_async(connection).await).await?;
        match created {
            1 => Ok(()),
            _ => Err(StoreError::PairExists { pair: snapshot.pair_id.short().to_string() }),
        }
    }

    async fn load_pair(&self, pair_id: &PairId, role: Role) -> Result<Option<PairSnapshot>, StoreError> {
        let key = self.keys.pair(pair_id, role);
        let fields: HashMap<String, Vec<u8>> = self
            .bounded("load_pair", async |connection| {
                redis::cmd("HGETALL").arg(&key).query_async(connection).await
            })
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        read_record(&self.sealer, pair_id, role, &fields).map(Some)
    }

    async fn remove_pair(&self, pair_id: &PairId, role: Role) -> Result<(), StoreError> {
        let mut command = redis::cmd("DEL");
        command.arg(self.keys.pair(pair_id, role));
        if role == Role::Inbound {
            command.arg(self.keys.window(pair_id));
        }
        self.bounded("remove_pair", async |connection| command.query_async::<i64>(connection).await).await?;
        Ok(())
    }

    async fn touch_pair(&self, pair_id: &PairId, role: Role, ttl: Duration) -> Result<bool, StoreError> {
        let mut pipeline = redis::pipe();
        pipeline.cmd("PEXPIRE").arg(self.keys.pair(pair_id, role)).arg(ttl_millis(ttl));
        if role == Role::Inbound {
            pipeline.cmd("PEXPIRE").arg(self.keys.window(pair_id)).arg(ttl_millis(ttl)).ignore();
        }
        let (found,): (bool,) =
            self.bounded("touch_pair", async |connection| pipeline.query_async(connection).await).await?;
        Ok(found)
    }

    async fn reserve_seqs(
        &self,
        pair_id: &PairId,
        count: u64,
        ttl: Duration,
    ) -> Result<Option<RangeInclusive<u64>>, StoreError> {
        let count = count.max(1);
        let mut invocation = self.scripts.reserve_seqs.key(self.keys.pair(pair_id, Role::Outbound));
        invocation.arg(count).arg(ttl_millis(ttl));
        let last: i64 = self
            .bounded("reserve_seqs", async |connection| invocation.invoke_async(connection).await)
            .await?;
        // The counter starts at 0 and only grows by `count`, so a stored pair gives last >= count.
        match u64::try_from(last) {
            Ok(last) if last >= count => Ok(Some(last - count + 1..=last)),
            _ => Ok(None),
        }
    }

    async fn accept_seqs(
        &self,
        pair_id: &PairId,
        seqs: &[u64],
        window: u64,
        ttl: Duration,
    ) -> Result<Vec<SeqCheck>, StoreError> {
        // Numbers the script cannot represent exactly are stale without a call. The rest go to
        // the script in one call, and their outcomes are put back in their places.
        let checkable = |seq: u64| seq != 0 && seq <= MAX_SCRIPT_SEQ;
        let mut outcomes = vec![SeqCheck::Stale; seqs.len()];
        let sent: Vec<u64> = seqs.iter().copied().filter(|&seq| checkable(seq)).collect();
        if sent.is_empty() {
            return Ok(outcomes);
        }
        let window = window.max(64).div_ceil(64) * 64;
        let mut invocation = self.scripts.accept_seqs.key(self.keys.pair(pair_id, Role::Inbound));
        invocation.key(self.keys.window(pair_id)).arg(window).arg(ttl_millis(ttl)).arg(&sent);
        let reply: redis::Value =
            self.bounded("accept_seqs", async |connection| invocation.invoke_async(connection).await).await?;
        let unexpected = |what: &str| StoreError::Unavailable(format!("accept_seqs returned {what}"));
        let answers: Vec<i64> = match reply {
            redis::Value::Int(-2) => return Ok(vec![SeqCheck::PairNotFound; seqs.len()]),
            reply => redis::from_redis_value(reply).map_err(|_| unexpected("a value of the wrong type"))?,
        };
        if answers.len() != sent.len() {
            return Err(unexpected("the wrong number of outcomes"));
        }
        let slots = outcomes.iter_mut().zip(seqs).filter(|(_, seq)| checkable(**seq));
        for ((slot, _), answer) in slots.zip(answers) {
            *slot = match answer {
                1 => SeqCheck::Accepted,
                0 => SeqCheck::Replayed,
                -1 => SeqCheck::Stale,
                other => return Err(unexpected(&format!("the unexpected value {other}"))),
            };
        }
        Ok(outcomes)
    }

    async fn save_pool(&self, origin: &str, record: &PoolRecord, ttl: Duration) -> Result<(), StoreError> {
        let mut command = redis::cmd("SET");
        command.arg(self.keys.pool(origin)).arg(StoredPool::text(record)).arg("PX").arg(ttl_millis(ttl));
        self.bounded("save_pool", async |connection| command.query_async::<()>(connection).await).await
    }

    async fn load_pool(&self, origin: &str) -> Result<Option<PoolRecord>, StoreError> {
        let key = self.keys.pool(origin);
        let text: Option<String> = self
            .bounded("load_pool", async |connection| {
                redis::cmd("GET").arg(&key).query_async(connection).await
            })
            .await?;
        let Some(text) = text else { return Ok(None) };
        match StoredPool::parse(&text) {
            Some(record) => Ok(Some(record)),
            None => {
                tracing::warn!(origin, "ignoring an unreadable stored pair pool");
                Ok(None)
            }
        }
    }

    async fn remove_pool(&self, origin: &str, record: &PoolRecord) -> Result<(), StoreError> {
        let mut invocation = self.scripts.remove_pool.key(self.keys.pool(origin));
        invocation.arg(StoredPool::text(record));
        self.bounded("remove_pool", async |connection| invocation.invoke_async::<i64>(connection).await)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let reply: String =
            self.bounded("ping", async |connection| redis::cmd("PING").query_async(connection).await).await?;
        match reply.as_str() {
            "PONG" => Ok(()),
            other => Err(StoreError::Unavailable(format!("ping returned {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_send_commands_without_delay() {
        for url in ["redis://127.0.0.1:6379", "rediss://user:secret@cache.internal:6380/2"] {
            let info = connection_info(url).unwrap();
            assert!(info.tcp_settings().nodelay(), "{url}");
        }
    }

    #[test]
    fn invalid_url_error_leaves_the_url_out() {
        let error = connection_info("http://user:hunter2@cache.internal").unwrap_err();
        let text = error.to_string();
        assert!(text.contains("invalid Redis URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
