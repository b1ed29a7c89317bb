//! Bodies of the fuzz targets in `protocol/fuzz`, and the seed inputs of their corpora.
//!
//! The fuzz targets and the corpus regression tests in `protocol/tests/fuzz_corpus.rs` call the
//! same functions, so every file in a corpus replays under `cargo test`. Each body returns
//! normally for any input and panics only when a parser breaks one of its own invariants.
//! Every key here is fixed and public: this module exists for testing and is not a stable API.

use crate::fields::{self, FieldLimits};
use crate::pairing::{self, PairingInitiator, PairingRequest, PairingResponse};
use crate::records::{RecordOpener, RecordSealer};
use crate::relay_header::SealFlags;
use crate::seal::{ExchangeContext, ItemCipher};
use crate::{ClientId, Direction, EncodeType, MAX_RECORD_PLAINTEXT, PairId, PairKeys, RelayHeader, padding};

/// Fuzz targets with a body in this module, which are also their corpus folders. The
/// `snapshot` target has its body in the actors crate.
pub const TARGETS: [&str; 7] = [
    "relay_header",
    "pairing_request",
    "pairing_response",
    "records",
    "header_block",
    "sealed_item",
    "padding",
];

/// Client id of every fixed exchange (the one of the test vectors in `docs/protocol.md`).
pub const CLIENT_ID: &str =
    "00000000-0000-4000-8000-000000000000.babad18146e9136530ae2dd29f7594702ef5800bdc9ee1b95811b9904dfdf483";

/// Sequence number of every fixed exchange.
pub const SEQ: u64 = 7;

/// Header block limits of the fixed exchanges: the relay's default of 100 lines plus the
/// pseudo-field, and 64 KiB.
pub const FIELD_LIMITS: FieldLimits = FieldLimits { max_fields: 101, max_bytes: 64 * 1024 };

/// Maximum offers relay B accepts in one pairing request, as `MAX_PAIRS_PER_REQUEST` sets it.
const MAX_PAIRS: usize = 8;
/// Seed of the initiator whose offers the `pairing_response` target completes.
const INITIATOR_SEED: u8 = 0x5e;
/// Offers that initiator makes.
const INITIATOR_OFFERS: u8 = 2;

/// Returns the fixed client id.
pub fn client_id() -> ClientId {
    ClientId::parse(CLIENT_ID).expect("CLIENT_ID has the client id shape")
}

/// Returns the fixed pair id, `000102...0f`.
pub fn pair_id() -> PairId {
    PairId::from_bytes(std::array::from_fn(|index| index as u8))
}

/// Derives the keys from the fixed inputs of the test vectors in `docs/protocol.md`.
pub fn pair_keys() -> PairKeys {
    let salt = [[0xa1; 32], [0xb2; 32]].concat();
    PairKeys::derive(&[0x01; 32], &salt, &pair_id(), &[0x33; 32]).keys
}

/// Builds the item cipher that a selector byte names.
///
/// Bit 0 picks the encode type (0 `MKE`, 1 `MTE`), bit 1 the direction (0 request, 1 response),
/// bit 2 the URL flag and bit 3 the headers flag. The higher bits are left to each target.
pub fn item_cipher(selector: u8) -> ItemCipher {
    let encode_type = if selector & 1 == 0 { EncodeType::Mke } else { EncodeType::Mte };
    let direction = if selector & 2 == 0 { Direction::Request } else { Direction::Response };
    let flags = SealFlags { url: selector & 4 != 0, headers: selector & 8 != 0, body: true };
    let context = ExchangeContext {
        direction,
        client_id: client_id(),
        pair_id: pair_id(),
        seq: SEQ,
        encode_type,
        flags,
    };
    ItemCipher::new(pair_keys().exchange(direction, encode_type, SEQ), context)
}

/// Parses an `x-mte-relay` value and checks that a parsed header prints back to itself.
pub fn relay_header(data: &[u8]) {
    if let Ok(header) = RelayHeader::parse(data) {
        let printed = header.to_string();
        assert_eq!(RelayHeader::parse(printed.as_bytes()), Ok(header), "printed as {printed:?}");
    }
}

/// Parses a pairing request as relay B does and responds to it for the fixed client id.
pub fn pairing_request(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<PairingRequest>(data) else {
        return;
    };
    let offered_id = request.client_id.as_deref().and_then(|text| ClientId::parse(text).ok());
    let client_id = offered_id.unwrap_or_else(client_id);
    if let Ok((response, pairs)) = pairing::respond(&request, &client_id, None, MAX_PAIRS) {
        assert_eq!(response.pairs.len(), request.pairs.len(), "one answer per offer");
        assert_eq!(pairs.len(), request.pairs.len(), "one pair per offer");
    }
}

/// Parses a pairing response as relay A does and completes it against fixed offers.
pub fn pairing_response(data: &[u8]) {
    let Ok(response) = serde_json::from_slice::<PairingResponse>(data) else {
        return;
    };
    let initiator = PairingInitiator::from_seed(INITIATOR_SEED, INITIATOR_OFFERS);
    if let Ok((_, pairs)) = initiator.complete(&response, None) {
        assert_eq!(pairs.len(), response.pairs.len(), "one pair per answer");
    }
}

/// Feeds a sealed body to a [`RecordOpener`] in chunks.
///
/// The first byte is an [`item_cipher`] selector whose high four bits set the chunk length
/// (1 to 106 bytes). The rest is the body as it arrives from the network.
pub fn records(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let mut opener = RecordOpener::new(item_cipher(selector));
    let chunk_len = usize::from(selector >> 4) * 7 + 1;
    for chunk in body.chunks(chunk_len) {
        opener.push(chunk);
        loop {
            match opener.next_record() {
                Ok(Some(record)) => {
                    assert!(record.len() <= MAX_RECORD_PLAINTEXT, "record of {}", record.len())
                }
                Ok(None) => break,
                // Errors are final: the relay discards the body.
                Err(_) => return,
            }
        }
    }
    let _ = opener.finish();
}

/// Decodes a header block and checks that its fields encode and decode to the same list.
pub fn header_block(data: &[u8]) {
    if let Ok(lines) = fields::decode(data, FIELD_LIMITS) {
        let encoded = fields::encode(&lines);
        assert_eq!(fields::decode(&encoded, FIELD_LIMITS).as_ref(), Ok(&lines), "re-encoded block");
    }
}

/// Opens a sealed URL or header block with a fixed key.
///
/// The first byte is an [`item_cipher`] selector whose bit 4 picks the item (0 URL, 1 header
/// block). An opened header block is decoded as relay B does next.
pub fn sealed_item(data: &[u8]) {
    let Some((&selector, sealed)) = data.split_first() else {
        return;
    };
    let cipher = item_cipher(selector);
    if selector & 0x10 == 0 {
        let _ = cipher.open_url(sealed);
    } else if let Ok(block) = cipher.open_headers(sealed) {
        let _ = fields::decode(&block, FIELD_LIMITS);
    }
}

/// Removes `MTE` padding as an item and as a body, and checks that the data pads back.
pub fn padding(data: &[u8]) {
    if let Ok(item) = padding::unpad_item(data) {
        let mut padded = Vec::new();
        padding::pad_item(item, &mut padded);
        assert_eq!(padding::unpad_item(&padded), Ok(item), "item re-padded");
    }
    if let Ok(body) = padding::unpad_body(data) {
        assert_eq!(padding::unpad_body(&padding::pad_body(body)), Ok(body), "body re-padded");
    }
}

/// Seed inputs of every target in this crate, as (target, file name, bytes).
///
/// The valid inputs are sealed with the fixed keys, so the fuzzer starts from inputs that reach
/// past authentication. Sealing and pairing draw random nonces, so the bytes differ per call.
pub fn seed_inputs() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add =
        |target: &'static str, name: &str, bytes: Vec<u8>| seeds.push((target, name.to_owned(), bytes));

    let header = format!("{CLIENT_ID},{},MKE,1,1,1,7,1", pair_id());
    add("relay_header", "valid_mke", header.clone().into_bytes());
    add(
        "relay_header",
        "valid_mte_spaces",
        format!("{CLIENT_ID} , {} ,mte,0,1,1,+18446744073709551615,01", pair_id()).into_bytes(),
    );
    add("relay_header", "body_clear", header.replace(",1,1,1,", ",1,1,0,").into_bytes());
    add("relay_header", "version_2", format!("{}2", &header[..header.len() - 1]).into_bytes());
    add("relay_header", "nine_fields", format!("{header},1").into_bytes());
    add("relay_header", "not_utf8", vec![0xff, b',', 0xfe]);

    let request = PairingInitiator::from_seed(INITIATOR_SEED, INITIATOR_OFFERS).request(Some(&client_id()));
    let request_json = serde_json::to_vec(&request).expect("request serialises");
    add("pairing_request", "valid_two_offers", request_json);
    let mut repeated = request.clone();
    repeated.pairs[1].pair_id = repeated.pairs[0].pair_id.clone();
    add("pairing_request", "repeated_pair_id", serde_json::to_vec(&repeated).expect("request serialises"));
    let mut short_key = request.clone();
    short_key.pairs[0].public_key.truncate(100);
    add("pairing_request", "short_public_key", serde_json::to_vec(&short_key).expect("request serialises"));
    add("pairing_request", "no_pairs", br#"{"version":1,"pairs":[]}"#.to_vec());
    add("pairing_request", "not_json", b"{\"version\":1,\"pairs\":[".to_vec());

    let (response, _) =
        pairing::respond(&request, &client_id(), None, MAX_PAIRS).expect("fixed offers are valid");
    add("pairing_response", "valid_two_answers", serde_json::to_vec(&response).expect("response serialises"));
    let mut unknown = response.clone();
    unknown.pairs[0].pair_id = "ffffffffffffffffffffffffffffffff".to_owned();
    add("pairing_response", "unknown_pair_id", serde_json::to_vec(&unknown).expect("response serialises"));
    let mut wrong_confirm = response.clone();
    wrong_confirm.pairs[1].confirm = wrong_confirm.pairs[0].confirm.clone();
    add(
        "pairing_response",
        "wrong_confirm",
        serde_json::to_vec(&wrong_confirm).expect("response serialises"),
    );
    add("pairing_response", "bad_client_id", br#"{"version":1,"clientId":"x","pairs":[]}"#.to_vec());

    for selector in [0x0c_u8, 0x3d, 0xf2] {
        let mut sealer = RecordSealer::new(item_cipher(selector));
        let mut stream = vec![selector];
        stream.extend(sealer.seal(b"first record", false).expect("record seals"));
        stream.extend(sealer.seal(&[0x42; 300], false).expect("record seals"));
        stream.extend(sealer.seal(b"", true).expect("record seals"));
        add("records", &format!("three_records_{selector:02x}"), stream.clone());
        add("records", &format!("truncated_{selector:02x}"), stream[..stream.len() - 5].to_vec());
    }
    let mut single = vec![0x00];
    single.extend(RecordSealer::new(item_cipher(0)).seal(b"only", true).expect("record seals"));
    add("records", "single_final", single.clone());
    single.extend_from_slice(&[1, 0, 0, 16]);
    add("records", "trailing_header", single);
    add("records", "oversized_length", vec![0x00, 0x00, 0xff, 0xff, 0xff]);

    let block = fields::encode(&[(":method", "POST"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]);
    add("header_block", "request_block", block.clone());
    add("header_block", "empty_block", vec![0]);
    add("header_block", "truncated", block[..block.len() - 1].to_vec());
    add("header_block", "long_varint", vec![0xc0, 0, 0, 0, 0, 0, 0, 4, 1, b'a', 0x40, 1, b'b']);
    add("header_block", "empty_name", fields::encode(&[("", "v")]));

    for selector in [0x0c_u8, 0x0d, 0x1c, 0x1f, 0x12] {
        let cipher = item_cipher(selector);
        let sealed = match selector & 0x10 {
            0 => cipher.seal_url(b"/api/items?id=1"),
            _ => cipher.seal_headers(&block),
        };
        let mut input = vec![selector];
        input.extend_from_slice(&sealed);
        add("sealed_item", &format!("valid_{selector:02x}"), input.clone());
        input[5] ^= 1;
        add("sealed_item", &format!("flipped_{selector:02x}"), input);
    }
    add("sealed_item", "shorter_than_tag", vec![0x00, 1, 2, 3]);

    let mut item = Vec::new();
    padding::pad_item(b"/api/items?id=1", &mut item);
    add("padding", "item", item);
    add("padding", "body", padding::pad_body(&[7; 300]));
    add("padding", "length_past_end", [&u64::MAX.to_be_bytes()[..], &[0; 8]].concat());
    add("padding", "nonzero_padding", vec![0, 0, 0, 1, b'a', 1]);
    add("padding", "empty", Vec::new());

    seeds
}

/// Runs `body` on every file in `dir`, the corpus of one fuzz target, so the corpus replays
/// under `cargo test`.
///
/// # Panics
/// Naming the file, when `body` panics on it; also when `dir` cannot be read or has no file.
pub fn replay_corpus(dir: &std::path::Path, body: impl Fn(&[u8])) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let data =
            std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&data)));
        assert!(outcome.is_ok(), "fuzz target body panicked on {}", path.display());
        count += 1;
    }
    assert!(count > 0, "corpus {} is empty", dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let seeds = seed_inputs();
        let found =
            seeds.into_iter().find(|(seed_target, seed_name, _)| *seed_target == target && seed_name == name);
        found.unwrap_or_else(|| panic!("no seed {target}/{name}")).2
    }

    #[test]
    fn valid_pairing_seeds_complete() {
        let request: PairingRequest =
            serde_json::from_slice(&seed("pairing_request", "valid_two_offers")).unwrap();
        assert!(pairing::respond(&request, &client_id(), None, MAX_PAIRS).is_ok());

        let response: PairingResponse =
            serde_json::from_slice(&seed("pairing_response", "valid_two_answers")).unwrap();
        let initiator = PairingInitiator::from_seed(INITIATOR_SEED, INITIATOR_OFFERS);
        assert_eq!(initiator.complete(&response, None).unwrap().1.len(), 2);
    }

    #[test]
    fn valid_sealed_seeds_open() {
        for selector in [0x0c_u8, 0x0d] {
            let input = seed("sealed_item", &format!("valid_{selector:02x}"));
            assert_eq!(item_cipher(selector).open_url(&input[1..]).unwrap(), b"/api/items?id=1");
        }
        for selector in [0x1c_u8, 0x1f, 0x12] {
            let input = seed("sealed_item", &format!("valid_{selector:02x}"));
            let block = item_cipher(selector).open_headers(&input[1..]).unwrap();
            assert_eq!(fields::decode(&block, FIELD_LIMITS).unwrap().len(), 3);
        }
        for selector in [0x0c_u8, 0x3d, 0xf2] {
            let input = seed("records", &format!("three_records_{selector:02x}"));
            let mut opener = RecordOpener::new(item_cipher(selector));
            let body = crate::records::open_body(&mut opener, &input[1..]).unwrap();
            assert_eq!(body.len(), "first record".len() + 300);
        }
    }
}
