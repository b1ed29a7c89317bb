//! `RedisStore` against a real `redis-server` that each test starts on its own free port:
//! sealed snapshots, secret rotation, `seq` blocks and replay checks shared by two stores (two
//! relay processes in production), lifetimes, and behaviour while Redis is down.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_relay_actors::{
    AcceptSeq, AllocateSeq, PairSnapshot, PoolRecord, RedisSettings, RedisStore, Role, SEQ_BLOCK, SeqCheck,
    SessionError, SessionLimits, SessionRegistry, StateStore, StoreError, SupervisorSettings,
};
use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::{ClientIdSigner, PairId, PairKeys, ProtocolError};
use bb8_redis::redis;
use futures_util::future::join_all;
use support::redis_server::RedisServer;
use support::threads::on_threads;

/// Bound on every store call in these tests.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// Maximum time a failing store call may take before the test calls it a hang: the store
/// timeout plus scheduling slack on a loaded machine.
const FAIL_FAST_LIMIT: Duration = Duration::from_millis(2500);
/// Time the store gets to reconnect after redis-server is back.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(15);
const SECRET: &[u8] = b"test CLIENT_ID_SECRET for the redis store";
const LONG: Duration = Duration::from_secs(3600);

fn settings(server: &RedisServer, secret: &[u8], previous: Option<&[u8]>) -> RedisSettings {
    RedisSettings {
        url: server.url(),
        pool_size: 4,
        threads: 1,
        timeout: STORE_TIMEOUT,
        key_prefix: "test-relay".into(),
        secret: secret.to_vec(),
        previous_secret: previous.map(<[u8]>::to_vec),
        supervisor: SupervisorSettings {
            interval: Duration::from_millis(200),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            max_attempts: 5,
        },
    }
}

fn store(server: &RedisServer) -> Arc<RedisStore> {
    RedisStore::start(settings(server, SECRET, None)).expect("creating the store failed")
}

fn limits() -> SessionLimits {
    SessionLimits { idle_timeout: Duration::from_secs(600), max_age: LONG, max_exchanges: 1 << 32 }
}

fn snapshot(role: Role) -> PairSnapshot {
    let pair_id = PairId::random();
    let keys = PairKeys::derive(&rand_bytes::<32>(), &[2; 64], &pair_id, &[3; 32]).keys;
    PairSnapshot::new(pair_id, ClientIdSigner::new(b"secret", None).issue(), role, keys, 1024)
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    for byte in &mut bytes {
        *byte = rand::random();
    }
    bytes
}

async fn raw_connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(server.url()).expect("opening a raw client failed");
    client.get_multiplexed_async_connection().await.expect("raw connection failed")
}

/// Returns every byte Redis holds: each key's name followed by its `DUMP` serialisation.
async fn dump_everything(server: &RedisServer) -> Vec<u8> {
    let mut connection = raw_connection(server).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut connection).await.unwrap();
    assert!(!keys.is_empty(), "nothing stored");
    let mut everything = Vec::new();
    for key in keys {
        let dumped: Vec<u8> = redis::cmd("DUMP").arg(&key).query_async(&mut connection).await.unwrap();
        everything.extend_from_slice(key.as_bytes());
        everything.extend_from_slice(&dumped);
    }
    everything
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[actix::test]
async fn pair_round_trip_keeps_keys_sealed_at_rest() {
    let server = RedisServer::start();
    let store = store(&server);

    for role in [Role::Outbound, Role::Inbound] {
        let saved = snapshot(role);
        store.save_pair(&saved, LONG).await.unwrap();
        let loaded = store.load_pair(&saved.pair_id, role).await.unwrap().expect("stored pair not found");

        assert_eq!(loaded.pair_id, saved.pair_id);
        assert_eq!(loaded.client_id, saved.client_id);
        assert_eq!(loaded.role, role);
        assert_eq!(loaded.created_at, saved.created_at);
        assert_eq!(loaded.keys.to_bytes().as_ref(), saved.keys.to_bytes().as_ref());
        assert_eq!(
            loaded.window.as_ref().map(ReplayWindow::size),
            saved.window.as_ref().map(ReplayWindow::size)
        );

        let everything = dump_everything(&server).await;
        let key_bytes = saved.keys.to_bytes();
        for (name, part) in [("request key", &key_bytes[..32]), ("response key", &key_bytes[44..76])] {
            assert!(!contains(&everything, part), "{name} of the {role:?} pair is readable in Redis");
            let hex = hex::encode(part);
            assert!(!contains(&everything, hex.as_bytes()), "{name} of the {role:?} pair is in Redis as hex");
        }
        assert!(store.load_pair(&saved.pair_id, other(role)).await.unwrap().is_none(), "roles share a key");
    }
}

fn other(role: Role) -> Role {
    match role {
        Role::Outbound => Role::Inbound,
        Role::Inbound => Role::Outbound,
    }
}

#[actix::test]
async fn pair_keys_share_one_hash_tag() {
    let server = RedisServer::start();
    let store = store(&server);
    let saved = snapshot(Role::Inbound);
    store.save_pair(&saved, LONG).await.unwrap();
    store.accept_seq(&saved.pair_id, 1, 1024, LONG).await.unwrap();

    let mut connection = raw_connection(&server).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut connection).await.unwrap();
    let tag = format!("{{{}}}", saved.pair_id);
    assert_eq!(keys.len(), 2, "keys: {keys:?}");
    for key in &keys {
        assert!(key.starts_with("test-relay:"), "key {key} lacks the prefix");
        assert!(key.ends_with(&tag), "key {key} lacks the hash tag {tag}");
    }
}

#[actix::test]
async fn record_sealed_under_previous_secret_opens() {
    let server = RedisServer::start();
    let before = RedisStore::start(settings(&server, b"old secret", None)).unwrap();
    let saved = snapshot(Role::Inbound);
    before.save_pair(&saved, LONG).await.unwrap();

    let rotated = RedisStore::start(settings(&server, b"new secret", Some(b"old secret"))).unwrap();
    let loaded = rotated.load_pair(&saved.pair_id, Role::Inbound).await.unwrap().expect("pair not found");
    assert_eq!(loaded.keys.to_bytes().as_ref(), saved.keys.to_bytes().as_ref());

    let unrelated = RedisStore::start(settings(&server, b"new secret", Some(b"other secret"))).unwrap();
    let error = unrelated.load_pair(&saved.pair_id, Role::Inbound).await.unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "unexpected {error:?}");
}

#[actix::test]
async fn unreadable_pair_counts_as_absent_in_registry() {
    let server = RedisServer::start();
    let before = RedisStore::start(settings(&server, b"old secret", None)).unwrap();
    let saved = snapshot(Role::Inbound);
    before.save_pair(&saved, LONG).await.unwrap();

    let after = RedisStore::start(settings(&server, b"new secret", None)).unwrap();
    let registry = SessionRegistry::new(after, limits());
    assert!(registry.find(&saved.pair_id).await.unwrap().is_none());
}

#[actix::test]
async fn existing_pair_id_is_not_overwritten() {
    let server = RedisServer::start();
    let store = store(&server);
    let first = snapshot(Role::Inbound);
    store.save_pair(&first, LONG).await.unwrap();
    store.accept_seq(&first.pair_id, 5, 1024, LONG).await.unwrap();

    let mut second = snapshot(Role::Inbound);
    second.pair_id = first.pair_id;
    let error = store.save_pair(&second, LONG).await.unwrap_err();
    assert!(matches!(error, StoreError::PairExists { .. }), "unexpected {error:?}");

    let stored = store.load_pair(&first.pair_id, Role::Inbound).await.unwrap().unwrap();
    assert_eq!(stored.keys.to_bytes().as_ref(), first.keys.to_bytes().as_ref());
    assert_eq!(store.accept_seq(&first.pair_id, 5, 1024, LONG).await.unwrap(), SeqCheck::Replayed);
}

#[actix::test]
async fn seq_blocks_of_two_stores_never_overlap() {
    let server = RedisServer::start();
    let (one, two) = (store(&server), store(&server));
    let pair = snapshot(Role::Outbound);
    one.save_pair(&pair, LONG).await.unwrap();

    let reserve = |store: Arc<RedisStore>| {
        let pair_id = pair.pair_id;
        async move {
            let mut blocks = Vec::new();
            for _ in 0..50 {
                blocks.push(
                    store.reserve_seqs(&pair_id, SEQ_BLOCK, LONG).await.unwrap().expect("pair missing"),
                );
            }
            blocks
        }
    };
    let (first, second) = tokio::join!(reserve(Arc::clone(&one)), reserve(Arc::clone(&two)));

    let mut seen = BTreeSet::new();
    for block in first.iter().chain(&second) {
        assert_eq!(block.end() - block.start() + 1, SEQ_BLOCK, "block {block:?} has the wrong size");
        for seq in block.clone() {
            assert!(seen.insert(seq), "seq {seq} reserved twice");
        }
    }
    assert_eq!(seen.len() as u64, 100 * SEQ_BLOCK);
    assert_eq!(seen.first(), Some(&1));
    assert_eq!(seen.last(), Some(&(100 * SEQ_BLOCK)));
    assert!(one.reserve_seqs(&PairId::random(), SEQ_BLOCK, LONG).await.unwrap().is_none());
}

#[actix::test]
async fn sessions_of_two_processes_never_share_a_seq() {
    let server = RedisServer::start();
    let first = SessionRegistry::new(store(&server), limits());
    let second = SessionRegistry::new(store(&server), limits());
    let pair = first.insert(snapshot(Role::Outbound)).await.unwrap();
    let loaded = second.find_as(&pair.pair_id, Role::Outbound).await.unwrap().expect("pair not loaded");

    // Through the handles, as the relay calls them: most numbers come from a reserved block under the
    // session's lock, and every 64th reserves the next block through the actor.
    let requests = (0..300).flat_map(|_| [pair.allocate_seq(), loaded.allocate_seq()]);
    let replies = join_all(requests).await;

    let mut seqs = HashSet::new();
    for reply in replies {
        let seq = reply.expect("session stopped").expect("allocation failed").seq;
        assert!(seqs.insert(seq), "seq {seq} handed out twice");
    }
    assert_eq!(seqs.len(), 600);
}

#[actix::test]
async fn restarted_process_continues_after_reserved_seqs() {
    let server = RedisServer::start();
    let first = SessionRegistry::new(store(&server), limits());
    let pair = first.insert(snapshot(Role::Outbound)).await.unwrap();
    let used = pair.addr.send(AllocateSeq).await.unwrap().unwrap().seq;
    assert_eq!(used, 1);

    let restarted = SessionRegistry::new(store(&server), limits());
    let loaded = restarted.find_as(&pair.pair_id, Role::Outbound).await.unwrap().expect("pair not loaded");
    let next = loaded.addr.send(AllocateSeq).await.unwrap().unwrap().seq;
    assert_eq!(next, SEQ_BLOCK + 1, "the rest of the first block is skipped, never reused");
}

#[actix::test]
async fn concurrent_checks_accept_each_seq_once() {
    let server = RedisServer::start();
    let (one, two) = (store(&server), store(&server));
    let pair = snapshot(Role::Inbound);
    one.save_pair(&pair, LONG).await.unwrap();

    let check = |store: Arc<RedisStore>, seq: u64| {
        let pair_id = pair.pair_id;
        async move { (seq, store.accept_seq(&pair_id, seq, 1024, LONG).await.unwrap()) }
    };
    let mut checks = Vec::new();
    for seq in 1..=1000u64 {
        checks.push(check(Arc::clone(&one), seq));
        checks.push(check(Arc::clone(&two), seq));
    }
    let outcomes = join_all(checks).await;

    let mut accepted = HashSet::new();
    for (seq, outcome) in outcomes {
        match outcome {
            SeqCheck::Accepted => assert!(accepted.insert(seq), "seq {seq} accepted twice"),
            SeqCheck::Replayed | SeqCheck::Stale => {}
            SeqCheck::PairNotFound => panic!("pair not found for seq {seq}"),
        }
    }
    assert!(accepted.len() > 900, "only {} of 1000 in-window seqs accepted", accepted.len());
}

#[actix::test]
async fn inbound_sessions_of_two_processes_accept_each_seq_once() {
    let server = RedisServer::start();
    let first = SessionRegistry::new(store(&server), limits());
    let second = SessionRegistry::new(store(&server), limits());
    let pair = first.insert(snapshot(Role::Inbound)).await.unwrap();
    let loaded = second.find(&pair.pair_id).await.unwrap().expect("pair not loaded");

    // Through the handles, as the relay calls them: each process runs its checks in a task of its own.
    let requests = (1..=200u64).flat_map(|seq| [pair.accept_seq(seq), loaded.accept_seq(seq)]);
    let replies = join_all(requests).await;

    let mut accepted = 0;
    for reply in replies {
        match reply.expect("session stopped") {
            Ok(_) => accepted += 1,
            Err(SessionError::Replay(ProtocolError::Replayed { .. })) => {}
            Err(other) => panic!("unexpected rejection {other:?}"),
        }
    }
    assert_eq!(accepted, 200, "each of the 200 seqs must be accepted exactly once");
}

/// 3000 sequence numbers for a window of `size`, from a fixed linear congruential sequence so a
/// failure repeats: mostly small steps forward and back around the highest seq, jumps within the
/// window, and sometimes a jump past the whole window.
fn replay_steps(size: u64) -> Vec<u64> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ size;
    let mut base: u64 = 1;
    let mut steps = Vec::with_capacity(3000);
    for _ in 0..3000 {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let roll = state >> 33;
        let seq = match roll % 10 {
            0 => base + size + roll % (2 * size),
            // Jumps that clear whole bytes of the ring, often over numbers marked just before.
            1 => base + 9 + roll % size,
            2..=5 => base + roll % 8,
            _ => base.saturating_sub(roll % (size + 16)).max(1),
        };
        base = base.max(seq);
        steps.push(seq);
    }
    steps
}

/// Returns the in-memory replay window's outcome for `seq`, marking it when accepted.
fn expected_check(window: &mut ReplayWindow, seq: u64) -> SeqCheck {
    match window.check_and_mark(seq) {
        Ok(()) => SeqCheck::Accepted,
        Err(ProtocolError::Replayed { .. }) => SeqCheck::Replayed,
        Err(_) => SeqCheck::Stale,
    }
}

#[actix::test]
async fn replay_check_matches_in_memory_window() {
    let server = RedisServer::start();
    let store = store(&server);
    for size in [64u64, 128, 1024] {
        let pair = snapshot(Role::Inbound);
        store.save_pair(&pair, LONG).await.unwrap();
        let mut expected = ReplayWindow::new(size);
        for (step, seq) in replay_steps(size).into_iter().enumerate() {
            let want = expected_check(&mut expected, seq);
            let got = store.accept_seq(&pair.pair_id, seq, size, LONG).await.unwrap();
            assert_eq!(got, want, "window {size}, step {step}, seq {seq}");
        }
    }
}

#[actix::test]
async fn batched_replay_check_matches_in_memory_window() {
    let server = RedisServer::start();
    let store = store(&server);
    for size in [64u64, 1024] {
        let pair = snapshot(Role::Inbound);
        store.save_pair(&pair, LONG).await.unwrap();
        let mut expected = ReplayWindow::new(size);
        let mut steps = replay_steps(size);
        // Numbers the script cannot hold exactly, and a repeat inside one batch.
        steps.splice(100..100, [0, u64::MAX, 1 << 60, steps[99]]);
        // Batches of 1 to 37 numbers, so window moves and repeats fall inside batches and
        // across their edges.
        let mut rest = steps.as_slice();
        let mut batch_size = 1;
        while !rest.is_empty() {
            let (batch, tail) = rest.split_at(batch_size.min(rest.len()));
            rest = tail;
            batch_size = batch_size % 37 + 1;
            // The store treats numbers above 2^53 as stale without marking them; the in-memory
            // window would take them, and no pair lives that long.
            let want: Vec<SeqCheck> = batch
                .iter()
                .map(|&seq| match seq > 1 << 53 {
                    true => SeqCheck::Stale,
                    false => expected_check(&mut expected, seq),
                })
                .collect();
            let got = store.accept_seqs(&pair.pair_id, batch, size, LONG).await.unwrap();
            assert_eq!(got, want, "window {size}, batch {batch:?}");
        }
    }
    let missing = PairId::random();
    assert_eq!(
        store.accept_seqs(&missing, &[1, 2, 0], 1024, LONG).await.unwrap(),
        [SeqCheck::PairNotFound, SeqCheck::PairNotFound, SeqCheck::PairNotFound],
        "every number of an unknown pair is answered"
    );
}

/// Calls of the replay check script Redis has run: `EVALSHA`, plus `EVAL` after a restart.
async fn script_calls(server: &RedisServer) -> u64 {
    let mut connection = raw_connection(server).await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut connection).await.unwrap();
    info.lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[actix::test]
async fn concurrent_seqs_of_one_session_share_replay_checks() {
    let server = RedisServer::start();
    let registry = SessionRegistry::new(store(&server), limits());
    let pair = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    pair.addr.send(AcceptSeq { seq: 1 }).await.unwrap().unwrap();
    let before = script_calls(&server).await;

    // 300 numbers, each sent twice, all at once.
    let requests =
        (2..=301u64).flat_map(|seq| [pair.addr.send(AcceptSeq { seq }), pair.addr.send(AcceptSeq { seq })]);
    let replies = join_all(requests).await;
    let calls = script_calls(&server).await - before;

    let mut accepted = BTreeSet::new();
    for reply in replies {
        match reply.expect("session stopped") {
            Ok(exchange) => assert!(accepted.insert(exchange.seq), "seq {} accepted twice", exchange.seq),
            Err(SessionError::Replay(ProtocolError::Replayed { .. })) => {}
            Err(other) => panic!("unexpected rejection {other:?}"),
        }
    }
    assert_eq!(accepted, (2..=301).collect::<BTreeSet<u64>>(), "each seq accepted exactly once");
    assert!(calls <= 60, "600 checks took {calls} script calls; they were not batched");
    assert!(calls >= 5, "600 checks took {calls} script calls, fewer than {} batches", 600 / 128);
}

async fn connected_clients(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("clients").query_async(connection).await.unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("connected_clients:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("INFO clients has connected_clients")
}

#[actix::test]
async fn each_thread_calls_over_its_own_connections() {
    let server = RedisServer::start();
    let mut raw = raw_connection(&server).await;
    let mut settings = settings(&server, SECRET, None);
    settings.pool_size = 4;
    settings.threads = 2;
    let store = RedisStore::start(settings).expect("creating the store failed");

    // Twenty calls at once from this thread open at most its share of 4 / 2 connections.
    let before = connected_clients(&mut raw).await;
    let calls = (0..20).map(|n| store.load_pool(if n % 2 == 0 { "even" } else { "odd" }));
    for result in join_all(calls).await {
        assert_eq!(result.expect("load_pool failed"), None);
    }
    let on_this_thread = connected_clients(&mut raw).await - before;
    assert!((1..=2).contains(&on_this_thread), "{on_this_thread} connections for one thread");

    // A call from another thread opens a connection of its own, which lives as long as that
    // thread's runtime.
    let (called, wait_for_call) = std::sync::mpsc::channel();
    let (finish, wait_for_finish) = std::sync::mpsc::channel::<()>();
    let other = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            actix::System::new().block_on(async move {
                assert_eq!(store.load_pool("other").await.expect("load_pool failed"), None);
                called.send(()).expect("the test stopped waiting");
                let _ = wait_for_finish.recv_timeout(Duration::from_secs(10));
            });
        })
    };
    wait_for_call.recv_timeout(Duration::from_secs(10)).expect("the other thread made no call");
    let with_other_thread = connected_clients(&mut raw).await - before;
    assert_eq!(with_other_thread, on_this_thread + 1, "the other thread used this thread's connections");
    let _ = finish.send(());
    other.join().expect("the other thread panicked");
}

#[actix::test]
async fn lost_bitmap_rejects_seqs_up_to_highest() {
    let server = RedisServer::start();
    let store = store(&server);
    let pair = snapshot(Role::Inbound);
    store.save_pair(&pair, LONG).await.unwrap();
    for seq in [10, 12, 20] {
        assert_eq!(store.accept_seq(&pair.pair_id, seq, 1024, LONG).await.unwrap(), SeqCheck::Accepted);
    }

    let mut connection = raw_connection(&server).await;
    let window_key = format!("test-relay:window:{{{}}}", pair.pair_id);
    let removed: i64 = redis::cmd("DEL").arg(&window_key).query_async(&mut connection).await.unwrap();
    assert_eq!(removed, 1, "no bitmap at {window_key}");

    for seq in [10, 11, 19, 20] {
        assert_eq!(
            store.accept_seq(&pair.pair_id, seq, 1024, LONG).await.unwrap(),
            SeqCheck::Stale,
            "seq {seq}"
        );
    }
    assert_eq!(store.accept_seq(&pair.pair_id, 21, 1024, LONG).await.unwrap(), SeqCheck::Accepted);
    assert_eq!(store.accept_seq(&pair.pair_id, 15, 1024, LONG).await.unwrap(), SeqCheck::Stale);
    assert_eq!(store.accept_seq(&pair.pair_id, 21, 1024, LONG).await.unwrap(), SeqCheck::Replayed);
}

#[actix::test]
async fn pair_lifetime_follows_use_and_max_age() {
    let server = RedisServer::start();
    let store = store(&server);
    let registry_limits =
        SessionLimits { idle_timeout: Duration::from_secs(60), max_age: Duration::from_secs(90), ..limits() };
    let registry = SessionRegistry::new(Arc::clone(&store) as Arc<dyn StateStore>, registry_limits);
    let pair = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    let key = format!("test-relay:pair:inbound:{{{}}}", pair.pair_id);
    let mut connection = raw_connection(&server).await;
    let pttl = async |connection: &mut redis::aio::MultiplexedConnection| -> i64 {
        redis::cmd("PTTL").arg(&key).query_async(connection).await.unwrap()
    };

    let fresh = pttl(&mut connection).await;
    assert!((55_000..=60_000).contains(&fresh), "new pair lives {fresh} ms, expected the 60 s idle timeout");

    let mut old = snapshot(Role::Inbound);
    old.created_at -= 80;
    let old_id = old.pair_id;
    registry.insert(old).await.unwrap();
    let old_key = format!("test-relay:pair:inbound:{{{old_id}}}");
    let capped: i64 = redis::cmd("PTTL").arg(&old_key).query_async(&mut connection).await.unwrap();
    assert!(
        (5_000..=10_000).contains(&capped),
        "80 s old pair lives {capped} ms, expected the 10 s left of its max age"
    );

    let mut too_old = snapshot(Role::Inbound);
    too_old.created_at -= 100;
    store.save_pair(&too_old, LONG).await.unwrap();
    assert!(registry.find(&too_old.pair_id).await.unwrap().is_none(), "pair past its max age was loaded");

    redis::cmd("PEXPIRE").arg(&key).arg(5_000).query_async::<i64>(&mut connection).await.unwrap();
    pair.addr.send(AcceptSeq { seq: 1 }).await.unwrap().unwrap();
    let refreshed = pttl(&mut connection).await;
    assert!(refreshed > 50_000, "use did not refresh the lifetime: {refreshed} ms left");
}

#[actix::test]
async fn expired_pair_is_reported_as_expired() {
    let server = RedisServer::start();
    let store = store(&server);
    let registry = SessionRegistry::new(Arc::clone(&store) as Arc<dyn StateStore>, limits());
    let inbound = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    let outbound = registry.insert(snapshot(Role::Outbound)).await.unwrap();

    let mut connection = raw_connection(&server).await;
    redis::cmd("FLUSHALL").query_async::<()>(&mut connection).await.unwrap();

    let accepted = inbound.addr.send(AcceptSeq { seq: 1 }).await.unwrap();
    assert_eq!(accepted.unwrap_err(), SessionError::Expired);
    let allocated = outbound.addr.send(AllocateSeq).await.unwrap();
    assert_eq!(allocated.unwrap_err(), SessionError::Expired);
}

#[actix::test]
async fn pool_record_is_removed_only_while_unchanged() {
    let server = RedisServer::start();
    let store = store(&server);
    let origin = "http://127.0.0.1:9";
    let client_id = ClientIdSigner::new(b"secret", None).issue();
    let old = PoolRecord { client_id: client_id.clone(), pair_ids: vec![PairId::random(), PairId::random()] };
    let new = PoolRecord { client_id, pair_ids: vec![PairId::random()] };

    assert!(store.load_pool(origin).await.unwrap().is_none());
    store.save_pool(origin, &old, LONG).await.unwrap();
    assert_eq!(store.load_pool(origin).await.unwrap().as_ref(), Some(&old));
    store.save_pool(origin, &new, LONG).await.unwrap();

    store.remove_pool(origin, &old).await.unwrap();
    assert_eq!(
        store.load_pool(origin).await.unwrap().as_ref(),
        Some(&new),
        "an old generation removed the new one"
    );
    store.remove_pool(origin, &new).await.unwrap();
    assert!(store.load_pool(origin).await.unwrap().is_none());
}

/// Runs `call` and returns its result and how long it took.
async fn timed<T>(call: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let result = call.await;
    (result, started.elapsed())
}

#[actix::test]
async fn outage_fails_fast_and_recovers_after_restart() {
    let mut server = RedisServer::start();
    let store = store(&server);
    let pair = snapshot(Role::Inbound);
    store.save_pair(&pair, LONG).await.unwrap();
    assert_eq!(store.accept_seq(&pair.pair_id, 1, 1024, LONG).await.unwrap(), SeqCheck::Accepted);

    server.kill();

    let (pinged, took) = timed(store.ping()).await;
    assert!(pinged.is_err(), "ping succeeded with Redis down");
    assert!(took < FAIL_FAST_LIMIT, "ping took {took:?}");
    let (checked, took) = timed(store.accept_seq(&pair.pair_id, 2, 1024, LONG)).await;
    assert!(matches!(checked, Err(StoreError::Unavailable(_))), "unexpected {checked:?}");
    assert!(took < FAIL_FAST_LIMIT, "accept_seq took {took:?}");
    let (loaded, took) = timed(store.load_pair(&pair.pair_id, Role::Inbound)).await;
    assert!(loaded.is_err(), "load_pair succeeded with Redis down");
    assert!(took < FAIL_FAST_LIMIT, "load_pair took {took:?}");
    assert!(store.health_counters().operation_failures() >= 3);

    server.restart();

    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "store did not reconnect within {RECOVERY_TIMEOUT:?}");
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    // The restarted server is empty, so the pair is gone and a new one works.
    assert_eq!(store.accept_seq(&pair.pair_id, 2, 1024, LONG).await.unwrap(), SeqCheck::PairNotFound);
    let fresh = snapshot(Role::Inbound);
    store.save_pair(&fresh, LONG).await.unwrap();
    assert_eq!(store.accept_seq(&fresh.pair_id, 1, 1024, LONG).await.unwrap(), SeqCheck::Accepted);
}

#[actix::test]
async fn connection_broken_by_a_restart_leaves_the_pool() {
    let mut server = RedisServer::start();
    let store = store(&server);
    let pair = snapshot(Role::Inbound);
    store.save_pair(&pair, LONG).await.unwrap();

    server.restart();
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let mut failures = 0;
    // One call in turn, so every call takes the same idle pooled connection until it is dropped.
    while store.save_pair(&pair, LONG).await.is_err() {
        failures += 1;
        assert!(Instant::now() < deadline, "store did not recover within {RECOVERY_TIMEOUT:?}");
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    assert!(failures >= 1, "a connection from before the restart answered, so the test proved nothing");
    assert_eq!(store.accept_seq(&pair.pair_id, 1, 1024, LONG).await.unwrap(), SeqCheck::Accepted);
}

#[actix::test]
async fn supervisor_gives_up_restarts_and_recovers() {
    let mut server = RedisServer::start();
    let store = store(&server);
    let health = store.health().expect("redis store has health counters");
    let wait_for = async |what: &str, condition: &dyn Fn() -> bool| {
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "supervisor: {what} did not happen within {RECOVERY_TIMEOUT:?}"
            );
            actix::clock::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for("first successful ping", &|| health.is_reachable()).await;

    server.kill();
    wait_for("unreachable store noticed", &|| !health.is_reachable()).await;
    wait_for("give up after 5 failed probes", &|| health.give_ups() >= 1).await;
    wait_for("restart by actix supervision", &|| health.restarts() >= 1).await;

    server.restart();
    wait_for("recovery", &|| health.recoveries() >= 1 && health.is_reachable()).await;
    assert!(health.pings_failed() >= 5, "{} failed pings", health.pings_failed());
}

#[actix::test]
async fn checks_from_several_threads_accept_each_seq_once() {
    let server = RedisServer::start();
    let registry = SessionRegistry::new(store(&server), limits());
    let pair = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    let before = script_calls(&server).await;

    // Three threads offer every number at once, so the check task of one thread also replies to
    // numbers that the others queued.
    let checks = on_threads(&pair, 3, |session, index| async move {
        let replies = join_all((1..=300u64).map(|seq| session.accept_seq(seq))).await;
        // Once those have their replies and no check runs, a new number starts a new check task.
        let own = 1000 + index as u64;
        let later = session.accept_seq(own).await.expect("session stopped");
        assert_eq!(later.expect("a later number was rejected").seq, own);
        let mut accepted = Vec::new();
        for (seq, reply) in (1..=300u64).zip(replies) {
            match reply.expect("session stopped") {
                Ok(exchange) => accepted.push(exchange.seq),
                Err(error) => assert_eq!(error, SessionError::Replay(ProtocolError::Replayed { seq })),
            }
        }
        accepted
    });
    // A number that waits for a check task that never comes fails the test instead of hanging it.
    let per_thread = tokio::time::timeout(Duration::from_secs(30), checks)
        .await
        .expect("replay checks timed out after 30 s");
    let calls = script_calls(&server).await - before;

    let mut all: Vec<u64> = per_thread.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=300).collect::<Vec<u64>>(), "a number was accepted twice or never");
    assert!(calls < 100, "900 checks took {calls} script calls; they were not batched");
}
