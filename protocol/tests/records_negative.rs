//! Negative cases for sealed body streams, modelled on the cases of chunked-encryption test
//! suites: truncation at every record boundary, reordering, duplication, data after the final
//! record, a last record that is not final, and the handling of an empty final record. The
//! limit on record item indexes is tested inside `records.rs`, which can start a stream there.

use api_relay_protocol::records::{RECORD_HEADER_LEN, RecordOpener, RecordSealer, open_body};
use api_relay_protocol::{ProtocolError, fuzzing};

/// Selector of the fixed request cipher, `MKE`, all flags set.
const SELECTOR: u8 = 0x0c;

fn opener() -> RecordOpener {
    RecordOpener::new(fuzzing::item_cipher(SELECTOR))
}

/// Seals each part as one record, the last one final, and returns the record frames.
fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut sealer = RecordSealer::new(fuzzing::item_cipher(SELECTOR));
    parts
        .iter()
        .enumerate()
        .map(|(index, part)| sealer.seal(part, index + 1 == parts.len()).expect("record seals"))
        .collect()
}

fn four_records() -> Vec<Vec<u8>> {
    frames(&[b"first", b"second record", &[0x33; 700], b"last"])
}

#[test]
fn intact_stream_opens() {
    let stream = four_records().concat();
    let body = open_body(&mut opener(), &stream).unwrap();
    assert_eq!(body, [&b"first"[..], b"second record", &[0x33; 700], b"last"].concat());
}

#[test]
fn truncation_at_every_record_boundary_is_rejected() {
    let records = four_records();
    for records_kept in 0..records.len() {
        let stream = records[..records_kept].concat();
        let error = open_body(&mut opener(), &stream).unwrap_err();
        assert!(matches!(error, ProtocolError::MalformedBody { .. }), "{records_kept} records: {error:?}");
    }
}

#[test]
fn truncation_inside_every_record_is_rejected() {
    let stream = four_records().concat();
    for cut in 0..stream.len() {
        assert!(open_body(&mut opener(), &stream[..cut]).is_err(), "prefix of {cut} bytes accepted");
    }
}

#[test]
fn every_reordering_is_rejected() {
    let records = four_records();
    let mut order = [0, 1, 2, 3];
    let mut checked = 0;
    // The intact stream is the first of the 24 orders, so the loop checks the other 23.
    while next_permutation(&mut order) {
        let stream: Vec<u8> = order.iter().flat_map(|&index| records[index].clone()).collect();
        assert!(open_body(&mut opener(), &stream).is_err(), "order {order:?} accepted");
        checked += 1;
    }
    assert_eq!(checked, 23);
}

#[test]
fn duplicated_record_is_rejected() {
    let records = four_records();
    for duplicate in 0..records.len() {
        let mut stream = Vec::new();
        for (index, record) in records.iter().enumerate() {
            stream.extend_from_slice(record);
            if index == duplicate {
                stream.extend_from_slice(record);
            }
        }
        assert!(open_body(&mut opener(), &stream).is_err(), "record {duplicate} twice accepted");
    }
}

#[test]
fn data_after_final_record_is_rejected() {
    let stream = four_records().concat();
    for trailing in [&[0u8][..], &[1, 0, 0, 16], &four_records()[0]] {
        let with_trailing = [&stream[..], trailing].concat();
        let error = open_body(&mut opener(), &with_trailing).unwrap_err();
        assert_eq!(error, ProtocolError::MalformedBody { reason: "data after the final record" });
    }
}

#[test]
fn non_final_last_record_is_rejected() {
    let mut sealer = RecordSealer::new(fuzzing::item_cipher(SELECTOR));
    let stream = [sealer.seal(b"one", false).unwrap(), sealer.seal(b"two", false).unwrap()].concat();
    let error = open_body(&mut opener(), &stream).unwrap_err();
    assert_eq!(error, ProtocolError::MalformedBody { reason: "body ended before its final record" });
}

#[test]
fn forged_final_flag_is_rejected() {
    let mut records = four_records();
    records[1][0] = 1;
    let stream = records[..2].concat();
    assert_eq!(
        open_body(&mut opener(), &stream).unwrap_err(),
        ProtocolError::OpenFailed { item: "body record" }
    );
}

#[test]
fn cleared_final_flag_is_rejected() {
    let mut records = four_records();
    records[3][0] = 0;
    let stream = records.concat();
    assert_eq!(
        open_body(&mut opener(), &stream).unwrap_err(),
        ProtocolError::OpenFailed { item: "body record" }
    );
}

#[test]
fn empty_final_record_ends_a_body() {
    let records = frames(&[b"data", b""]);
    assert_eq!(records[1].len(), RECORD_HEADER_LEN + 16, "empty record is header and tag");
    assert_eq!(open_body(&mut opener(), &records.concat()).unwrap(), b"data");

    let only_empty = frames(&[b""]);
    assert_eq!(open_body(&mut opener(), &only_empty.concat()).unwrap(), b"");
}

#[test]
fn empty_final_record_cannot_be_dropped_or_repeated() {
    let records = frames(&[b"data", b""]);
    assert!(open_body(&mut opener(), &records[0]).is_err(), "missing empty final record accepted");
    let repeated = [&records[..], &records[1..]].concat().concat();
    assert!(open_body(&mut opener(), &repeated).is_err(), "repeated empty final record accepted");
}

#[test]
fn empty_non_final_record_opens_in_place() {
    // An empty record that is not final carries no data but still takes an item index.
    let records = frames(&[b"", b"", b"end"]);
    assert_eq!(open_body(&mut opener(), &records.concat()).unwrap(), b"end");
    let without_first = records[1..].concat();
    assert!(open_body(&mut opener(), &without_first).is_err(), "dropped empty record accepted");
}

#[test]
fn record_shorter_than_tag_is_rejected() {
    for len in [0u8, 1, 15] {
        let stream = [1, 0, 0, len];
        let error = open_body(&mut opener(), &stream).unwrap_err();
        assert_eq!(
            error,
            ProtocolError::MalformedBody { reason: "record length out of range" },
            "length {len}"
        );
    }
}

/// Rearranges `items` into the next greater permutation, returning false after the last.
fn next_permutation(items: &mut [usize]) -> bool {
    let Some(pivot) = (1..items.len()).rev().find(|&index| items[index - 1] < items[index]) else {
        return false;
    };
    let swap =
        (pivot..items.len()).rev().find(|&index| items[index] > items[pivot - 1]).expect("larger item");
    items.swap(pivot - 1, swap);
    items[pivot..].reverse();
    true
}
