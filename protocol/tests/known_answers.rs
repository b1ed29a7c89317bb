//! Known-answer tests of the key schedule, item sealing and the hybrid KEM.
//!
//! The hybrid KEM is checked against the first MLKEM768-P256 vector of the published hybrid KEM
//! test vectors (draft-irtf-cfrg-hybrid-kems), kept in `tests/vectors/mlkem768_p256.json`. The
//! other vectors here are regression vectors.
//!
//! The key schedule and MKE vectors are the ones in the "Test vectors" section of
//! `docs/protocol.md`. The MTE and KEM vectors were computed once with the code under test and
//! pin its current output, so a change in this crate or a dependency upgrade that alters any
//! byte on the wire fails here.

use api_relay_protocol::relay_header::SealFlags;
use api_relay_protocol::seal::{ExchangeContext, ItemCipher};
use api_relay_protocol::{ClientId, ClientIdSigner, Direction, EncodeType, PairId, PairKeys};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hpke::aead::ExportOnlyAead;
use hpke::kdf::HkdfSha256;
use hpke::kem::MlKem768P256;
use hpke::rand_core::{TryCryptoRng, TryRng};
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};

const CLIENT_ID: &str =
    "00000000-0000-4000-8000-000000000000.babad18146e9136530ae2dd29f7594702ef5800bdc9ee1b95811b9904dfdf483";
const URL: &[u8] = b"/api/items?id=1";

fn pair_id() -> PairId {
    PairId::parse("000102030405060708090a0b0c0d0e0f").unwrap()
}

fn schedule() -> api_relay_protocol::keys::Schedule {
    let salt = [[0xa1u8; 32], [0xb2; 32]].concat();
    PairKeys::derive(&[0x01; 32], &salt, &pair_id(), &[0x33; 32])
}

fn url_cipher(encode_type: EncodeType) -> ItemCipher {
    let context = ExchangeContext {
        direction: Direction::Request,
        client_id: ClientId::parse(CLIENT_ID).unwrap(),
        pair_id: pair_id(),
        seq: 7,
        encode_type,
        flags: SealFlags::ALL,
    };
    ItemCipher::new(schedule().keys.exchange(Direction::Request, encode_type, 7), context)
}

#[test]
fn client_id_vector_verifies() {
    let signer = ClientIdSigner::new(b"example CLIENT_ID_SECRET", None);
    assert!(signer.verify(&ClientId::parse(CLIENT_ID).unwrap()).is_ok());
    assert_eq!(signer.refresh(&ClientId::parse(CLIENT_ID).unwrap()).as_str(), CLIENT_ID);
}

#[test]
fn key_schedule_matches_protocol_vectors() {
    let schedule = schedule();
    let bytes = schedule.keys.to_bytes();
    assert_eq!(hex::encode(&bytes[..32]), "6e0f7b155a31a323f2bc24f88be4d25fb7ab7abd783af3d2bea0bf44de6ac1d7");
    assert_eq!(hex::encode(&bytes[32..44]), "c4e8c8d776364556c4d2ce24");
    assert_eq!(
        hex::encode(&bytes[44..76]),
        "53fa21d3043b2683ce744453997c8f552dd8d8cc62c61ffba0f46f4da2f77050"
    );
    assert_eq!(hex::encode(&bytes[76..]), "63e57fe8c669e8f7f27bfd63");
    assert_eq!(
        hex::encode(schedule.confirm.as_ref()),
        "5a9c1fd362774d5182372100bf29e5bf4a727319adb4e41254f980b722f766bd"
    );
}

#[test]
fn mke_sealed_url_matches_protocol_vector() {
    let sealed = url_cipher(EncodeType::Mke).seal_url(URL);
    assert_eq!(hex::encode(&sealed), "3c7ce512d84946c42cbb9802b643fc65421f336aa14214bd97bf7a1d37b7f6");
    assert_eq!(URL_SAFE_NO_PAD.encode(&sealed), "PHzlEthJRsQsu5gCtkP8ZUIfM2qhQhS9l796HTe39g");
}

/// Regression vector: the MTE seal of the same URL, which `docs/protocol.md` describes but does
/// not list.
#[test]
fn mte_sealed_url_matches_regression_vector() {
    let sealed = url_cipher(EncodeType::Mte).seal_url(URL);
    assert_eq!(sealed.len(), 272);
    assert_eq!(
        hex::encode(Sha256::digest(&sealed)),
        "1075c6bb9f4b9c508d5b54e1f925ee338e8f9720318edc91a342ebfdc6963759"
    );
    assert_eq!(url_cipher(EncodeType::Mte).open_url(&sealed).unwrap(), URL);
}

/// A byte stream from SHA-256 in counter mode. It replaces the system random number generator
/// so that encapsulation is repeatable. It is not secure and serves only this test.
struct CounterRng {
    counter: u64,
}

impl TryRng for CounterRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut bytes = [0; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut bytes = [0; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(32) {
            let block = Sha256::digest(self.counter.to_be_bytes());
            chunk.copy_from_slice(&block[..chunk.len()]);
            self.counter += 1;
        }
        Ok(())
    }
}

impl TryCryptoRng for CounterRng {}

/// Regression vectors for the MLKEM768-P256 KEM of hpke 0.15.1 as pairing uses it: key pair
/// derivation, encapsulation with a fixed random stream, and the exported secret on both sides
/// in base and PSK mode. Digests replace the 1249-byte public key and 1153-byte
/// encapsulated key.
#[test]
fn hybrid_kem_matches_regression_vectors() {
    let (private_key, public_key) = MlKem768P256::derive_keypair(&[0x42; 32]);
    assert_eq!(public_key.to_bytes().len(), 1249);
    assert_eq!(
        hex::encode(Sha256::digest(public_key.to_bytes())),
        "206c7f5c0b29ed73d38a741a9434c232e27cb4717743bbb4846ac79e504f3e33"
    );

    let info = b"api-relay/1 pairing";
    let label = [&b"api-relay/1 pair secret"[..], &[0x33; 32]].concat();
    let psk = hpke::PskBundle::new(&[7; 32], b"api-relay PAIRING_PSK").unwrap();
    // Encapsulation depends only on the public key and the random stream, so both modes send
    // the same encapsulated key and differ only in the exported secret.
    let encapped_digest = "2f4eba80d83613bfffbc7f5a866958186f440374dde842f15a0e18b1ae068f4e";
    let cases = [
        (
            "base",
            OpModeS::Base,
            OpModeR::Base,
            "1de1cabb8c47c26868f89c84fc7dc814eea3b28717d39872ed38a84c4b2abab8",
        ),
        (
            "psk",
            OpModeS::Psk(psk),
            OpModeR::Psk(psk),
            "796d8618f5731f7dd5ebfb58d16b8cb94b0ec1ce11a2ea117d1e18eaba3e603b",
        ),
    ];
    for (name, sender_mode, receiver_mode, exported_hex) in cases {
        let mut rng = CounterRng { counter: 0 };
        let (encapped, sender) = hpke::setup_sender_with_rng::<ExportOnlyAead, HkdfSha256, MlKem768P256>(
            &sender_mode,
            &public_key,
            info,
            &mut rng,
        )
        .unwrap();
        assert_eq!(encapped.to_bytes().len(), 1153, "{name}");
        assert_eq!(
            hex::encode(Sha256::digest(encapped.to_bytes())),
            encapped_digest,
            "{name} encapsulated key"
        );

        let mut exported = [0u8; 32];
        sender.export(&label, &mut exported).unwrap();
        assert_eq!(hex::encode(exported), exported_hex, "{name} sender export");

        let receiver = hpke::setup_receiver::<ExportOnlyAead, HkdfSha256, MlKem768P256>(
            &receiver_mode,
            &private_key,
            &encapped,
            info,
        )
        .unwrap();
        let mut received = [0u8; 32];
        receiver.export(&label, &mut received).unwrap();
        assert_eq!(received, exported, "{name} receiver export");
    }
}

/// The published vector: the key pair its seed encodes must have the published public key, and
/// decapsulating the published ciphertext must give the published shared secret.
#[test]
fn hybrid_kem_matches_published_vector() {
    let vector: serde_json::Value =
        serde_json::from_str(include_str!("vectors/mlkem768_p256.json")).expect("vector file is JSON");
    let field = |name: &str| {
        hex::decode(vector[name].as_str().expect("vector field is a string")).expect("vector field is hex")
    };
    let private_key =
        <MlKem768P256 as Kem>::PrivateKey::from_bytes(&field("seed")).expect("seed is a private key");
    let public_key = MlKem768P256::sk_to_pk(&private_key);
    assert_eq!(public_key.to_bytes().as_slice(), field("encapsulation_key"), "public key");
    let encapped = <MlKem768P256 as Kem>::EncappedKey::from_bytes(&field("ciphertext"))
        .expect("ciphertext is an encapsulated key");
    let shared = MlKem768P256::decap(&private_key, None, &encapped).expect("decapsulation");
    assert_eq!(shared.0.as_slice(), field("shared_secret"), "shared secret");
}
