//! api-relay: an encrypting HTTP relay, deployed in pairs.
//!
//! An application sends a plain request to relay A (outbound role); relay A seals URL, headers
//! and body and sends them to relay B (inbound role), which opens them, proxies the plain
//! request to its `UPSTREAM` API and seals the answer back. One binary plays both roles.
//!
//! Layout:
//!
//! - [`config`]: settings from the environment and an optional YAML file.
//! - [`server`]: shared state, the route table, start-up; [`routes`]: the local routes.
//! - [`outbound`]: relay A: token check, pair pool, sealing, sending, opening the answer.
//! - [`inbound`]: relay B: pairing routes, checks, opening, proxying to `UPSTREAM`.
//! - [`body`]: streaming record sealing and opening; [`headers`]: what crosses each hop.
//! - [`client`]: the HTTP clients of both hops; [`error`]: the error-to-HTTP table.
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logs; [`demo`]: the one-process demo.
//!
//! The wire protocol is the `api-relay-protocol` crate; pair state lives in the actors of the
//! `api-relay-actors` crate.
#![forbid(unsafe_code)]

pub mod body;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod headers;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod routes;
pub mod server;
pub mod telemetry;
