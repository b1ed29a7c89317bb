//! Replays every file of the `snapshot` seed corpus in `protocol/fuzz/corpus/snapshot/` through
//! the fuzz target body, so stored records that once crashed the reader stay fixed.
//!
//! `cargo test -p api-relay-actors --test fuzz_corpus -- --ignored` rewrites the seed files from
//! `fuzzing::seed_inputs`. Files with other names, such as crashes found by fuzzing, stay.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use api_relay_actors::fuzzing;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/fuzz/corpus/snapshot")
}

#[test]
fn snapshot_corpus_replays() {
    let dir = corpus_dir();
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let data =
            std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| fuzzing::snapshot(&data))).is_err() {
            panic!("snapshot panicked on {}", path.display());
        }
        count += 1;
    }
    assert!(count > 0, "corpus {} is empty", dir.display());
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
