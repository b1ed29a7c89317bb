//! Length hiding for the `MTE` encode type.
//!
//! A padded item is `length || data || zeros`, where `length` is the data length big-endian
//! (4 bytes for the URL and header block, 8 bytes for a whole body) and the total is the next
//! power of two, at least [`MIN_BUCKET`]. An observer learns only the bucket, so a 300-byte and a
//! 500-byte body look the same. A padded item is at least 256 bytes; above that, it is at most
//! twice the data size plus the length prefix.
//! Padding is checked only after the item authenticated.

use crate::ProtocolError;

/// Smallest padded size in bytes: one bucket for every short URL and header block.
pub const MIN_BUCKET: usize = 256;

/// Bucket size for `len` bytes of content.
pub fn bucket(len: usize) -> usize {
    len.max(MIN_BUCKET).next_power_of_two()
}

/// Size of a padded URL or header block holding `len` data bytes.
pub fn padded_item_len(len: usize) -> usize {
    bucket(len + 4)
}

/// Appends the padded form of `data` (4-byte length prefix) to `out`.
pub fn pad_item(data: &[u8], out: &mut Vec<u8>) {
    // URLs and header blocks are limited to a few hundred KiB, far below u32::MAX.
    let len = u32::try_from(data.len()).expect("item shorter than 4 GiB");
    let total = padded_item_len(data.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + total - 4 - data.len(), 0);
}

/// Returns the data of a padded URL or header block.
///
/// # Errors
/// `MalformedPadding` when the length prefix or the zero padding is wrong.
pub fn unpad_item(padded: &[u8]) -> Result<&[u8], ProtocolError> {
    let (prefix, rest) = padded.split_first_chunk::<4>().ok_or(ProtocolError::MalformedPadding)?;
    let len = u32::from_be_bytes(*prefix) as usize;
    unpad_rest(rest, len)
}

/// Returns the padded form of a whole body (8-byte length prefix).
pub fn pad_body(body: &[u8]) -> Vec<u8> {
    let total = bucket(body.len() + 8);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(body);
    out.resize(total, 0);
    out
}

/// Returns the body inside a padded body.
///
/// # Errors
/// `MalformedPadding` when the length prefix or the zero padding is wrong.
pub fn unpad_body(padded: &[u8]) -> Result<&[u8], ProtocolError> {
    let (prefix, rest) = padded.split_first_chunk::<8>().ok_or(ProtocolError::MalformedPadding)?;
    let len = usize::try_from(u64::from_be_bytes(*prefix)).map_err(|_| ProtocolError::MalformedPadding)?;
    unpad_rest(rest, len)
}

fn unpad_rest(rest: &[u8], len: usize) -> Result<&[u8], ProtocolError> {
    if len > rest.len() || rest[len..].iter().any(|&byte| byte != 0) {
        return Err(ProtocolError::MalformedPadding);
    }
    Ok(&rest[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip_at_bucket_edges() {
        for len in [0, 1, 251, 252, 253, 1000, 4096] {
            let data = vec![0xAB; len];
            let mut padded = Vec::new();
            pad_item(&data, &mut padded);
            assert!(padded.len().is_power_of_two(), "len {len} padded to {}", padded.len());
            assert_eq!(unpad_item(&padded).unwrap(), data.as_slice());
        }
    }

    #[test]
    fn bodies_round_trip() {
        for len in [0, 7, 248, 249, 70_000] {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            assert_eq!(unpad_body(&pad_body(&body)).unwrap(), body.as_slice());
        }
    }

    #[test]
    fn nonzero_padding_or_long_length_is_rejected() {
        let mut padded = pad_body(b"abc");
        *padded.last_mut().unwrap() = 1;
        assert_eq!(unpad_body(&padded), Err(ProtocolError::MalformedPadding));
        let mut padded = pad_body(b"abc");
        padded[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(unpad_body(&padded), Err(ProtocolError::MalformedPadding));
    }
}
