//! Identifiers: the random `PairId` of one key agreement and the signed `ClientId` that relay B
//! issues to each relay A.
//!
//! A client id is `<uuid>.<hex hmac-sha256(uuid)>`, keyed with relay B's `CLIENT_ID_SECRET`.
//! Relay B keeps no list of issued ids: the signature is the proof that B issued it.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::ProtocolError;

type HmacSha256 = Hmac<Sha256>;

/// Length of a pair id in bytes (128 random bits).
pub const PAIR_ID_LEN: usize = 16;

/// Random 128-bit name of one pairing; hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairId([u8; PAIR_ID_LEN]);

impl PairId {
    /// Draws a new random pair id.
    pub fn random() -> Self {
        let mut bytes = [0u8; PAIR_ID_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Wraps raw bytes, as read back from a snapshot.
    pub fn from_bytes(bytes: [u8; PAIR_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses the 32-character lowercase or uppercase hex form.
    ///
    /// # Errors
    /// `MalformedRelayHeader` when the text is not 32 hex digits.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        let mut bytes = [0u8; PAIR_ID_LEN];
        hex::decode_to_slice(text, &mut bytes)
            .map_err(|_| ProtocolError::MalformedRelayHeader { reason: "pair id must be 32 hex digits" })?;
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; PAIR_ID_LEN] {
        &self.0
    }

    /// First 8 hex digits, enough to follow one pair through logs without printing the whole id.
    pub fn short(&self) -> ShortPairId {
        let mut digits = [0u8; 8];
        // Eight digits for four bytes always fit, so the error branch is unreachable.
        let _ = hex::encode_to_slice(&self.0[..4], &mut digits);
        ShortPairId(digits)
    }
}

/// The first 8 hex digits of a [`PairId`], held inline so that an exchange's log record names its
/// pair without a heap allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortPairId([u8; 8]);

impl ShortPairId {
    pub fn as_str(&self) -> &str {
        // Hex digits are ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for ShortPairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ShortPairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for PairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PairId({})", self.short())
    }
}

/// Bytes of every client id: a 36-character uuid, a dot and 64 hex digits.
pub const CLIENT_ID_LEN: usize = UUID_TEXT_LEN + 1 + 64;

/// A client id as issued by relay B: `<uuid>.<64 hex digits of hmac>`.
///
/// Parsing checks only the shape; [`ClientIdSigner::verify`] checks the signature. Each exchange
/// copies its client id into several contexts. The text lives inline, so a copy moves 101 bytes
/// and touches no reference count that the workers of a relay would share.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientId([u8; CLIENT_ID_LEN]);

impl ClientId {
    /// Checks the shape `<36-character uuid>.<64 hex digits>`.
    ///
    /// # Errors
    /// `InvalidClientId` for any other shape.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        let (uuid, mac) = text.split_once('.').ok_or(ProtocolError::InvalidClientId)?;
        let uuid_ok = uuid.len() == UUID_TEXT_LEN && uuid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        let mac_ok = mac.len() == 64 && mac.bytes().all(|b| b.is_ascii_hexdigit());
        if !(uuid_ok && mac_ok) {
            return Err(ProtocolError::InvalidClientId);
        }
        let mut bytes = [0u8; CLIENT_ID_LEN];
        bytes.copy_from_slice(text.as_bytes());
        Ok(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        // `parse` and `sign` put in only ASCII hex digits, hyphens and a dot, so this never fails.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8; CLIENT_ID_LEN] {
        &self.0
    }

    /// The uuid part, which names the client in logs and store keys.
    pub fn uuid(&self) -> &str {
        &self.as_str()[..UUID_TEXT_LEN]
    }
}

/// Characters of the uuid part of a client id, hyphenated.
const UUID_TEXT_LEN: usize = 36;

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({}.…)", self.uuid())
    }
}

/// Issues and verifies client ids with `CLIENT_ID_SECRET`, also accepting ids signed with
/// `CLIENT_ID_SECRET_PREVIOUS` so the secret can be rotated without breaking live peers.
#[derive(Clone)]
pub struct ClientIdSigner {
    current: HmacSha256,
    previous: Option<HmacSha256>,
}

impl ClientIdSigner {
    pub fn new(current_secret: &[u8], previous_secret: Option<&[u8]>) -> Self {
        Self { current: keyed_mac(current_secret), previous: previous_secret.map(keyed_mac) }
    }

    /// Issues a new client id for a fresh random uuid, signed with the current secret.
    pub fn issue(&self) -> ClientId {
        self.sign(&uuid::Uuid::new_v4().to_string())
    }

    /// Verifies `id` against the current secret, then the previous one, in constant time.
    ///
    /// # Errors
    /// `InvalidClientId` when neither secret signed it.
    pub fn verify(&self, id: &ClientId) -> Result<Verified, ProtocolError> {
        let (uuid, mac_hex) = id.as_str().split_once('.').ok_or(ProtocolError::InvalidClientId)?;
        let mut mac = [0u8; 32];
        hex::decode_to_slice(mac_hex, &mut mac).map_err(|_| ProtocolError::InvalidClientId)?;
        if mac_matches(&self.current, uuid, &mac) {
            return Ok(Verified::Current);
        }
        match &self.previous {
            Some(previous) if mac_matches(previous, uuid, &mac) => Ok(Verified::Previous),
            _ => Err(ProtocolError::InvalidClientId),
        }
    }

    /// Re-signs the uuid of a verified id with the current secret, so a peer holding an id
    /// signed with the previous secret moves to the current one.
    pub fn refresh(&self, id: &ClientId) -> ClientId {
        self.sign(id.uuid())
    }

    /// Signs `uuid`, which is the uuid part of a verified id or a new hyphenated uuid.
    fn sign(&self, uuid: &str) -> ClientId {
        let mut mac = self.current.clone();
        mac.update(uuid.as_bytes());
        let mut bytes = [0u8; CLIENT_ID_LEN];
        let (uuid_part, rest) = bytes.split_at_mut(UUID_TEXT_LEN);
        uuid_part.copy_from_slice(uuid.as_bytes());
        rest[0] = b'.';
        // 32 bytes of MAC fill the 64 hex digits exactly, so the encoding cannot fail.
        let _ = hex::encode_to_slice(mac.finalize().into_bytes(), &mut rest[1..]);
        ClientId(bytes)
    }
}

impl fmt::Debug for ClientIdSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdSigner").field("previous", &self.previous.is_some()).finish_non_exhaustive()
    }
}

/// Which secret verified a client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Current,
    Previous,
}

fn keyed_mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(secret).expect("hmac accepts keys of any length")
}

fn mac_matches(key: &HmacSha256, uuid: &str, expected: &[u8; 32]) -> bool {
    let mut mac = key.clone();
    mac.update(uuid.as_bytes());
    let actual = mac.finalize().into_bytes();
    actual.as_slice().ct_eq(expected.as_slice()).into()
}

#[cfg(test)]
impl ClientIdSigner {
    /// A fixed client id, so tests of other modules get the same AAD on every run.
    pub(crate) fn sign_uuid_for_tests(&self) -> ClientId {
        self.sign("00000000-0000-4000-8000-000000000000")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_id_verifies_with_current_secret() {
        let signer = ClientIdSigner::new(b"s1", None);
        let id = signer.issue();
        assert_eq!(id.as_str().len(), CLIENT_ID_LEN, "the AAD layout counts on this length");
        assert_eq!(signer.verify(&ClientId::parse(id.as_str()).unwrap()), Ok(Verified::Current));
    }

    #[test]
    fn previous_secret_still_verifies_and_refresh_moves_to_current() {
        let old = ClientIdSigner::new(b"s1", None);
        let rotated = ClientIdSigner::new(b"s2", Some(b"s1"));
        let id = old.issue();
        assert_eq!(rotated.verify(&id), Ok(Verified::Previous));
        let refreshed = rotated.refresh(&id);
        assert_eq!(refreshed.uuid(), id.uuid());
        assert_eq!(rotated.verify(&refreshed), Ok(Verified::Current));
    }

    #[test]
    fn foreign_or_altered_id_is_rejected() {
        let signer = ClientIdSigner::new(b"s1", None);
        let other = ClientIdSigner::new(b"s2", None);
        assert!(signer.verify(&other.issue()).is_err());
        let id = signer.issue();
        let mut text = id.as_str().to_owned();
        let last = text.pop().unwrap();
        text.push(if last == '0' { '1' } else { '0' });
        assert!(signer.verify(&ClientId::parse(&text).unwrap()).is_err());
    }

    #[test]
    fn client_id_shape_is_checked() {
        for bad in ["", "abc", "x.y", &format!("{}.{}", "a".repeat(36), "g".repeat(64))] {
            assert!(ClientId::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn debug_output_hides_signature() {
        let id = ClientIdSigner::new(b"s1", None).issue();
        let mac = id.as_str().split_once('.').unwrap().1;
        assert!(!format!("{id:?}").contains(mac));
    }
}
