//! Behaviour of `PeerSession` and `SessionRegistry` on a real actix system.

mod support;

use std::sync::Arc;
use std::time::Duration;

use api_relay_actors::{
    AcceptSeq, AllocateSeq, MemoryStore, PairSnapshot, Role, SessionError, SessionLimits, SessionRegistry,
};
use api_relay_protocol::{ClientIdSigner, PairId, PairKeys, ProtocolError};
use support::threads::on_threads;

fn limits() -> SessionLimits {
    SessionLimits {
        idle_timeout: Duration::from_secs(60),
        max_age: Duration::from_secs(3600),
        max_exchanges: 1000,
    }
}

fn snapshot(role: Role) -> PairSnapshot {
    let pair_id = PairId::random();
    let keys = PairKeys::derive(&[1; 32], &[2; 64], &pair_id, &[3; 32]).keys;
    PairSnapshot::new(pair_id, ClientIdSigner::new(b"secret", None).issue(), role, keys, 1024)
}

fn registry(limits: SessionLimits) -> SessionRegistry {
    SessionRegistry::new(Arc::new(MemoryStore::new()), limits)
}

#[actix::test]
async fn outbound_session_allocates_each_seq_once() {
    let registry = registry(limits());
    let session = registry.insert(snapshot(Role::Outbound)).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..100 {
        seqs.push(session.addr.send(AllocateSeq).await.unwrap().unwrap().seq);
    }
    assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
}

#[actix::test]
async fn concurrent_allocations_never_share_a_seq() {
    let registry = registry(limits());
    let session = registry.insert(snapshot(Role::Outbound)).await.unwrap();
    let requests = (0..200).map(|_| session.addr.send(AllocateSeq));
    let mut seqs: Vec<u64> = futures_seqs(requests).await;
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "a seq was handed out twice");
}

async fn futures_seqs<F>(requests: impl Iterator<Item = F>) -> Vec<u64>
where
    F: std::future::Future<
            Output = Result<Result<api_relay_actors::Exchange, SessionError>, actix::MailboxError>,
        >,
{
    let mut seqs = Vec::new();
    let pending: Vec<F> = requests.collect();
    for request in pending {
        seqs.push(request.await.unwrap().unwrap().seq);
    }
    seqs
}

#[actix::test]
async fn inbound_session_rejects_a_replayed_seq() {
    let registry = registry(limits());
    let session = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    session.addr.send(AcceptSeq { seq: 7 }).await.unwrap().unwrap();
    let replay = session.addr.send(AcceptSeq { seq: 7 }).await.unwrap();
    assert_eq!(replay.unwrap_err(), SessionError::Replay(ProtocolError::Replayed { seq: 7 }));
}

#[actix::test]
async fn session_expires_after_its_exchange_limit() {
    let registry = registry(SessionLimits { max_exchanges: 2, ..limits() });
    let session = registry.insert(snapshot(Role::Outbound)).await.unwrap();
    session.addr.send(AllocateSeq).await.unwrap().unwrap();
    session.addr.send(AllocateSeq).await.unwrap().unwrap();
    let third = session.addr.send(AllocateSeq).await.unwrap();
    assert_eq!(third.unwrap_err(), SessionError::Expired);
    assert!(registry.find(&session.pair_id).await.unwrap().is_none(), "expired pair still registered");
}

#[actix::test]
async fn idle_session_is_removed() {
    let registry = registry(SessionLimits { idle_timeout: Duration::from_millis(200), ..limits() });
    let session = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    assert_eq!(registry.len(), 1);
    actix::clock::sleep(Duration::from_millis(700)).await;
    assert!(registry.find(&session.pair_id).await.unwrap().is_none(), "idle pair still registered");
    assert!(registry.is_empty());
}

#[actix::test]
async fn memory_registry_finds_only_live_sessions() {
    let registry = registry(limits());
    assert!(registry.find(&PairId::random()).await.unwrap().is_none());
    let session = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    let found = registry.find(&session.pair_id).await.unwrap().expect("live session");
    assert_eq!(found.client_id, session.client_id);
}

#[actix::test]
async fn handles_on_several_threads_never_share_a_seq() {
    let registry = registry(limits());
    let session = registry.insert(snapshot(Role::Outbound)).await.unwrap();
    let per_thread = on_threads(&session, 3, |session, _| async move {
        let mut seqs = Vec::new();
        for _ in 0..300 {
            seqs.push(session.allocate_seq().await.unwrap().unwrap().seq);
        }
        seqs
    })
    .await;
    for seqs in &per_thread {
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "one thread got numbers out of order");
    }
    let mut all: Vec<u64> = per_thread.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=900).collect::<Vec<u64>>(), "numbers repeated or skipped");
}

#[actix::test]
async fn each_seq_is_accepted_once_across_threads() {
    let registry = registry(limits());
    let session = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    // Both threads offer every number, so each number is offered twice at about the same time.
    let per_thread = on_threads(&session, 2, |session, _| async move {
        let mut accepted = Vec::new();
        for seq in 1..=500u64 {
            match session.accept_seq(seq).await.unwrap() {
                Ok(exchange) => accepted.push(exchange.seq),
                Err(error) => assert_eq!(error, SessionError::Replay(ProtocolError::Replayed { seq })),
            }
        }
        accepted
    })
    .await;
    let mut all: Vec<u64> = per_thread.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=500).collect::<Vec<u64>>(), "a number was accepted twice or never");
}

#[actix::test]
async fn handle_stops_the_session_at_its_exchange_limit() {
    let registry = registry(SessionLimits { max_exchanges: 3, ..limits() });
    let session = registry.insert(snapshot(Role::Inbound)).await.unwrap();
    for seq in 1..=3 {
        session.accept_seq(seq).await.unwrap().unwrap();
    }
    let fourth = session.accept_seq(4).await.unwrap();
    assert_eq!(fourth.unwrap_err(), SessionError::Expired);
    assert!(registry.find(&session.pair_id).await.unwrap().is_none(), "expired pair still registered");
    // The stopped session accepts nothing more, whether or not its actor still runs.
    assert!(!matches!(session.accept_seq(5).await, Ok(Ok(_))), "a stopped session accepted a seq");
}
