//! Helpers shared by the integration tests of this crate. Each test file uses only part of them,
//! so dead-code warnings are off here.
#![allow(dead_code)]

pub mod redis_server;
pub mod threads;
