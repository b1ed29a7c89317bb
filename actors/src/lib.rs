//! Actors of api-relay: the live state of every pair and where it is kept.
//!
//! Layout:
//!
//! - [`session`]: `PeerSession`, one actor per pair on one relay. It owns the pair's keys and
//!   its counters: allocating `seq` on relay A, accepting `seq` against the replay window on
//!   relay B, expiring. Steps that change only the counters run under a lock on the caller's
//!   thread; block reservations in the store and stopping go through the actor.
//! - [`registry`]: `SessionRegistry`, the map from pair id to live `PeerSession`, which loads a
//!   session from the state store on a miss.
//! - [`store`]: the `StateStore` trait and its embedded in-memory implementation.
//! - [`redis_store`]: `RedisStore`, the state store several relay processes share.
//! - [`sealing`]: how `RedisStore` seals pair keys at rest.
//! - [`supervisor`]: `SnapshotSupervisor`, which watches the shared store's connections.
//! - [`snapshot`]: `PairSnapshot`, the serialisable copy of a session the store keeps.
//! - [`workers`]: `Workers`, the HTTP worker threads sessions are placed on.
//!
//! Request path: an HTTP handler looks up the pair's session in the registry and calls
//! `allocate_seq` or `accept_seq` on its handle, which returns the `seq` and the pair keys. With
//! the in-memory store that takes the session's lock on the handler's thread. With a shared
//! store, relay A's handle hands out numbers of a block reserved in the store, and sends the
//! actor `AllocateSeq` for the next block. Relay B's handle queues the number for the store's
//! atomic replay check, which a task on a handler's thread runs in batches. A pair that reached a limit
//! goes to the actor, which stops it. The handler then does all sealing and I/O itself, so one
//! busy pair never makes another wait.
#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod fuzzing;
pub mod redis_store;
pub mod registry;
pub mod sealing;
pub mod session;
pub mod snapshot;
pub mod store;
pub mod supervisor;
pub mod workers;

pub use redis_store::{RedisSettings, RedisStore};
pub use registry::{SessionHandle, SessionParts, SessionRegistry};
pub use session::{
    AcceptSeq, AllocateSeq, Exchange, PeerSession, Retire, SEQ_BLOCK, SeqReply, SessionError, SessionLimits,
};
pub use snapshot::{PairSnapshot, Role};
pub use store::{MemoryStore, PoolRecord, SeqCheck, StateStore, StoreError};
pub use supervisor::{SnapshotSupervisor, StoreHealth, SupervisorSettings};
pub use workers::Workers;
