//! `PairSnapshot`: the serialisable copy of one session that a state store keeps, so a relay can
//! pick a pair up again after evicting it from memory.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::{ClientId, PairId, PairKeys};

/// Which side of the pair this relay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// Relay A: seals requests, allocates `seq`.
    Outbound,
    /// Relay B: opens requests, checks `seq` against the replay window.
    Inbound,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Outbound => "outbound",
            Role::Inbound => "inbound",
        }
    }
}

/// Everything needed to resume one pair.
#[derive(Debug, Clone)]
pub struct PairSnapshot {
    pub pair_id: PairId,
    pub client_id: ClientId,
    pub role: Role,
    pub keys: Arc<PairKeys>,
    /// Seconds since the Unix epoch when the pairing finished; bounds the pair's maximum age.
    pub created_at: u64,
    /// Relay A: the next `seq` to hand out.
    pub next_seq: u64,
    /// Relay B: the replay window.
    pub window: Option<ReplayWindow>,
}

impl PairSnapshot {
    /// A snapshot of a pair that just finished pairing.
    pub fn new(pair_id: PairId, client_id: ClientId, role: Role, keys: PairKeys, window_size: u64) -> Self {
        let window = (role == Role::Inbound).then(|| ReplayWindow::new(window_size));
        Self { pair_id, client_id, role, keys: Arc::new(keys), created_at: unix_now(), next_seq: 1, window }
    }

    /// Time since the pairing finished.
    pub fn age(&self) -> Duration {
        Duration::from_secs(unix_now().saturating_sub(self.created_at))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}
