//! Pairing: the key agreement relay A starts with `POST /api/mte-pair` and relay B answers.
//!
//! The KEM is the hybrid ML-KEM-768 + P-256 of HPKE (RFC 9180 with the MLKEM768-P256 KEM,
//! id 0x0050), KDF HKDF-SHA256, export-only AEAD, in base mode or, with `PAIRING_PSK`, in PSK
//! mode. For each pair relay A sends a fresh pair id, a 32-byte nonce and a fresh HPKE public
//! key; relay B encapsulates to that key and returns the encapsulated key, its own nonce and a
//! key-confirmation value. Both sides then export the pair secret and run the key schedule in
//! [`crate::keys`]. Relay A's private keys are wiped when the [`PairingInitiator`] is dropped.
//!
//! The transcript hash binds everything both sides saw:
//!
//! ```text
//! SHA-256("api-relay/1 pairing" | version u8 | client id length u16 | client id | pair id
//!         | nonce a | nonce b | public key | encapsulated key)
//! ```

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hpke::aead::ExportOnlyAead;
use hpke::kdf::HkdfSha256;
use hpke::kem::MlKem768P256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, PskBundle, Serializable};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::keys::{CONFIRM_LEN, PairKeys, Schedule};
use crate::{ClientId, PROTOCOL_VERSION, PairId, ProtocolError};

type HybridKem = MlKem768P256;
type PublicKey = <HybridKem as Kem>::PublicKey;
type PrivateKey = <HybridKem as Kem>::PrivateKey;
type EncappedKey = <HybridKem as Kem>::EncappedKey;

/// Bytes of each side's pairing nonce.
pub const NONCE_LEN: usize = 32;
const HPKE_INFO: &[u8] = b"api-relay/1 pairing";
const EXPORT_LABEL: &[u8] = b"api-relay/1 pair secret";
const PSK_ID: &[u8] = b"api-relay PAIRING_PSK";

/// Body of `POST /api/mte-pair`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairingRequest {
    pub version: u8,
    /// The client id relay A holds, if any; relay B issues one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub pairs: Vec<PairOffer>,
}

/// One pair relay A offers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairOffer {
    /// 32 hex digits.
    pub pair_id: String,
    /// 32 bytes, base64url without padding.
    pub nonce: String,
    /// HPKE MLKEM768-P256 public key (1249 bytes), base64url without padding.
    pub public_key: String,
}

/// Answer to [`PairingRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairingResponse {
    pub version: u8,
    /// The client id the pairs belong to; relay A uses it from now on.
    pub client_id: String,
    pub pairs: Vec<PairAnswer>,
}

/// Relay B's half of one pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairAnswer {
    pub pair_id: String,
    /// 32 bytes, base64url without padding.
    pub nonce: String,
    /// HPKE encapsulated key (1153 bytes), base64url without padding.
    pub encapped_key: String,
    /// Key-confirmation value (32 bytes), base64url without padding.
    pub confirm: String,
}

/// A finished pair: its id and keys.
#[derive(Debug)]
pub struct Pair {
    pub pair_id: PairId,
    pub keys: PairKeys,
}

struct Offer {
    pair_id: PairId,
    nonce: [u8; NONCE_LEN],
    private_key: PrivateKey,
    public_key: PublicKey,
}

/// Relay A's side of one pairing request. Holds the ephemeral private keys until
/// [`PairingInitiator::complete`] consumes it; they are wiped on drop.
pub struct PairingInitiator {
    offers: Vec<Offer>,
}

impl std::fmt::Debug for PairingInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PairingInitiator({} offers)", self.offers.len())
    }
}

impl PairingInitiator {
    /// Generates `count` fresh key pairs and pair ids.
    pub fn new(count: usize) -> Self {
        let offers = (0..count)
            .map(|_| {
                let (private_key, public_key) = HybridKem::gen_keypair();
                Offer { pair_id: PairId::random(), nonce: random_nonce(), private_key, public_key }
            })
            .collect();
        Self { offers }
    }

    /// An initiator whose key pairs, pair ids and nonces depend only on `seed`, so the fuzz
    /// targets in [`crate::fuzzing`] can complete responses stored in their seed corpora. Pairing
    /// with it gives no secrecy, because anyone can derive its private keys.
    pub(crate) fn from_seed(seed: u8, count: u8) -> Self {
        let offers = (0..count)
            .map(|index| {
                let (private_key, public_key) = HybridKem::derive_keypair(&[seed, index].repeat(16));
                let mut pair_id = [index; 16];
                pair_id[0] = seed;
                Offer {
                    pair_id: PairId::from_bytes(pair_id),
                    nonce: [seed; NONCE_LEN],
                    private_key,
                    public_key,
                }
            })
            .collect();
        Self { offers }
    }

    /// The request body to send.
    pub fn request(&self, client_id: Option<&ClientId>) -> PairingRequest {
        let pairs = self
            .offers
            .iter()
            .map(|offer| PairOffer {
                pair_id: offer.pair_id.to_string(),
                nonce: B64.encode(offer.nonce),
                public_key: B64.encode(offer.public_key.to_bytes()),
            })
            .collect();
        PairingRequest { version: PROTOCOL_VERSION, client_id: client_id.map(|id| id.to_string()), pairs }
    }

    /// Finishes the pairs relay B answered, checking each key-confirmation value.
    ///
    /// # Errors
    /// `UnsupportedVersion`, `InvalidClientId` or `Pairing` for a malformed answer;
    /// `KeyConfirmation` when relay B derived other keys (mismatched `PAIRING_PSK` or an
    /// altered handshake).
    pub fn complete(
        self,
        response: &PairingResponse,
        psk: Option<&[u8]>,
    ) -> Result<(ClientId, Vec<Pair>), ProtocolError> {
        check_version(response.version)?;
        let client_id = ClientId::parse(&response.client_id)?;
        if response.pairs.is_empty() || response.pairs.len() > self.offers.len() {
            return Err(pairing_error("answer has no pairs or more pairs than offered"));
        }
        let mut pairs = Vec::with_capacity(response.pairs.len());
        for answer in &response.pairs {
            let pair_id =
                PairId::parse(&answer.pair_id).map_err(|_| pairing_error("invalid pair id in answer"))?;
            let offer = self
                .offers
                .iter()
                .find(|offer| offer.pair_id == pair_id)
                .ok_or(pairing_error("answer names a pair that was not offered"))?;
            pairs.push(offer.finish(&client_id, answer, psk)?);
        }
        Ok((client_id, pairs))
    }
}

impl Offer {
    fn finish(
        &self,
        client_id: &ClientId,
        answer: &PairAnswer,
        psk: Option<&[u8]>,
    ) -> Result<Pair, ProtocolError> {
        let nonce_b: [u8; NONCE_LEN] = decode_fixed(&answer.nonce, "nonce")?;
        let confirm: [u8; CONFIRM_LEN] = decode_fixed(&answer.confirm, "confirm")?;
        let enc_bytes = decode_b64(&answer.encapped_key, "encapsulated key")?;
        let encapped =
            EncappedKey::from_bytes(&enc_bytes).map_err(|_| pairing_error("invalid encapsulated key"))?;
        let psk_bundle = psk_bundle(psk)?;
        let mode = match psk_bundle {
            Some(bundle) => OpModeR::Psk(bundle),
            None => OpModeR::Base,
        };
        let context = hpke::setup_receiver::<ExportOnlyAead, HkdfSha256, HybridKem>(
            &mode,
            &self.private_key,
            &encapped,
            HPKE_INFO,
        )
        .map_err(|_| pairing_error("decapsulation failed"))?;
        let transcript = Transcript {
            client_id,
            pair_id: &self.pair_id,
            nonce_a: &self.nonce,
            nonce_b: &nonce_b,
            public_key: &self.public_key.to_bytes(),
            encapped_key: &enc_bytes,
        }
        .hash();
        let schedule = export_schedule(
            |label, out| context.export(label, out),
            &self.pair_id,
            &self.nonce,
            &nonce_b,
            &transcript,
        )?;
        if !bool::from(schedule.confirm.as_ref().ct_eq(&confirm)) {
            return Err(ProtocolError::KeyConfirmation);
        }
        Ok(Pair { pair_id: self.pair_id, keys: schedule.keys })
    }
}

/// Relay B's side: answers every offer of `request` for `client_id`.
///
/// # Errors
/// `UnsupportedVersion` or `Pairing` for a malformed request, more than `max_pairs` offers or a
/// repeated pair id.
pub fn respond(
    request: &PairingRequest,
    client_id: &ClientId,
    psk: Option<&[u8]>,
    max_pairs: usize,
) -> Result<(PairingResponse, Vec<Pair>), ProtocolError> {
    check_version(request.version)?;
    if request.pairs.is_empty() || request.pairs.len() > max_pairs {
        return Err(ProtocolError::OfferCount { offered: request.pairs.len(), max: max_pairs });
    }
    let mut answers = Vec::with_capacity(request.pairs.len());
    let mut pairs: Vec<Pair> = Vec::with_capacity(request.pairs.len());
    for offer in &request.pairs {
        let (answer, pair) = answer_offer(offer, client_id, psk)?;
        if pairs.iter().any(|existing| existing.pair_id == pair.pair_id) {
            return Err(pairing_error("repeated pair id"));
        }
        answers.push(answer);
        pairs.push(pair);
    }
    let response =
        PairingResponse { version: PROTOCOL_VERSION, client_id: client_id.to_string(), pairs: answers };
    Ok((response, pairs))
}

fn answer_offer(
    offer: &PairOffer,
    client_id: &ClientId,
    psk: Option<&[u8]>,
) -> Result<(PairAnswer, Pair), ProtocolError> {
    let pair_id = PairId::parse(&offer.pair_id).map_err(|_| pairing_error("invalid pair id"))?;
    let nonce_a: [u8; NONCE_LEN] = decode_fixed(&offer.nonce, "nonce")?;
    let public_bytes = decode_b64(&offer.public_key, "public key")?;
    let public_key = PublicKey::from_bytes(&public_bytes).map_err(|_| pairing_error("invalid public key"))?;
    let nonce_b = random_nonce();
    let mode = match psk_bundle(psk)? {
        Some(bundle) => OpModeS::Psk(bundle),
        None => OpModeS::Base,
    };
    let (encapped, context) =
        hpke::setup_sender::<ExportOnlyAead, HkdfSha256, HybridKem>(&mode, &public_key, HPKE_INFO)
            .map_err(|_| pairing_error("encapsulation failed"))?;
    let enc_bytes = encapped.to_bytes();
    let transcript = Transcript {
        client_id,
        pair_id: &pair_id,
        nonce_a: &nonce_a,
        nonce_b: &nonce_b,
        public_key: &public_bytes,
        encapped_key: &enc_bytes,
    }
    .hash();
    let schedule =
        export_schedule(|label, out| context.export(label, out), &pair_id, &nonce_a, &nonce_b, &transcript)?;
    let answer = PairAnswer {
        pair_id: pair_id.to_string(),
        nonce: B64.encode(nonce_b),
        encapped_key: B64.encode(enc_bytes),
        confirm: B64.encode(schedule.confirm.as_ref()),
    };
    Ok((answer, Pair { pair_id, keys: schedule.keys }))
}

struct Transcript<'a> {
    client_id: &'a ClientId,
    pair_id: &'a PairId,
    nonce_a: &'a [u8; NONCE_LEN],
    nonce_b: &'a [u8; NONCE_LEN],
    public_key: &'a [u8],
    encapped_key: &'a [u8],
}

impl Transcript<'_> {
    fn hash(&self) -> [u8; 32] {
        let client_id = self.client_id.as_bytes();
        let mut hash = Sha256::new();
        hash.update(HPKE_INFO);
        hash.update([PROTOCOL_VERSION]);
        hash.update((client_id.len() as u16).to_be_bytes());
        hash.update(client_id);
        hash.update(self.pair_id.as_bytes());
        hash.update(self.nonce_a);
        hash.update(self.nonce_b);
        hash.update(self.public_key);
        hash.update(self.encapped_key);
        hash.finalize().into()
    }
}

fn export_schedule(
    export: impl Fn(&[u8], &mut [u8]) -> Result<(), hpke::HpkeError>,
    pair_id: &PairId,
    nonce_a: &[u8; NONCE_LEN],
    nonce_b: &[u8; NONCE_LEN],
    transcript: &[u8; 32],
) -> Result<Schedule, ProtocolError> {
    let mut exported = zeroize::Zeroizing::new([0u8; 32]);
    let label = [EXPORT_LABEL, transcript].concat();
    export(&label, exported.as_mut()).map_err(|_| pairing_error("hpke export failed"))?;
    let salt = [nonce_a.as_slice(), nonce_b].concat();
    Ok(PairKeys::derive(exported.as_ref(), &salt, pair_id, transcript))
}

fn psk_bundle(psk: Option<&[u8]>) -> Result<Option<PskBundle<'_>>, ProtocolError> {
    psk.map(|psk| PskBundle::new(psk, PSK_ID).map_err(|_| pairing_error("empty PAIRING_PSK"))).transpose()
}

fn check_version(version: u8) -> Result<(), ProtocolError> {
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            found: u64::from(version),
            expected: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

fn decode_b64(text: &str, what: &'static str) -> Result<Vec<u8>, ProtocolError> {
    // 2 KiB of base64 is more than any field of a pairing message needs.
    if text.len() > 2048 {
        return Err(pairing_error(what));
    }
    B64.decode(text).map_err(|_| pairing_error(what))
}

fn decode_fixed<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N], ProtocolError> {
    decode_b64(text, what)?.try_into().map_err(|_| pairing_error(what))
}

fn pairing_error(reason: &'static str) -> ProtocolError {
    ProtocolError::Pairing { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay_header::SealFlags;
    use crate::seal::{ExchangeContext, ItemCipher};
    use crate::{ClientIdSigner, Direction, EncodeType};

    fn client_id() -> ClientId {
        ClientIdSigner::new(b"secret", None).issue()
    }

    fn cipher(keys: &PairKeys, pair_id: PairId, client_id: &ClientId, direction: Direction) -> ItemCipher {
        let context = ExchangeContext {
            direction,
            client_id: client_id.clone(),
            pair_id,
            seq: 1,
            encode_type: EncodeType::Mke,
            flags: SealFlags::ALL,
        };
        ItemCipher::new(keys.exchange(direction, EncodeType::Mke, 1), context)
    }

    #[test]
    fn both_sides_derive_the_same_keys() {
        let client_id = client_id();
        let initiator = PairingInitiator::new(3);
        let request = initiator.request(Some(&client_id));
        let (response, b_pairs) = respond(&request, &client_id, None, 8).unwrap();
        let (returned_id, a_pairs) = initiator.complete(&response, None).unwrap();
        assert_eq!(returned_id, client_id);
        assert_eq!(a_pairs.len(), 3);
        for (a, b) in a_pairs.iter().zip(&b_pairs) {
            assert_eq!(a.pair_id, b.pair_id);
            let sealed = cipher(&a.keys, a.pair_id, &client_id, Direction::Request).seal_url(b"/x");
            let opened =
                cipher(&b.keys, b.pair_id, &client_id, Direction::Request).open_url(&sealed).unwrap();
            assert_eq!(opened, b"/x");
        }
    }

    #[test]
    fn matching_psks_pair_and_mismatched_psks_fail_confirmation() {
        let client_id = client_id();
        let psk = [7u8; 32];
        let initiator = PairingInitiator::new(1);
        let (response, _) = respond(&initiator.request(None), &client_id, Some(&psk), 8).unwrap();
        assert!(initiator.complete(&response, Some(&psk)).is_ok());

        let initiator = PairingInitiator::new(1);
        let (response, _) = respond(&initiator.request(None), &client_id, Some(&[8u8; 32]), 8).unwrap();
        assert_eq!(initiator.complete(&response, Some(&psk)).unwrap_err(), ProtocolError::KeyConfirmation);

        let initiator = PairingInitiator::new(1);
        let (response, _) = respond(&initiator.request(None), &client_id, None, 8).unwrap();
        assert_eq!(initiator.complete(&response, Some(&psk)).unwrap_err(), ProtocolError::KeyConfirmation);
    }

    #[test]
    fn altered_answer_fails() {
        let client_id = client_id();
        let initiator = PairingInitiator::new(1);
        let (mut response, _) = respond(&initiator.request(None), &client_id, None, 8).unwrap();
        let mut nonce = B64.decode(&response.pairs[0].nonce).unwrap();
        nonce[0] ^= 1;
        response.pairs[0].nonce = B64.encode(nonce);
        assert!(initiator.complete(&response, None).is_err());
    }

    #[test]
    fn too_many_offers_or_repeated_ids_are_rejected() {
        let client_id = client_id();
        let request = PairingInitiator::new(3).request(None);
        assert!(respond(&request, &client_id, None, 2).is_err());
        let mut request = PairingInitiator::new(2).request(None);
        request.pairs[1].pair_id = request.pairs[0].pair_id.clone();
        assert!(respond(&request, &client_id, None, 8).is_err());
    }

    #[test]
    fn other_version_is_rejected() {
        let mut request = PairingInitiator::new(1).request(None);
        request.version = 2;
        assert!(matches!(
            respond(&request, &client_id(), None, 8),
            Err(ProtocolError::UnsupportedVersion { .. })
        ));
    }
}
