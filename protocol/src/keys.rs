//! Key schedule: from the secret one pairing exports to the keys of each direction and of each
//! exchange.
//!
//! ```text
//! exported = HPKE-Export(context, "api-relay/1 pair secret" || transcript hash, 32)
//! prk      = HKDF-Extract(salt = nonce_a || nonce_b, ikm = exported)
//! request  = HKDF-Expand(prk, "api-relay/1 request"  || pair id || transcript hash, 44)
//! response = HKDF-Expand(prk, "api-relay/1 response" || pair id || transcript hash, 44)
//! confirm  = HKDF-Expand(prk, "api-relay/1 confirm"  || pair id || transcript hash, 32)
//! ```
//!
//! Each direction's 44 bytes are an AES-256-GCM key (32) and a 96-bit IV (12). One exchange
//! seals with `HKDF-Expand(direction key, "mke" or "mte" || seq as 8 bytes big-endian, 32)`, so
//! every exchange has a fresh key and one key never protects more than one exchange.

use aes_gcm::aes::Aes256Enc;
use aes_gcm::aes::cipher::consts::U12;
use aes_gcm::{AesGcm, KeyInit};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{EncodeType, PairId, ProtocolError};

/// AES-256-GCM on the encryption half of the AES key schedule. GCM runs AES only forwards, in
/// counter mode and for the tag mask, so it never uses the inverse round keys. `Aes256Gcm` also
/// expands those for every key, which costs time and 240 bytes in every copy of a cipher.
pub(crate) type ExchangeAead = AesGcm<Aes256Enc, U12>;

/// Bytes of an AES-256-GCM key.
pub const KEY_LEN: usize = 32;
/// Bytes of an AES-GCM nonce.
pub const IV_LEN: usize = 12;
/// Bytes of the key-confirmation value relay B returns with each pair.
pub const CONFIRM_LEN: usize = 32;
/// Bytes of [`PairKeys::to_bytes`].
pub const PAIR_KEYS_LEN: usize = 2 * (KEY_LEN + IV_LEN);

/// Which way an item travels. Part of the associated data, so an item sealed for one direction
/// never opens in the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Relay A to relay B.
    Request,
    /// Relay B to relay A.
    Response,
}

impl Direction {
    pub(crate) fn code(self) -> u8 {
        match self {
            Direction::Request => 1,
            Direction::Response => 2,
        }
    }
}

/// Key and IV of one direction of a pair.
///
/// `expander` is HKDF keyed with `key`. Keying HMAC hashes two blocks, so every exchange key of
/// the direction starts from this keyed state instead of keying again. sha2's `zeroize` feature
/// wipes the hash states when the expander is dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DirectionKey {
    key: [u8; KEY_LEN],
    iv: [u8; IV_LEN],
    #[zeroize(skip)]
    expander: Hkdf<Sha256>,
}

impl DirectionKey {
    fn from_okm(okm: &[u8; KEY_LEN + IV_LEN]) -> Self {
        let mut key = [0u8; KEY_LEN];
        let mut iv = [0u8; IV_LEN];
        key.copy_from_slice(&okm[..KEY_LEN]);
        iv.copy_from_slice(&okm[KEY_LEN..]);
        let expander = Hkdf::<Sha256>::from_prk(&key).expect("32-byte prk is valid for sha-256");
        Self { key, iv, expander }
    }
}

/// Both directions' keys of one pair. Dropping it wipes the key bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PairKeys {
    request: DirectionKey,
    response: DirectionKey,
}

impl std::fmt::Debug for PairKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKeys(redacted)")
    }
}

/// Output of the key schedule: the pair's keys and the value relay B returns so relay A can
/// confirm both sides derived the same keys.
pub struct Schedule {
    pub keys: PairKeys,
    pub confirm: Zeroizing<[u8; CONFIRM_LEN]>,
}

impl PairKeys {
    /// Runs the key schedule above on the exported pairing secret.
    pub fn derive(exported: &[u8], salt: &[u8], pair_id: &PairId, transcript: &[u8; 32]) -> Schedule {
        let hkdf = Hkdf::<Sha256>::new(Some(salt), exported);
        let expand = |label: &[u8], out: &mut [u8]| {
            let info: Vec<u8> = [label, pair_id.as_bytes(), transcript].concat();
            // 44 and 32 bytes are far below HKDF-SHA-256's limit of 255 * 32 bytes.
            hkdf.expand(&info, out).expect("okm length within hkdf limit");
        };
        let mut request = Zeroizing::new([0u8; KEY_LEN + IV_LEN]);
        let mut response = Zeroizing::new([0u8; KEY_LEN + IV_LEN]);
        let mut confirm = Zeroizing::new([0u8; CONFIRM_LEN]);
        expand(b"api-relay/1 request", request.as_mut());
        expand(b"api-relay/1 response", response.as_mut());
        expand(b"api-relay/1 confirm", confirm.as_mut());
        let keys = PairKeys {
            request: DirectionKey::from_okm(&request),
            response: DirectionKey::from_okm(&response),
        };
        Schedule { keys, confirm }
    }

    /// Derives the key of one exchange in one direction.
    pub fn exchange(&self, direction: Direction, encode_type: EncodeType, seq: u64) -> ExchangeKey {
        let base = match direction {
            Direction::Request => &self.request,
            Direction::Response => &self.response,
        };
        let mut info = [0u8; 11];
        info[..3].copy_from_slice(encode_type.key_label());
        info[3..].copy_from_slice(&seq.to_be_bytes());
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        base.expander.expand(&info, key.as_mut()).expect("okm length within hkdf limit");
        let cipher = ExchangeAead::new_from_slice(key.as_ref()).expect("key is 32 bytes");
        ExchangeKey { cipher, iv: base.iv, seq }
    }

    /// Serialises the keys for a snapshot. The caller must seal the bytes before storing them.
    pub fn to_bytes(&self) -> Zeroizing<[u8; PAIR_KEYS_LEN]> {
        let mut out = Zeroizing::new([0u8; PAIR_KEYS_LEN]);
        let parts = [&self.request.key[..], &self.request.iv, &self.response.key, &self.response.iv];
        let mut at = 0;
        for part in parts {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        out
    }

    /// Reads keys written by [`PairKeys::to_bytes`].
    ///
    /// # Errors
    /// `Pairing` when the length is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        if bytes.len() != PAIR_KEYS_LEN {
            return Err(ProtocolError::Pairing { reason: "stored pair keys have the wrong length" });
        }
        let (request, response) = bytes.split_at(KEY_LEN + IV_LEN);
        let okm = |half: &[u8]| {
            let mut okm = Zeroizing::new([0u8; KEY_LEN + IV_LEN]);
            okm.copy_from_slice(half);
            DirectionKey::from_okm(&okm)
        };
        Ok(Self { request: okm(request), response: okm(response) })
    }
}

/// The AES-256-GCM key of one exchange in one direction, with the direction IV and `seq` the
/// item nonces are built from.
#[derive(Clone)]
pub struct ExchangeKey {
    pub(crate) cipher: ExchangeAead,
    pub(crate) iv: [u8; IV_LEN],
    pub(crate) seq: u64,
}

impl ExchangeKey {
    /// Nonce of one item: the direction IV XOR (seq as 64 bits || item as 32 bits), big-endian.
    pub(crate) fn nonce(&self, item: u32) -> [u8; IV_LEN] {
        let mut nonce = self.iv;
        let mut counter = [0u8; IV_LEN];
        counter[..8].copy_from_slice(&self.seq.to_be_bytes());
        counter[8..].copy_from_slice(&item.to_be_bytes());
        for (byte, mask) in nonce.iter_mut().zip(counter) {
            *byte ^= mask;
        }
        nonce
    }
}

impl std::fmt::Debug for ExchangeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExchangeKey(seq {}, redacted)", self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> PairKeys {
        PairKeys::derive(&[7u8; 32], &[1u8; 64], &PairId::from_bytes([3; 16]), &[9; 32]).keys
    }

    #[test]
    fn keys_survive_serialisation() {
        let keys = keys();
        let copy = PairKeys::from_bytes(keys.to_bytes().as_ref()).unwrap();
        assert_eq!(keys.to_bytes().as_ref(), copy.to_bytes().as_ref());
    }

    #[test]
    fn nonces_differ_per_seq_and_item() {
        let keys = keys();
        let mut seen = std::collections::HashSet::new();
        for seq in 1..50u64 {
            let exchange = keys.exchange(Direction::Request, EncodeType::Mke, seq);
            for item in 0..50u32 {
                assert!(seen.insert(exchange.nonce(item)), "nonce repeated at seq {seq} item {item}");
            }
        }
    }

    #[test]
    fn directions_have_distinct_keys() {
        let bytes = keys().to_bytes();
        assert_ne!(bytes[..KEY_LEN], bytes[KEY_LEN + IV_LEN..2 * KEY_LEN + IV_LEN]);
    }
}
