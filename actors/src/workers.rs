//! The HTTP worker threads a relay runs, so relay A can start each session of a pool on a
//! different worker and each request can use a session on its own worker.
//!
//! A message to an actor on the same thread is a queue push and a local wake. A message to an
//! actor on another worker wakes that thread, and the reply wakes the first one again, which
//! costs two thread switches per exchange. Relay A spreads the sessions of a new pool over the
//! workers and prefers a session on the calling worker, so most exchanges stay on one thread.

use std::cell::Cell;
use std::sync::RwLock;

use actix::{Arbiter, ArbiterHandle};

thread_local! {
    /// Index of the worker running on this thread, set by [`Workers::register_current`].
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The registered worker threads, in the order they registered.
#[derive(Default)]
pub struct Workers {
    arbiters: RwLock<Vec<ArbiterHandle>>,
}

impl Workers {
    /// Registers the calling thread's arbiter as a worker, once per thread. Call it on each
    /// worker thread, for example from the HTTP server's application factory.
    pub fn register_current(&self) {
        if CURRENT.get().is_some() {
            return;
        }
        let mut arbiters = self.arbiters.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        CURRENT.set(Some(arbiters.len()));
        arbiters.push(Arbiter::current());
    }

    /// Index of the worker running on the calling thread, if it registered.
    pub fn current() -> Option<usize> {
        CURRENT.get()
    }

    /// Returns the worker for the `n`-th of several sessions: workers in turn, starting with the
    /// calling one, so a pool of one session stays where it was created. `None` when no worker
    /// registered.
    pub fn pick(&self, n: usize) -> Option<(usize, ArbiterHandle)> {
        let arbiters = self.arbiters.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if arbiters.is_empty() {
            return None;
        }
        let start = Self::current().unwrap_or(0);
        let index = (start + n) % arbiters.len();
        Some((index, arbiters[index].clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix::test]
    async fn workers_register_once_and_are_picked_in_turn() {
        let workers = std::sync::Arc::new(Workers::default());
        assert!(workers.pick(0).is_none(), "no worker registered yet");
        workers.register_current();
        workers.register_current();
        assert_eq!(Workers::current(), Some(0));

        let other = Arbiter::new();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let remote = std::sync::Arc::clone(&workers);
        assert!(other.spawn_fn(move || {
            remote.register_current();
            let _ = sender.send(Workers::current());
        }));
        assert_eq!(receiver.await.ok().flatten(), Some(1), "the second thread gets index 1");

        let picked: Vec<usize> = (0..4).filter_map(|n| workers.pick(n).map(|(index, _)| index)).collect();
        assert_eq!(picked, [0, 1, 0, 1], "picked from the calling worker on, in turn");
        other.stop();
    }
}
