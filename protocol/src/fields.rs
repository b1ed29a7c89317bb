//! The header block: an ordered list of (name, value bytes), encoded as an RFC 9292 (Binary
//! HTTP) known-length field section:
//!
//! ```text
//! section length (varint) | { name length (varint) | name | value length (varint) | value }*
//! ```
//!
//! with QUIC variable-length integers (RFC 9000, section 16). The codec keeps the order of the
//! lines it is given, repeated names (several `Set-Cookie` lines) and value bytes that are not
//! UTF-8. Names are lowercase.
//! Pseudo-fields come first: `:method` in a request block, `:status` in a response block.

use crate::ProtocolError;

/// One header line: name and raw value bytes.
pub type Field = (Vec<u8>, Vec<u8>);

/// Bounds applied while decoding, so a peer cannot make a relay allocate without limit.
#[derive(Debug, Clone, Copy)]
pub struct FieldLimits {
    /// Maximum number of field lines.
    pub max_fields: usize,
    /// Maximum encoded size in bytes.
    pub max_bytes: usize,
}

/// One header line as [`decode`] returns it: name and value bytes borrowed from the block.
pub type FieldRef<'a> = (&'a [u8], &'a [u8]);

/// Encodes fields in order, into one buffer of the exact size.
pub fn encode<N: AsRef<[u8]>, V: AsRef<[u8]>>(fields: &[(N, V)]) -> Vec<u8> {
    let chunk_len = |bytes: &[u8]| varint_len(bytes.len() as u64) + bytes.len();
    let lines_len: usize =
        fields.iter().map(|(name, value)| chunk_len(name.as_ref()) + chunk_len(value.as_ref())).sum();
    let mut out = Vec::with_capacity(varint_len(lines_len as u64) + lines_len);
    put_varint(&mut out, lines_len as u64);
    for (name, value) in fields {
        let (name, value) = (name.as_ref(), value.as_ref());
        put_varint(&mut out, name.len() as u64);
        out.extend_from_slice(name);
        put_varint(&mut out, value.len() as u64);
        out.extend_from_slice(value);
    }
    out
}

/// Decodes a block written by [`encode`]. The lines borrow from `bytes`.
///
/// # Errors
/// `MalformedHeaders` for truncated input, an empty name, trailing bytes or a limit exceeded.
pub fn decode(bytes: &[u8], limits: FieldLimits) -> Result<Vec<FieldRef<'_>>, ProtocolError> {
    let malformed = |reason| ProtocolError::MalformedHeaders { reason };
    if bytes.len() > limits.max_bytes {
        return Err(malformed("header block larger than the configured maximum"));
    }
    let mut reader = Reader { bytes, at: 0 };
    let section_len = reader.varint()?;
    if section_len != (bytes.len() - reader.at) as u64 {
        return Err(malformed("section length does not match the block"));
    }
    let mut fields = Vec::new();
    while reader.at < bytes.len() {
        if fields.len() == limits.max_fields {
            return Err(malformed("more header lines than the configured maximum"));
        }
        let name = reader.chunk()?;
        if name.is_empty() {
            return Err(malformed("empty header name"));
        }
        let value = reader.chunk()?;
        fields.push((name, value));
    }
    Ok(fields)
}

/// Bytes [`put_varint`] writes for `value`.
fn varint_len(value: u64) -> usize {
    match value {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        0x4000..=0x3fff_ffff => 4,
        _ => 8,
    }
}

fn put_varint(out: &mut Vec<u8>, value: u64) {
    match value {
        0..=0x3f => out.push(value as u8),
        0x40..=0x3fff => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.at.checked_add(len).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or(ProtocolError::MalformedHeaders { reason: "truncated header block" })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn varint(&mut self) -> Result<u64, ProtocolError> {
        let first = self.take(1)?[0];
        let extra = (1usize << (first >> 6)) - 1;
        let mut value = u64::from(first & 0x3f);
        for &byte in self.take(extra)? {
            value = value << 8 | u64::from(byte);
        }
        Ok(value)
    }

    fn chunk(&mut self) -> Result<&'a [u8], ProtocolError> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .map_err(|_| ProtocolError::MalformedHeaders { reason: "length too large" })?;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FieldLimits = FieldLimits { max_fields: 100, max_bytes: 1 << 20 };

    #[test]
    fn order_repeats_and_binary_values_survive() {
        let fields: Vec<Field> = vec![
            (b":status".to_vec(), b"200".to_vec()),
            (b"set-cookie".to_vec(), b"a=1".to_vec()),
            (b"set-cookie".to_vec(), b"b=2".to_vec()),
            (b"x-binary".to_vec(), vec![0x80, 0xff, 0x00]),
            (b"x-long".to_vec(), vec![b'v'; 20_000]),
            (b"x-empty".to_vec(), Vec::new()),
        ];
        let encoded = encode(&fields);
        let decoded = decode(&encoded, LIMITS).unwrap();
        let expected: Vec<FieldRef<'_>> =
            fields.iter().map(|(name, value)| (name.as_slice(), value.as_slice())).collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn empty_block_round_trips() {
        let none: [(&[u8], &[u8]); 0] = [];
        assert_eq!(encode(&none), vec![0]);
        assert!(decode(&[0], LIMITS).unwrap().is_empty());
    }

    #[test]
    fn varints_use_rfc_9000_examples() {
        for (value, bytes) in [
            (37u64, vec![0x25]),
            (15_293, vec![0x7b, 0xbd]),
            (494_878_333, vec![0x9d, 0x7f, 0x3e, 0x7d]),
            (151_288_809_941_952_652, vec![0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, bytes, "encoding of {value}");
            assert_eq!(varint_len(value), bytes.len(), "length of {value}");
            assert_eq!(Reader { bytes: &bytes, at: 0 }.varint().unwrap(), value);
        }
    }

    #[test]
    fn varint_len_matches_put_varint() {
        for value in [0, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, u64::MAX >> 2] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(varint_len(value), out.len(), "length of {value}");
        }
    }

    #[test]
    fn malformed_blocks_are_rejected() {
        let good = encode(&[("a", "b")]);
        let mut trailing = good.clone();
        trailing.push(0);
        let cases = [vec![], good[..good.len() - 1].to_vec(), trailing, encode(&[("", "b")])];
        for case in cases {
            assert!(decode(&case, LIMITS).is_err(), "accepted {case:?}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let many: Vec<(&str, &str)> = vec![("a", "b"); 101];
        assert!(decode(&encode(&many), LIMITS).is_err());
        let small = FieldLimits { max_fields: 10, max_bytes: 8 };
        assert!(decode(&encode(&[("name", "value")]), small).is_err());
    }
}
