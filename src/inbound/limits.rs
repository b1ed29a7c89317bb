//! Limits on pairing, relay B's most expensive operation (one hybrid KEM encapsulation per
//! offered pair): at most `MAX_CONCURRENT_PAIRINGS` at once, and at most
//! `PAIRING_REQUESTS_PER_MINUTE` per client id (per address for requests without one), so a
//! flood of pairing requests cannot starve exchanges on existing pairs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{RelayCode, RelayError};

/// Length of one rate window.
const WINDOW: Duration = Duration::from_secs(60);
/// Tracked clients above which expired windows are swept, so the map stays bounded.
const SWEEP_ABOVE: usize = 10_000;

/// Admission control for `POST /api/mte-pair`.
pub struct PairingLimits {
    concurrent: Semaphore,
    per_minute: u32,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl PairingLimits {
    pub fn new(max_concurrent: usize, per_minute: u32) -> Self {
        Self { concurrent: Semaphore::new(max_concurrent), per_minute, windows: Mutex::default() }
    }

    /// Admits one pairing request from `client` (a client id's uuid or an address); the
    /// returned permit holds a concurrency slot until dropped.
    ///
    /// # Errors
    /// 564 when `client` used up its requests of this minute or every slot is busy.
    pub fn admit(&self, client: &str) -> Result<SemaphorePermit<'_>, RelayError> {
        self.count(client)?;
        self.concurrent.try_acquire().map_err(|_| {
            RelayError::relay(
                RelayCode::PairingRejected,
                "too many concurrent pairing requests; retry shortly",
            )
        })
    }

    fn count(&self, client: &str) -> Result<(), RelayError> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() > SWEEP_ABOVE {
            windows.retain(|_, (started, _)| now.duration_since(*started) < WINDOW);
        }
        let (started, count) = windows.entry(client.to_owned()).or_insert((now, 0));
        if now.duration_since(*started) >= WINDOW {
            *started = now;
            *count = 0;
        }
        if *count >= self.per_minute {
            return Err(RelayError::relay(
                RelayCode::PairingRejected,
                "too many pairing requests from this client in the last minute; retry later",
            ));
        }
        *count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_over_its_rate_is_rejected_and_others_are_not() {
        let limits = PairingLimits::new(8, 2);
        assert!(limits.admit("a").is_ok());
        assert!(limits.admit("a").is_ok());
        assert!(limits.admit("a").is_err());
        assert!(limits.admit("b").is_ok());
    }

    #[test]
    fn busy_slots_reject_until_released() {
        let limits = PairingLimits::new(1, 100);
        let held = limits.admit("a").unwrap();
        assert!(limits.admit("b").is_err());
        drop(held);
        assert!(limits.admit("b").is_ok());
    }
}
