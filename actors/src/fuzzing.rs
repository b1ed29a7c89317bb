//! Body of the `snapshot` fuzz target in `protocol/fuzz`, and the seed inputs of its corpus.
//!
//! The fuzz target and the corpus regression test in `actors/tests/fuzz_corpus.rs` call the same
//! function, so every file in the corpus replays under `cargo test`. The secrets here are fixed
//! and public: this module exists for testing and is not a stable API.

use std::collections::HashMap;

use api_relay_protocol::fuzzing as protocol_fuzzing;

use crate::Role;
use crate::redis_store::read_record;
use crate::sealing::{RecordBinding, RecordSealer};

/// `CLIENT_ID_SECRET` of the fixed store.
const SECRET: &[u8] = b"fuzz CLIENT_ID_SECRET";
/// `CLIENT_ID_SECRET_PREVIOUS` of the fixed store.
const PREVIOUS_SECRET: &[u8] = b"fuzz CLIENT_ID_SECRET_PREVIOUS";
/// Creation time of the seed records, in seconds since the Unix epoch.
const CREATED_AT: u64 = 1_700_000_000;

/// Reads a pair record from the fixed store.
///
/// Bit 0 of the first byte picks the role (0 outbound, 1 inbound). The rest is the hash fields
/// as `name length u8 | name | value length u8 | value`, repeated. A field cut short at the
/// end is ignored, and names that are not UTF-8 are read lossily.
pub fn snapshot(data: &[u8]) {
    let Some((&selector, mut rest)) = data.split_first() else {
        return;
    };
    let role = if selector & 1 == 0 { Role::Outbound } else { Role::Inbound };
    let mut fields = HashMap::new();
    while let Some((name, value, tail)) = split_field(rest) {
        fields.insert(String::from_utf8_lossy(name).into_owned(), value.to_vec());
        rest = tail;
    }
    let sealer = RecordSealer::new(SECRET, Some(PREVIOUS_SECRET));
    if let Ok(snapshot) = read_record(&sealer, &protocol_fuzzing::pair_id(), role, &fields) {
        assert_eq!(snapshot.role, role, "role of the read record");
        assert_eq!(snapshot.window.is_some(), role == Role::Inbound, "window present only on relay B");
    }
}

fn split_field(bytes: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&name_len, rest) = bytes.split_first()?;
    let (name, rest) = rest.split_at_checked(usize::from(name_len))?;
    let (&value_len, rest) = rest.split_first()?;
    let (value, rest) = rest.split_at_checked(usize::from(value_len))?;
    Some((name, value, rest))
}

/// Seed inputs of the `snapshot` target, as (file name, bytes). The sealed keys take a random
/// nonce, so the bytes differ per call.
pub fn seed_inputs() -> Vec<(String, Vec<u8>)> {
    let pair_id = protocol_fuzzing::pair_id();
    let client_id = protocol_fuzzing::client_id();
    let keys = protocol_fuzzing::pair_keys();
    let seal = |secret: &[u8], role: Role| {
        let binding =
            RecordBinding { pair_id: &pair_id, role, created_at: CREATED_AT, client_id: &client_id };
        RecordSealer::new(secret, None).seal(&keys, &binding)
    };
    let created = CREATED_AT.to_string();
    let record = |role: Role, sealed: &[u8], extra: &[(&str, &[u8])]| {
        let mut input = vec![u8::from(role == Role::Inbound)];
        let common: [(&str, &[u8]); 4] = [
            ("version", b"1"),
            ("client", client_id.as_str().as_bytes()),
            ("created", created.as_bytes()),
            ("keys", sealed),
        ];
        for (name, value) in common.iter().chain(extra) {
            input.push(u8::try_from(name.len()).expect("short field name"));
            input.extend_from_slice(name.as_bytes());
            input.push(u8::try_from(value.len()).expect("short field value"));
            input.extend_from_slice(value);
        }
        input
    };

    let outbound = seal(SECRET, Role::Outbound);
    let inbound = seal(SECRET, Role::Inbound);
    let mut tampered = inbound.clone();
    tampered[20] ^= 1;
    vec![
        ("outbound".to_owned(), record(Role::Outbound, &outbound, &[("reserved", b"4096")])),
        ("inbound".to_owned(), record(Role::Inbound, &inbound, &[("window", b"1024"), ("highest", b"0")])),
        ("previous_secret".to_owned(), record(Role::Outbound, &seal(PREVIOUS_SECRET, Role::Outbound), &[])),
        ("wrong_role".to_owned(), record(Role::Inbound, &outbound, &[("window", b"64")])),
        ("tampered_keys".to_owned(), record(Role::Inbound, &tampered, &[])),
        ("truncated_keys".to_owned(), record(Role::Outbound, &outbound[..50], &[])),
        ("no_fields".to_owned(), vec![1]),
    ]
}
