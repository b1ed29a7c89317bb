//! Byte assertions whose failure messages show what was expected, what was found and the
//! bytes around it, escaped so that binary data stays readable.

/// Number of bytes shown on each side of a match or difference.
const WINDOW_BYTES: usize = 40;

/// Returns the offset of the first occurrence of `needle` in `haystack`. An empty needle
/// matches at offset 0.
pub fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// Panics if any of `needles` occurs in `haystack`. The message names every needle found,
/// its offset and the bytes around it.
pub fn assert_contains_none(haystack: &[u8], needles: &[&str]) {
    let leaks: Vec<String> = needles
        .iter()
        .filter_map(|needle| {
            let offset = find_bytes(haystack, needle.as_bytes())?;
            Some(format!(
                "  {needle:?} at offset {offset}: ...{}...",
                window_around(haystack, offset, needle.len())
            ))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "expected none of {needles:?} in {} bytes, found:\n{}",
        haystack.len(),
        leaks.join("\n")
    );
}

/// Panics unless every one of `needles` occurs in `haystack`. The message names the missing
/// needles and shows the start of the haystack.
pub fn assert_contains_all(haystack: &[u8], needles: &[&str]) {
    let missing: Vec<&str> =
        needles.iter().copied().filter(|needle| find_bytes(haystack, needle.as_bytes()).is_none()).collect();
    assert!(
        missing.is_empty(),
        "expected all of {needles:?} in {} bytes, missing {missing:?}; the bytes start with: {}",
        haystack.len(),
        escape(&haystack[..haystack.len().min(4 * WINDOW_BYTES)])
    );
}

/// Panics unless `actual` equals `expected`. The message starts with `label` and gives
/// both lengths, the first differing offset and the bytes around it, instead of printing
/// large bodies whole.
pub fn assert_bytes_eq(expected: &[u8], actual: &[u8], label: &str) {
    if expected == actual {
        return;
    }
    let offset = expected
        .iter()
        .zip(actual)
        .position(|(left, right)| left != right)
        .unwrap_or(expected.len().min(actual.len()));
    panic!(
        "{label}: expected {} bytes, got {} bytes, first difference at offset {offset}\n  \
         expected: ...{}...\n  actual:   ...{}...",
        expected.len(),
        actual.len(),
        window_around(expected, offset, 1),
        window_around(actual, offset, 1),
    );
}

/// Returns the escaped bytes from WINDOW_BYTES before `offset` to WINDOW_BYTES after
/// `offset + len`, clamped to the slice.
fn window_around(bytes: &[u8], offset: usize, len: usize) -> String {
    let start = offset.saturating_sub(WINDOW_BYTES).min(bytes.len());
    let end = (offset + len + WINDOW_BYTES).min(bytes.len());
    escape(&bytes[start..end])
}

fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
