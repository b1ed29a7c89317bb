//! Replays every file of the seed corpora in `protocol/fuzz/corpus/` through the fuzz target
//! bodies, so inputs that once crashed a parser stay fixed. The `snapshot` corpus replays in
//! `actors/tests/fuzz_corpus.rs`.
//!
//! `cargo test -p api-relay-protocol --test fuzz_corpus -- --ignored` rewrites the seed files
//! from `fuzzing::seed_inputs`. Files of the same folder with other names, such as crashes found
//! by fuzzing, are left in place.

use std::path::{Path, PathBuf};

use api_relay_protocol::fuzzing;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// Runs `body` on every file of the target's corpus and names the file that panics.
fn replay(target: &str, body: fn(&[u8])) {
    fuzzing::replay_corpus(&corpus_dir(target), body);
}

#[test]
fn relay_header_corpus_replays() {
    replay("relay_header", fuzzing::relay_header);
}

#[test]
fn pairing_request_corpus_replays() {
    replay("pairing_request", fuzzing::pairing_request);
}

#[test]
fn pairing_response_corpus_replays() {
    replay("pairing_response", fuzzing::pairing_response);
}

#[test]
fn records_corpus_replays() {
    replay("records", fuzzing::records);
}

#[test]
fn header_block_corpus_replays() {
    replay("header_block", fuzzing::header_block);
}

#[test]
fn sealed_item_corpus_replays() {
    replay("sealed_item", fuzzing::sealed_item);
}

#[test]
fn padding_corpus_replays() {
    replay("padding", fuzzing::padding);
}

#[test]
#[ignore = "rewrites the seed files; run by hand after changing fuzzing::seed_inputs"]
fn seed_corpora_are_written() {
    for (target, name, bytes) in fuzzing::seed_inputs() {
        assert!(fuzzing::TARGETS.contains(&target), "seed for unknown target {target}");
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("create corpus folder");
        std::fs::write(dir.join(name), bytes).expect("write seed file");
    }
}
