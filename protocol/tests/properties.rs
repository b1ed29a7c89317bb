//! Property tests of the wire protocol: sealing round trips for every encode type and flag
//! combination, rejection of any single modification of sealed bytes, the header block codec,
//! and the replay window against a model.

use std::collections::HashSet;

use api_relay_protocol::fields::{self, FieldLimits};
use api_relay_protocol::records::{RecordOpener, RecordSealer, open_body, seal_body};
use api_relay_protocol::relay_header::SealFlags;
use api_relay_protocol::replay::ReplayWindow;
use api_relay_protocol::seal::{ExchangeContext, ItemCipher};
use api_relay_protocol::{
    Direction, EncodeType, MAX_RECORD_PLAINTEXT, PairKeys, ProtocolError, fuzzing, padding,
};
use proptest::prelude::*;

const LIMITS: FieldLimits = FieldLimits { max_fields: 1000, max_bytes: 1 << 20 };

fn cipher(
    keys: &PairKeys,
    direction: Direction,
    encode_type: EncodeType,
    flags: SealFlags,
    seq: u64,
) -> ItemCipher {
    let context = ExchangeContext {
        direction,
        client_id: fuzzing::client_id(),
        pair_id: fuzzing::pair_id(),
        seq,
        encode_type,
        flags,
    };
    ItemCipher::new(keys.exchange(direction, encode_type, seq), context)
}

fn encode_types() -> impl Strategy<Value = EncodeType> {
    prop_oneof![Just(EncodeType::Mke), Just(EncodeType::Mte)]
}

fn directions() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Request), Just(Direction::Response)]
}

/// Version 1 always seals the body, so only the URL and headers flags vary.
fn seal_flags() -> impl Strategy<Value = SealFlags> {
    (any::<bool>(), any::<bool>()).prop_map(|(url, headers)| SealFlags { url, headers, body: true })
}

/// Header lists as relays send them: non-empty names, any value bytes, repeats allowed.
fn header_lists() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let name = prop::collection::vec(any::<u8>(), 1..40);
    let value = prop::collection::vec(any::<u8>(), 0..300);
    prop::collection::vec((name, value), 0..30)
}

/// The lines of `headers` as [`fields::decode`] returns them.
fn borrowed(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<fields::FieldRef<'_>> {
    headers.iter().map(|(name, value)| (name.as_slice(), value.as_slice())).collect()
}

/// Bodies up to a little over two records, so some cross record boundaries.
fn bodies() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..2000),
        1 => (0..2 * MAX_RECORD_PLAINTEXT + 100, any::<u8>()).prop_map(|(len, byte)| vec![byte; len]),
    ]
}

/// A body sealed the way the relay seals it: `MTE` pads the whole body first.
fn seal_relay_body(cipher: ItemCipher, body: &[u8]) -> Vec<u8> {
    let plain = match cipher.context().encode_type {
        EncodeType::Mke => body.to_vec(),
        EncodeType::Mte => padding::pad_body(body),
    };
    seal_body(&mut RecordSealer::new(cipher), &plain).expect("body seals")
}

fn open_relay_body(cipher: ItemCipher, sealed: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let encode_type = cipher.context().encode_type;
    let plain = open_body(&mut RecordOpener::new(cipher), sealed)?;
    match encode_type {
        EncodeType::Mke => Ok(plain),
        EncodeType::Mte => padding::unpad_body(&plain).map(<[u8]>::to_vec),
    }
}

/// Applies one modification of a sealed item: `kind` 0 flips a bit, 1 truncates, 2 extends.
fn modify(sealed: &[u8], kind: u8, position: usize, bit: u8, extra: &[u8]) -> Vec<u8> {
    let mut modified = sealed.to_vec();
    match kind {
        0 => modified[position % sealed.len()] ^= 1 << bit,
        1 => modified.truncate(position % sealed.len()),
        _ => modified.extend_from_slice(extra),
    }
    modified
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn exchanges_round_trip(
        encode_type in encode_types(),
        direction in directions(),
        flags in seal_flags(),
        seq in 1..u64::MAX,
        url in prop::collection::vec(any::<u8>(), 0..3000),
        headers in header_lists(),
        body in bodies(),
    ) {
        let keys = fuzzing::pair_keys();
        let sender = cipher(&keys, direction, encode_type, flags, seq);
        let receiver = cipher(&keys, direction, encode_type, flags, seq);

        prop_assert_eq!(receiver.open_url(&sender.seal_url(&url)).unwrap(), url);
        let block = fields::encode(&headers);
        let opened_block = receiver.open_headers(&sender.seal_headers(&block)).unwrap();
        prop_assert_eq!(fields::decode(&opened_block, LIMITS).unwrap(), borrowed(&headers));
        let sealed = seal_relay_body(sender, &body);
        prop_assert_eq!(open_relay_body(receiver, &sealed).unwrap(), body);
    }

    #[test]
    fn modified_sealed_item_is_rejected(
        encode_type in encode_types(),
        flags in seal_flags(),
        url in prop::collection::vec(any::<u8>(), 0..500),
        headers_item in any::<bool>(),
        kind in 0..3u8,
        position in any::<usize>(),
        bit in 0..8u8,
        extra in prop::collection::vec(any::<u8>(), 1..40),
    ) {
        let cipher = cipher(&fuzzing::pair_keys(), Direction::Request, encode_type, flags, 3);
        let open = |sealed: &[u8]| match headers_item {
            false => cipher.open_url(sealed),
            true => cipher.open_headers(sealed),
        };
        let sealed = if headers_item { cipher.seal_headers(&url) } else { cipher.seal_url(&url) };
        let modified = modify(&sealed, kind, position, bit, &extra);
        prop_assert!(open(&modified).is_err(), "modification {} at {} was accepted", kind, position);
    }

    #[test]
    fn modified_record_stream_is_rejected(
        encode_type in encode_types(),
        body in prop::collection::vec(any::<u8>(), 0..3000),
        record_len in 1..1000usize,
        kind in 0..3u8,
        position in any::<usize>(),
        bit in 0..8u8,
        extra in prop::collection::vec(any::<u8>(), 1..40),
    ) {
        let make = || cipher(&fuzzing::pair_keys(), Direction::Response, encode_type, SealFlags::ALL, 11);
        // Short records give streams of many records, so modifications hit every part of the framing.
        let mut sealer = RecordSealer::new(make());
        let mut sealed = Vec::new();
        let mut chunks = body.chunks(record_len).peekable();
        while let Some(chunk) = chunks.next() {
            sealed.extend(sealer.seal(chunk, chunks.peek().is_none()).unwrap());
        }
        if !sealer.is_finished() {
            sealed.extend(sealer.seal(&[], true).unwrap());
        }
        prop_assert_eq!(open_body(&mut RecordOpener::new(make()), &sealed).unwrap(), body);

        let modified = modify(&sealed, kind, position, bit, &extra);
        prop_assert!(
            open_body(&mut RecordOpener::new(make()), &modified).is_err(),
            "modification {} at {} was accepted", kind, position
        );
    }

    #[test]
    fn field_sections_round_trip(headers in header_lists()) {
        let block = fields::encode(&headers);
        prop_assert_eq!(fields::decode(&block, LIMITS).unwrap(), borrowed(&headers));
    }

    #[test]
    fn truncated_field_section_is_rejected(headers in header_lists(), cut in any::<usize>()) {
        let block = fields::encode(&headers);
        let cut = cut % block.len();
        prop_assert!(fields::decode(&block[..cut], LIMITS).is_err(), "prefix of {} bytes accepted", cut);
    }

    /// The replay window behaves as the set of accepted numbers, cut off `size` below the highest:
    /// inside the window a fresh `seq` is accepted and a repeated one rejected as replayed, and
    /// below it every `seq` is rejected as stale.
    #[test]
    fn replay_window_matches_set_model(
        size in prop_oneof![Just(64u64), Just(128), Just(1024)],
        steps in prop::collection::vec((0..2u8, 0..3000u64), 1..400),
    ) {
        let mut window = ReplayWindow::new(size);
        let mut accepted = HashSet::new();
        let mut highest = 0u64;
        for (mode, value) in steps {
            // Half the steps land near the highest number, where reordering happens.
            let seq = match mode {
                0 => value,
                _ => (highest + 20).saturating_sub(value % (size + 40)),
            };
            let expected = if seq == 0 {
                Err(ProtocolError::Stale { seq })
            } else if seq > highest {
                Ok(())
            } else if highest - seq >= window.size() {
                Err(ProtocolError::Stale { seq })
            } else if accepted.contains(&seq) {
                Err(ProtocolError::Replayed { seq })
            } else {
                Ok(())
            };
            prop_assert_eq!(window.check_and_mark(seq), expected.clone(), "seq {}", seq);
            if expected.is_ok() {
                accepted.insert(seq);
                highest = highest.max(seq);
            }
            prop_assert_eq!(window.highest(), highest);
        }
    }
}
