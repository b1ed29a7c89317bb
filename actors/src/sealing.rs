//! Sealing of pair keys at rest, so that a dump of the shared store reveals no traffic keys.
//!
//! ```text
//! store key = HKDF-SHA256(salt = none, ikm = CLIENT_ID_SECRET, info = "api-relay/1 store key", 32)
//! sealed    = nonce (12 random bytes) || AES-256-GCM(store key, nonce, keys, aad)
//! aad       = "api-relay/1 pair record" || role (1 outbound, 2 inbound) || pair id (16 bytes)
//!             || created_at (u64, big-endian) || client id (ASCII)
//! ```
//!
//! The associated data binds the sealed keys to the record they belong to: keys copied into
//! another pair's record, or a record whose role, creation time or client id was changed, fail
//! to open. Records sealed under `CLIENT_ID_SECRET_PREVIOUS` still open, so rotating the secret
//! keeps live pairs. A random 96-bit nonce per record is safe for far more records than a relay
//! ever stores (NIST SP 800-38D allows 2^32 random nonces per key).

use aes_gcm::aead::array::Array;
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use api_relay_protocol::keys::PAIR_KEYS_LEN;
use api_relay_protocol::{ClientId, PairId, PairKeys};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::Role;

/// HKDF `info` of the store key.
const STORE_KEY_LABEL: &[u8] = b"api-relay/1 store key";
/// First bytes of the associated data of every sealed record.
const RECORD_AAD_LABEL: &[u8] = b"api-relay/1 pair record";
/// Bytes of the random nonce in front of every sealed record.
const NONCE_LEN: usize = 12;
/// Bytes of the AES-GCM tag.
const TAG_LEN: usize = 16;
/// Bytes of a sealed record: nonce, sealed pair keys and tag.
pub const SEALED_KEYS_LEN: usize = NONCE_LEN + PAIR_KEYS_LEN + TAG_LEN;

/// Record fields that a sealed record is bound to through the associated data.
#[derive(Debug, Clone, Copy)]
pub struct RecordBinding<'a> {
    pub pair_id: &'a PairId,
    pub role: Role,
    pub created_at: u64,
    pub client_id: &'a ClientId,
}

impl RecordBinding<'_> {
    fn aad(&self) -> Vec<u8> {
        let role: u8 = match self.role {
            Role::Outbound => 1,
            Role::Inbound => 2,
        };
        let mut aad = Vec::with_capacity(RECORD_AAD_LABEL.len() + 25 + self.client_id.as_str().len());
        aad.extend_from_slice(RECORD_AAD_LABEL);
        aad.push(role);
        aad.extend_from_slice(self.pair_id.as_bytes());
        aad.extend_from_slice(&self.created_at.to_be_bytes());
        aad.extend_from_slice(self.client_id.as_str().as_bytes());
        aad
    }
}

/// Failure to open sealed keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed keys have {0} bytes, expected {SEALED_KEYS_LEN}")]
    WrongLength(usize),
    #[error("sealed keys do not open with CLIENT_ID_SECRET or CLIENT_ID_SECRET_PREVIOUS")]
    NotAuthentic,
}

/// Seals and opens pair keys with the store keys derived from the client id secrets.
#[derive(Clone)]
pub struct RecordSealer {
    current: Aes256Gcm,
    previous: Option<Aes256Gcm>,
}

impl std::fmt::Debug for RecordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordSealer(previous: {}, redacted)", self.previous.is_some())
    }
}

impl RecordSealer {
    /// Derives the store keys from `CLIENT_ID_SECRET` and, when set, `CLIENT_ID_SECRET_PREVIOUS`.
    pub fn new(secret: &[u8], previous_secret: Option<&[u8]>) -> Self {
        Self { current: store_cipher(secret), previous: previous_secret.map(store_cipher) }
    }

    /// Seals `keys` for the record described by `binding`, under the current secret.
    pub fn seal(&self, keys: &PairKeys, binding: &RecordBinding<'_>) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let plaintext = keys.to_bytes();
        let aad = binding.aad();
        let payload = Payload { msg: plaintext.as_ref(), aad: &aad };
        // AES-GCM fails only for inputs over 64 GiB; the keys are 88 bytes.
        let sealed = self.current.encrypt(&Array::from(nonce), payload).expect("88 bytes seal");
        let mut record = Vec::with_capacity(SEALED_KEYS_LEN);
        record.extend_from_slice(&nonce);
        record.extend_from_slice(&sealed);
        record
    }

    /// Opens keys sealed by [`RecordSealer::seal`], trying the current secret, then the previous.
    ///
    /// # Errors
    /// `WrongLength` for a record of the wrong size, `NotAuthentic` when neither key opens it or
    /// `binding` differs from the one it was sealed for.
    pub fn open(&self, record: &[u8], binding: &RecordBinding<'_>) -> Result<PairKeys, OpenError> {
        if record.len() != SEALED_KEYS_LEN {
            return Err(OpenError::WrongLength(record.len()));
        }
        let (nonce, sealed) = record.split_at(NONCE_LEN);
        let nonce = Array::try_from(nonce).map_err(|_| OpenError::WrongLength(record.len()))?;
        let aad = binding.aad();
        let ciphers = std::iter::once(&self.current).chain(self.previous.as_ref());
        for cipher in ciphers {
            let payload = Payload { msg: sealed, aad: &aad };
            if let Ok(plaintext) = cipher.decrypt(&nonce, payload) {
                let plaintext = Zeroizing::new(plaintext);
                return PairKeys::from_bytes(&plaintext).map_err(|_| OpenError::WrongLength(record.len()));
            }
        }
        Err(OpenError::NotAuthentic)
    }
}

fn store_cipher(secret: &[u8]) -> Aes256Gcm {
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes are far below HKDF-SHA-256's output limit of 255 * 32 bytes.
    Hkdf::<Sha256>::new(None, secret).expand(STORE_KEY_LABEL, key.as_mut()).expect("32-byte okm");
    Aes256Gcm::new_from_slice(key.as_ref()).expect("key is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_relay_protocol::ClientIdSigner;

    fn keys(pair_id: &PairId) -> PairKeys {
        PairKeys::derive(&[5; 32], &[6; 64], pair_id, &[7; 32]).keys
    }

    #[test]
    fn sealed_keys_open_only_for_their_record() {
        let sealer = RecordSealer::new(b"current secret", None);
        let pair_id = PairId::random();
        let client_id = ClientIdSigner::new(b"s", None).issue();
        let binding =
            RecordBinding { pair_id: &pair_id, role: Role::Inbound, created_at: 10, client_id: &client_id };
        let record = sealer.seal(&keys(&pair_id), &binding);
        assert_eq!(record.len(), SEALED_KEYS_LEN);

        let opened = sealer.open(&record, &binding).unwrap();
        assert_eq!(opened.to_bytes().as_ref(), keys(&pair_id).to_bytes().as_ref());

        let other_pair = PairId::random();
        let moved = RecordBinding { pair_id: &other_pair, ..binding };
        assert_eq!(sealer.open(&record, &moved).unwrap_err(), OpenError::NotAuthentic);
        let other_role = RecordBinding { role: Role::Outbound, ..binding };
        assert_eq!(sealer.open(&record, &other_role).unwrap_err(), OpenError::NotAuthentic);
        let older = RecordBinding { created_at: 9, ..binding };
        assert_eq!(sealer.open(&record, &older).unwrap_err(), OpenError::NotAuthentic);
    }

    #[test]
    fn previous_secret_opens_and_unknown_secret_does_not() {
        let pair_id = PairId::random();
        let client_id = ClientIdSigner::new(b"s", None).issue();
        let binding =
            RecordBinding { pair_id: &pair_id, role: Role::Outbound, created_at: 1, client_id: &client_id };
        let record = RecordSealer::new(b"old secret", None).seal(&keys(&pair_id), &binding);

        let rotated = RecordSealer::new(b"new secret", Some(b"old secret"));
        assert!(rotated.open(&record, &binding).is_ok());
        let unrelated = RecordSealer::new(b"new secret", Some(b"other secret"));
        assert_eq!(unrelated.open(&record, &binding).unwrap_err(), OpenError::NotAuthentic);
    }

    #[test]
    fn truncated_record_is_rejected() {
        let sealer = RecordSealer::new(b"secret", None);
        let pair_id = PairId::random();
        let client_id = ClientIdSigner::new(b"s", None).issue();
        let binding =
            RecordBinding { pair_id: &pair_id, role: Role::Inbound, created_at: 1, client_id: &client_id };
        let record = sealer.seal(&keys(&pair_id), &binding);
        assert_eq!(
            sealer.open(&record[1..], &binding).unwrap_err(),
            OpenError::WrongLength(SEALED_KEYS_LEN - 1)
        );
    }
}
