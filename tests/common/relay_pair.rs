//! A pair of relays as deployed: relay A (outbound, next to the client) and relay B
//! (inbound, next to the upstream), sharing the test secrets below.

use std::thread;
use std::time::Duration;

use super::free_port;
use super::relay::{RelayBuilder, RelayProcess};

/// Value of `OUTBOUND_TOKEN` for both relays of a pair. A made-up test value.
pub const OUTBOUND_TOKEN_VALUE: &str = "test-outbound-token-7c2f9a4e1b8d6053c9e2a7f14b6d8e0a";
/// Value of `CLIENT_ID_SECRET` for both relays of a pair. A made-up test value.
pub const CLIENT_ID_SECRET_VALUE: &str =
    "test-client-id-secret-3e91b5d07a4c2f8e6b1d9a05c7e3f42b8a6d1c0e9f5b7a32";

/// Number of fresh ports tried when starting relay B, because another process may take a
/// port between `free_port` and the relay's bind.
const FRESH_PORT_ATTEMPTS: usize = 3;
/// Number of attempts to restart relay B on its port, which the old socket may still hold
/// for a moment.
const RESTART_ATTEMPTS: usize = 10;
/// Pause between two attempts to restart relay B.
const RETRY_DELAY: Duration = Duration::from_millis(300);
/// Maximum time `restart_b` waits for B to exit after SIGTERM before it sends SIGKILL.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns a builder with the variables that every relay requires: `UPSTREAM`,
/// `CLIENT_ID_SECRET` and `OUTBOUND_TOKEN`.
pub fn relay_builder(upstream_url: &str) -> RelayBuilder {
    RelayBuilder::new()
        .env("UPSTREAM", upstream_url)
        .env("CLIENT_ID_SECRET", CLIENT_ID_SECRET_VALUE)
        .env("OUTBOUND_TOKEN", OUTBOUND_TOKEN_VALUE)
}

/// Relay A (outbound) and relay B (inbound, on a fixed port so that it can restart).
pub struct RelayPair {
    pub a: RelayProcess,
    pub b: RelayProcess,
}

impl RelayPair {
    /// Starts B with `UPSTREAM=upstream_url`, then A with the same required variables.
    /// Both get `extra_env` as well.
    pub fn start(upstream_url: &str, extra_env: &[(&str, &str)]) -> RelayPair {
        RelayPair::start_with(upstream_url, extra_env, extra_env)
    }

    /// Same as [`RelayPair::start`] with separate extra variables for A and B.
    pub fn start_with(upstream_url: &str, env_a: &[(&str, &str)], env_b: &[(&str, &str)]) -> RelayPair {
        let b = spawn_on_free_port(relay_builder(upstream_url).envs(env_b));
        // A requires UPSTREAM as well, and any valid URL satisfies that requirement.
        let a = relay_builder(upstream_url).envs(env_a).spawn();
        RelayPair { a, b }
    }

    /// Stops B with SIGTERM (SIGKILL after 10 s) and starts it again on the same port with
    /// the same environment.
    pub fn restart_b(&mut self) {
        self.b.terminate();
        if self.b.wait_exit(GRACEFUL_STOP_TIMEOUT).is_none() {
            self.b.kill();
        }
        self.respawn_b();
    }

    /// Stops B like [`RelayPair::restart_b`] and starts it again on the same port with the
    /// environment that `change` makes from the old one, for example a rotated secret.
    pub fn restart_b_with(&mut self, change: impl FnOnce(RelayBuilder) -> RelayBuilder) {
        self.b.terminate();
        if self.b.wait_exit(GRACEFUL_STOP_TIMEOUT).is_none() {
            self.b.kill();
        }
        let builder = change(self.b.builder().clone());
        self.spawn_b(builder);
    }

    /// Starts B again on the same port with the same environment. A B that is still
    /// running is killed first. Use it after stopping B in a specific way.
    pub fn respawn_b(&mut self) {
        self.b.kill();
        let builder = self.b.builder().clone();
        self.spawn_b(builder);
    }

    /// Starts `builder` as the new B, retrying while the old socket still occupies the port.
    fn spawn_b(&mut self, builder: RelayBuilder) {
        let mut last_error = String::new();
        for _ in 0..RESTART_ATTEMPTS {
            match builder.try_spawn() {
                Ok(process) => {
                    self.b = process;
                    return;
                }
                Err(error) => last_error = error,
            }
            thread::sleep(RETRY_DELAY);
        }
        panic!("restarting relay B failed {RESTART_ATTEMPTS} times, last failure: {last_error}");
    }
}

/// Starts `builder` on a fixed free port, with a fresh port for each attempt.
fn spawn_on_free_port(builder: RelayBuilder) -> RelayProcess {
    let mut last_error = String::new();
    for _ in 0..FRESH_PORT_ATTEMPTS {
        match builder.clone().port(free_port()).try_spawn() {
            Ok(process) => return process,
            Err(error) => last_error = error,
        }
    }
    panic!("starting relay B failed {FRESH_PORT_ATTEMPTS} times, last failure: {last_error}");
}
