//! AES-256-GCM sealing of single items, with the nonce and associated data (AAD) rules that tie
//! each item to its place.
//!
//! Items of one exchange: 0 is the URL, 1 the header block, 2 and up the body records. The AAD of
//! every item is, in this order (integers big-endian):
//!
//! ```text
//! "api-relay" | version u8 | direction u8 (1 request, 2 response) | encode type u8 (1 MKE, 2 MTE)
//! | seal flags u8 (bit 0 url, bit 1 headers, bit 2 body) | final u8 (0 or 1) | pair id 16 bytes
//! | seq u64 | item u32 | client id length u16 | client id bytes
//! ```
//!
//! so a sealed item opens only in its own pair, exchange, direction and position, and a
//! non-final record cannot pass as the last one. The URL and the header block are always final.

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::array::Array;

use crate::ids::{CLIENT_ID_LEN, PAIR_ID_LEN};
use crate::padding;
use crate::relay_header::SealFlags;
use crate::{ClientId, Direction, EncodeType, ExchangeKey, PROTOCOL_VERSION, PairId, ProtocolError};

/// Item index of the URL.
pub const ITEM_URL: u32 = 0;
/// Item index of the header block.
pub const ITEM_HEADERS: u32 = 1;
/// Item index of the first body record.
pub const ITEM_FIRST_RECORD: u32 = 2;
/// Bytes the AES-GCM tag adds to every sealed item.
pub const TAG_LEN: usize = 16;

const AAD_LABEL: &[u8] = b"api-relay";

/// Everything the AAD binds, except the item index and final flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeContext {
    pub direction: Direction,
    pub client_id: ClientId,
    pub pair_id: PairId,
    pub seq: u64,
    pub encode_type: EncodeType,
    pub flags: SealFlags,
}

impl ExchangeContext {
    /// The same exchange seen from the other direction.
    pub fn reversed(&self) -> Self {
        let direction = match self.direction {
            Direction::Request => Direction::Response,
            Direction::Response => Direction::Request,
        };
        Self { direction, ..self.clone() }
    }

    /// Builds the AAD of one item on the stack, which is possible because every client id has
    /// [`CLIENT_ID_LEN`] bytes.
    fn aad(&self, item: u32, is_final: bool) -> Aad {
        let client_id = self.client_id.as_bytes();
        let mut aad = Aad { bytes: [0; AAD_LEN], len: 0 };
        aad.push(AAD_LABEL);
        aad.push(&[
            PROTOCOL_VERSION,
            self.direction.code(),
            self.encode_type.code(),
            self.flags.bits(),
            u8::from(is_final),
        ]);
        aad.push(self.pair_id.as_bytes());
        aad.push(&self.seq.to_be_bytes());
        aad.push(&item.to_be_bytes());
        aad.push(&(CLIENT_ID_LEN as u16).to_be_bytes());
        aad.push(client_id);
        aad
    }
}

/// Bytes of the AAD: label, five single bytes, pair id, seq, item, client id length and client id.
const AAD_LEN: usize = AAD_LABEL.len() + 5 + PAIR_ID_LEN + 8 + 4 + 2 + CLIENT_ID_LEN;

/// The AAD of one item, in a fixed buffer.
struct Aad {
    bytes: [u8; AAD_LEN],
    len: usize,
}

impl Aad {
    fn push(&mut self, part: &[u8]) {
        self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Seals and opens the items of one exchange in one direction.
#[derive(Debug, Clone)]
pub struct ItemCipher {
    key: ExchangeKey,
    context: ExchangeContext,
}

impl ItemCipher {
    pub fn new(key: ExchangeKey, context: ExchangeContext) -> Self {
        Self { key, context }
    }

    pub fn context(&self) -> &ExchangeContext {
        &self.context
    }

    /// Seals the URL (path and query bytes), padded first for `MTE`.
    pub fn seal_url(&self, url: &[u8]) -> Vec<u8> {
        self.seal_padded(ITEM_URL, url)
    }

    /// Opens a sealed URL.
    ///
    /// # Errors
    /// `OpenFailed` when it does not authenticate, `MalformedPadding` for bad `MTE` padding.
    pub fn open_url(&self, sealed: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        self.open_padded(ITEM_URL, sealed, "url")
    }

    /// Seals an encoded header block, padded first for `MTE`.
    pub fn seal_headers(&self, block: &[u8]) -> Vec<u8> {
        self.seal_padded(ITEM_HEADERS, block)
    }

    /// Opens a sealed header block.
    ///
    /// # Errors
    /// As [`ItemCipher::open_url`].
    pub fn open_headers(&self, sealed: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        self.open_padded(ITEM_HEADERS, sealed, "header block")
    }

    /// Seals one item in place: `buffer` holds the plaintext and ends up holding ciphertext || tag.
    pub fn seal_in_place(&self, item: u32, is_final: bool, buffer: &mut Vec<u8>) {
        let nonce = Array::from(self.key.nonce(item));
        let aad = self.context.aad(item, is_final);
        // AES-GCM fails only for plaintexts over 64 GiB; items are at most a few MiB.
        let tag = self
            .key
            .cipher
            .encrypt_inout_detached(&nonce, aad.as_slice(), buffer.as_mut_slice().into())
            .expect("item below the aes-gcm length limit");
        buffer.extend_from_slice(tag.as_slice());
    }

    /// Opens one item in place: `buffer` holds ciphertext || tag and ends up holding the plaintext.
    ///
    /// # Errors
    /// `OpenFailed` when the tag does not verify for this item's nonce and AAD.
    pub fn open_in_place(
        &self,
        item: u32,
        is_final: bool,
        buffer: &mut Vec<u8>,
        what: &'static str,
    ) -> Result<(), ProtocolError> {
        let failed = ProtocolError::OpenFailed { item: what };
        let body_len = buffer.len().checked_sub(TAG_LEN).ok_or(failed.clone())?;
        let nonce = Array::from(self.key.nonce(item));
        let aad = self.context.aad(item, is_final);
        let (body, tag) = buffer.split_at_mut(body_len);
        let tag = Array::try_from(&*tag).map_err(|_| failed.clone())?;
        self.key
            .cipher
            .decrypt_inout_detached(&nonce, aad.as_slice(), body.into(), &tag)
            .map_err(|_| failed)?;
        buffer.truncate(body_len);
        Ok(())
    }

    fn seal_padded(&self, item: u32, plaintext: &[u8]) -> Vec<u8> {
        let mut buffer = match self.context.encode_type {
            EncodeType::Mke => Vec::with_capacity(plaintext.len() + TAG_LEN),
            EncodeType::Mte => Vec::with_capacity(padding::padded_item_len(plaintext.len()) + TAG_LEN),
        };
        match self.context.encode_type {
            EncodeType::Mke => buffer.extend_from_slice(plaintext),
            EncodeType::Mte => padding::pad_item(plaintext, &mut buffer),
        }
        self.seal_in_place(item, true, &mut buffer);
        buffer
    }

    fn open_padded(&self, item: u32, sealed: &[u8], what: &'static str) -> Result<Vec<u8>, ProtocolError> {
        let mut buffer = sealed.to_vec();
        self.open_in_place(item, true, &mut buffer, what)?;
        match self.context.encode_type {
            EncodeType::Mke => Ok(buffer),
            EncodeType::Mte => padding::unpad_item(&buffer).map(<[u8]>::to_vec),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{ClientIdSigner, PairKeys};

    pub(crate) fn cipher(direction: Direction, encode_type: EncodeType, seq: u64) -> ItemCipher {
        let pair_id = PairId::from_bytes([5; 16]);
        let keys = PairKeys::derive(&[1; 32], &[2; 64], &pair_id, &[3; 32]).keys;
        let context = ExchangeContext {
            direction,
            client_id: ClientIdSigner::new(b"secret", None).sign_uuid_for_tests(),
            pair_id,
            seq,
            encode_type,
            flags: SealFlags::ALL,
        };
        ItemCipher::new(keys.exchange(direction, encode_type, seq), context)
    }

    #[test]
    fn url_and_headers_round_trip_in_both_encode_types() {
        for encode_type in [EncodeType::Mke, EncodeType::Mte] {
            let cipher = cipher(Direction::Request, encode_type, 7);
            let url = b"/api/items?id=1&id=2;x".as_slice();
            assert_eq!(cipher.open_url(&cipher.seal_url(url)).unwrap(), url);
            assert_eq!(cipher.open_headers(&cipher.seal_headers(b"")).unwrap(), b"");
        }
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let cipher = cipher(Direction::Request, EncodeType::Mke, 1);
        let sealed = cipher.seal_url(b"/secret/path?q=1");
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x01;
            assert!(cipher.open_url(&tampered).is_err(), "flip at byte {index} was accepted");
        }
    }

    #[test]
    fn item_does_not_open_in_another_place() {
        let request = cipher(Direction::Request, EncodeType::Mke, 1);
        let sealed = request.seal_url(b"/x");
        assert!(request.open_headers(&sealed).is_err(), "opened as another item");
        assert!(
            cipher(Direction::Request, EncodeType::Mke, 2).open_url(&sealed).is_err(),
            "opened under another seq"
        );
        assert!(
            cipher(Direction::Response, EncodeType::Mke, 1).open_url(&sealed).is_err(),
            "opened in the other direction"
        );
        assert!(
            cipher(Direction::Request, EncodeType::Mte, 1).open_url(&sealed).is_err(),
            "opened as another encode type"
        );
    }

    #[test]
    fn mte_hides_url_length_within_a_bucket() {
        let cipher = cipher(Direction::Request, EncodeType::Mte, 1);
        assert_eq!(cipher.seal_url(b"/a").len(), cipher.seal_url(&[b'a'; 200]).len());
    }
}
