//! A body as a stream of sealed records, so neither relay needs a whole body in memory.
//!
//! Each record on the wire is a 4-byte header, then the sealed record:
//!
//! ```text
//! flags u8 (0 = more records follow, 1 = final record) | length u24 big-endian | ciphertext || tag
//! ```
//!
//! Records take item indexes 2, 3, ... in order, and the final flag is part of each record's AAD.
//! A body always ends with exactly one final record, which may be empty, so a receiver detects
//! reordering, dropping or duplicating records (wrong item index), truncation (stream ends
//! without a final record), forged final flags (AAD mismatch) and data after the final record.

use crate::seal::{ITEM_FIRST_RECORD, ItemCipher, TAG_LEN};
use crate::{MAX_RECORD_PLAINTEXT, ProtocolError};

/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 4;
const FLAG_FINAL: u8 = 1;
const MAX_SEALED_RECORD: usize = MAX_RECORD_PLAINTEXT + TAG_LEN;

/// Wire size of a body of `len` bytes sealed in full records plus a final one.
pub fn sealed_body_len(len: u64) -> u64 {
    let records = len / MAX_RECORD_PLAINTEXT as u64 + 1;
    len + records * (RECORD_HEADER_LEN + TAG_LEN) as u64
}

/// Seals consecutive records of one body.
#[derive(Debug)]
pub struct RecordSealer {
    cipher: ItemCipher,
    next_item: u32,
    finished: bool,
}

impl RecordSealer {
    pub fn new(cipher: ItemCipher) -> Self {
        Self { cipher, next_item: ITEM_FIRST_RECORD, finished: false }
    }

    /// Seals up to [`MAX_RECORD_PLAINTEXT`] bytes as the next record and returns its frame.
    ///
    /// # Errors
    /// `CounterExhausted` after 2^32 - 3 records (items 2 to 2^32 - 2) or once the final record was sealed;
    /// `MalformedBody` when `plaintext` is longer than one record.
    pub fn seal(&mut self, plaintext: &[u8], is_final: bool) -> Result<Vec<u8>, ProtocolError> {
        if plaintext.len() > MAX_RECORD_PLAINTEXT {
            return Err(ProtocolError::MalformedBody { reason: "record longer than 64 KiB" });
        }
        if self.finished || self.next_item == u32::MAX {
            return Err(ProtocolError::CounterExhausted { counter: "body records" });
        }
        let mut frame = Vec::with_capacity(RECORD_HEADER_LEN + plaintext.len() + TAG_LEN);
        let sealed_len = (plaintext.len() + TAG_LEN) as u32;
        frame.push(if is_final { FLAG_FINAL } else { 0 });
        frame.extend_from_slice(&sealed_len.to_be_bytes()[1..]);
        let mut body = Vec::with_capacity(plaintext.len() + TAG_LEN);
        body.extend_from_slice(plaintext);
        self.cipher.seal_in_place(self.next_item, is_final, &mut body);
        frame.extend_from_slice(&body);
        self.next_item += 1;
        self.finished = is_final;
        Ok(frame)
    }

    /// Whether the final record was sealed.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// Opens the records of one body from bytes arriving in arbitrary chunks.
#[derive(Debug)]
pub struct RecordOpener {
    cipher: ItemCipher,
    next_item: u32,
    finished: bool,
    pending: Vec<u8>,
    start: usize,
}

impl RecordOpener {
    pub fn new(cipher: ItemCipher) -> Self {
        Self { cipher, next_item: ITEM_FIRST_RECORD, finished: false, pending: Vec::new(), start: 0 }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.pending.len() / 2 {
            self.pending.drain(..self.start);
            self.start = 0;
        }
        self.pending.extend_from_slice(bytes);
    }

    /// Returns the plaintext of the next complete record, or `None` until more bytes arrive.
    ///
    /// # Errors
    /// `MalformedBody` for a bad header or data after the final record, `OpenFailed` when a
    /// record does not authenticate in its position. Both are final: the body must be discarded.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        let available = &self.pending[self.start..];
        if self.finished {
            return match available.is_empty() {
                true => Ok(None),
                false => Err(ProtocolError::MalformedBody { reason: "data after the final record" }),
            };
        }
        let Some(header) = available.first_chunk::<RECORD_HEADER_LEN>() else {
            return Ok(None);
        };
        let is_final = match header[0] {
            0 => false,
            FLAG_FINAL => true,
            _ => return Err(ProtocolError::MalformedBody { reason: "unknown record flags" }),
        };
        let sealed_len = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
        if !(TAG_LEN..=MAX_SEALED_RECORD).contains(&sealed_len) {
            return Err(ProtocolError::MalformedBody { reason: "record length out of range" });
        }
        if available.len() < RECORD_HEADER_LEN + sealed_len {
            return Ok(None);
        }
        if self.next_item == u32::MAX {
            return Err(ProtocolError::CounterExhausted { counter: "body records" });
        }
        let body_start = self.start + RECORD_HEADER_LEN;
        let mut record = self.pending[body_start..body_start + sealed_len].to_vec();
        self.cipher.open_in_place(self.next_item, is_final, &mut record, "body record")?;
        self.start = body_start + sealed_len;
        self.next_item += 1;
        self.finished = is_final;
        Ok(Some(record))
    }

    /// Checks that the body ended properly once the transport reports its end.
    ///
    /// # Errors
    /// `MalformedBody` when the final record is missing or bytes are left over.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if !self.finished {
            return Err(ProtocolError::MalformedBody { reason: "body ended before its final record" });
        }
        if self.start < self.pending.len() {
            return Err(ProtocolError::MalformedBody { reason: "data after the final record" });
        }
        Ok(())
    }

    /// Whether the final record was opened.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// Seals a whole in-memory body as records: full records, then a final one.
///
/// # Errors
/// As [`RecordSealer::seal`].
pub fn seal_body(sealer: &mut RecordSealer, body: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::with_capacity(sealed_body_len(body.len() as u64) as usize);
    let mut chunks = body.chunks(MAX_RECORD_PLAINTEXT).peekable();
    while let Some(chunk) = chunks.next() {
        let is_final = chunks.peek().is_none() && chunk.len() < MAX_RECORD_PLAINTEXT;
        out.extend_from_slice(&sealer.seal(chunk, is_final)?);
    }
    if !sealer.is_finished() {
        out.extend_from_slice(&sealer.seal(&[], true)?);
    }
    Ok(out)
}

/// Opens a whole in-memory sealed body.
///
/// # Errors
/// As [`RecordOpener::next_record`] and [`RecordOpener::finish`].
pub fn open_body(opener: &mut RecordOpener, sealed: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    opener.push(sealed);
    let mut body = Vec::new();
    while let Some(record) = opener.next_record()? {
        body.extend_from_slice(&record);
    }
    opener.finish()?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::tests::cipher;
    use crate::{Direction, EncodeType};

    fn sealer() -> RecordSealer {
        RecordSealer::new(cipher(Direction::Request, EncodeType::Mke, 9))
    }

    fn opener() -> RecordOpener {
        RecordOpener::new(cipher(Direction::Request, EncodeType::Mke, 9))
    }

    /// Splits a sealed body into its record frames.
    fn frames(sealed: &[u8]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut at = 0;
        while at < sealed.len() {
            let len = u32::from_be_bytes([0, sealed[at + 1], sealed[at + 2], sealed[at + 3]]) as usize;
            frames.push(sealed[at..at + RECORD_HEADER_LEN + len].to_vec());
            at += RECORD_HEADER_LEN + len;
        }
        frames
    }

    fn three_record_body() -> (Vec<u8>, Vec<u8>) {
        let body: Vec<u8> = (0..MAX_RECORD_PLAINTEXT * 2 + 10).map(|i| (i % 251) as u8).collect();
        let sealed = seal_body(&mut sealer(), &body).unwrap();
        (body, sealed)
    }

    #[test]
    fn bodies_round_trip_at_record_edges() {
        for len in [
            0,
            1,
            MAX_RECORD_PLAINTEXT - 1,
            MAX_RECORD_PLAINTEXT,
            MAX_RECORD_PLAINTEXT + 1,
            3 * MAX_RECORD_PLAINTEXT,
        ] {
            let body = vec![0x5A; len];
            let sealed = seal_body(&mut sealer(), &body).unwrap();
            assert_eq!(sealed.len() as u64, sealed_body_len(len as u64), "wire size for {len} bytes");
            assert_eq!(open_body(&mut opener(), &sealed).unwrap(), body, "body of {len} bytes");
        }
    }

    #[test]
    fn body_arriving_byte_by_byte_opens() {
        let (body, sealed) = three_record_body();
        let mut opener = opener();
        let mut opened = Vec::new();
        for byte in sealed.chunks(997) {
            opener.push(byte);
            while let Some(record) = opener.next_record().unwrap() {
                opened.extend_from_slice(&record);
            }
        }
        opener.finish().unwrap();
        assert_eq!(opened, body);
    }

    #[test]
    fn reordered_dropped_duplicated_or_truncated_records_are_rejected() {
        let (_, sealed) = three_record_body();
        let records = frames(&sealed);
        assert_eq!(records.len(), 3);
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("reordered", vec![records[1].clone(), records[0].clone(), records[2].clone()]),
            ("dropped", vec![records[0].clone(), records[2].clone()]),
            (
                "duplicated",
                vec![records[0].clone(), records[0].clone(), records[1].clone(), records[2].clone()],
            ),
            ("truncated", vec![records[0].clone(), records[1].clone()]),
            (
                "trailing record",
                vec![records[0].clone(), records[1].clone(), records[2].clone(), records[2].clone()],
            ),
        ];
        for (name, case) in cases {
            assert!(open_body(&mut opener(), &case.concat()).is_err(), "{name} body was accepted");
        }
    }

    #[test]
    fn forged_final_flag_is_rejected() {
        let (_, sealed) = three_record_body();
        let mut records = frames(&sealed);
        records[1][0] = FLAG_FINAL;
        let forged: Vec<u8> = records[..2].concat();
        assert!(open_body(&mut opener(), &forged).is_err());
    }

    #[test]
    fn every_flipped_byte_of_a_body_is_rejected() {
        let sealed = seal_body(&mut sealer(), b"small body with a marker").unwrap();
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x80;
            assert!(open_body(&mut opener(), &tampered).is_err(), "flip at byte {index} was accepted");
        }
    }

    #[test]
    fn records_from_another_exchange_are_rejected() {
        let sealed = seal_body(&mut sealer(), b"abc").unwrap();
        let mut other = RecordOpener::new(cipher(Direction::Request, EncodeType::Mke, 10));
        assert!(open_body(&mut other, &sealed).is_err());
    }

    #[test]
    fn record_item_index_stops_below_u32_max() {
        // Item u32::MAX is never used, so the last record of a stream is item u32::MAX - 1.
        let mut sealer = sealer();
        sealer.next_item = u32::MAX - 1;
        let last = sealer.seal(b"last", false).unwrap();
        assert_eq!(
            sealer.seal(b"", true).unwrap_err(),
            ProtocolError::CounterExhausted { counter: "body records" }
        );

        let mut opener = opener();
        opener.next_item = u32::MAX - 1;
        opener.push(&last);
        assert_eq!(opener.next_record().unwrap().unwrap(), b"last");
        opener.push(&last);
        assert_eq!(
            opener.next_record().unwrap_err(),
            ProtocolError::CounterExhausted { counter: "body records" }
        );
    }

    #[test]
    fn record_opens_only_at_its_index() {
        let mut sealer = sealer();
        sealer.next_item = u32::MAX - 1;
        let last = sealer.seal(b"x", true).unwrap();
        let mut opener = opener();
        opener.next_item = u32::MAX - 2;
        opener.push(&last);
        assert_eq!(opener.next_record().unwrap_err(), ProtocolError::OpenFailed { item: "body record" });
    }

    #[test]
    fn sealing_after_final_record_fails() {
        let mut sealer = sealer();
        sealer.seal(b"", true).unwrap();
        assert!(sealer.seal(b"more", false).is_err());
    }
}

#[cfg(test)]
mod combination_tests {
    use super::*;
    use crate::relay_header::SealFlags;
    use crate::seal::ExchangeContext;
    use crate::{ClientIdSigner, Direction, EncodeType, PairId, PairKeys, padding};

    fn cipher(
        keys: &PairKeys,
        direction: Direction,
        encode_type: EncodeType,
        flags: SealFlags,
    ) -> ItemCipher {
        let context = ExchangeContext {
            direction,
            client_id: ClientIdSigner::new(b"secret", None).sign_uuid_for_tests(),
            pair_id: PairId::from_bytes([8; 16]),
            seq: 42,
            encode_type,
            flags,
        };
        ItemCipher::new(keys.exchange(direction, encode_type, 42), context)
    }

    /// Seals and opens URL, header block and body in both directions for one combination.
    fn round_trip(encode_type: EncodeType, flags: SealFlags) {
        let keys = PairKeys::derive(&[4; 32], &[6; 64], &PairId::from_bytes([8; 16]), &[2; 32]).keys;
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        for direction in [Direction::Request, Direction::Response] {
            let sender = cipher(&keys, direction, encode_type, flags);
            let receiver = cipher(&keys, direction, encode_type, flags);
            let label = format!("{encode_type:?} {flags:?} {direction:?}");
            assert_eq!(receiver.open_url(&sender.seal_url(b"/a?b=c")).unwrap(), b"/a?b=c", "url, {label}");
            assert_eq!(
                receiver.open_headers(&sender.seal_headers(b"block")).unwrap(),
                b"block",
                "headers, {label}"
            );
            let plain = match encode_type {
                EncodeType::Mke => body.clone(),
                EncodeType::Mte => padding::pad_body(&body),
            };
            let sealed = seal_body(&mut RecordSealer::new(sender), &plain).unwrap();
            let opened = open_body(&mut RecordOpener::new(receiver), &sealed).unwrap();
            assert_eq!(opened, plain, "body, {label}");
        }
    }

    #[test]
    fn every_encode_type_and_flag_combination_round_trips() {
        for encode_type in [EncodeType::Mke, EncodeType::Mte] {
            for url in [true, false] {
                for headers in [true, false] {
                    round_trip(encode_type, SealFlags { url, headers, body: true });
                }
            }
        }
    }

    #[test]
    fn flags_are_bound_to_every_item() {
        let keys = PairKeys::derive(&[4; 32], &[6; 64], &PairId::from_bytes([8; 16]), &[2; 32]).keys;
        let sealed_with = cipher(&keys, Direction::Request, EncodeType::Mke, SealFlags::ALL);
        let flags = SealFlags { url: false, ..SealFlags::ALL };
        let opened_with = cipher(&keys, Direction::Request, EncodeType::Mke, flags);
        assert!(opened_with.open_headers(&sealed_with.seal_headers(b"x")).is_err());
    }
}
