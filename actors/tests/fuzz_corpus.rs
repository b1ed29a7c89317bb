//! Replays every file of the `snapshot` seed corpus in `protocol/fuzz/corpus/snapshot/` through
//! the fuzz target body, so stored records that once crashed the reader stay fixed.
//!
//! `cargo test -p api-relay-actors --test fuzz_corpus -- --ignored` rewrites the seed files from
//! `fuzzing::seed_inputs`. Files with other names, such as crashes found by fuzzing, stay.

use std::path::{Path, PathBuf};

use api_relay_actors::fuzzing;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/fuzz/corpus/snapshot")
}

#[test]
fn snapshot_corpus_replays() {
    api_relay_protocol::fuzzing::replay_corpus(&corpus_dir(), fuzzing::snapshot);
}

#[test]
#[ignore = "rewrites the seed files; run by hand after changing fuzzing::seed_inputs"]
fn seed_corpus_is_written() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("create corpus folder");
    for (name, bytes) in fuzzing::seed_inputs() {
        std::fs::write(dir.join(name), bytes).expect("write seed file");
    }
}
