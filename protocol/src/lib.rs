//! Wire protocol of api-relay: everything two relays must agree on, with no I/O.
//!
//! Layout, in the order an exchange uses it:
//!
//! - [`ids`]: `PairId` and the signed `ClientId` that relay B issues to relay A.
//! - [`pairing`]: the hybrid P-256 + ML-KEM-768 key agreement (HPKE, RFC 9180) that relay A
//!   starts with `POST /api/mte-pair` and relay B answers.
//! - [`keys`]: the key schedule from the pairing secret to per-direction and per-exchange keys.
//! - [`relay_header`]: the clear `x-mte-relay` control header of one exchange.
//! - [`seal`]: AES-256-GCM sealing of one item (URL, header block or body record) with the
//!   nonce and associated data rules that bind it to its pair, exchange and position.
//! - [`records`]: framing of a body as a stream of sealed records.
//! - [`fields`]: the ordered header block (RFC 9292 known-length field section).
//! - [`padding`]: length hiding for the `MTE` encode type.
//! - [`replay`]: the sliding window relay B uses to reject replayed sequence numbers.
//!
//! A request travels: relay A allocates `seq`, seals the URL (item 0), the header block
//! (item 1) and the body records (items 2..) with the request-direction key; relay B checks the
//! client id, the replay window and the seals, then answers with the response-direction key and
//! the same `seq`.
#![forbid(unsafe_code)]

pub mod error;
pub mod fields;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod keys;
pub mod padding;
pub mod pairing;
pub mod records;
pub mod relay_header;
pub mod replay;
pub mod seal;

pub use error::ProtocolError;
pub use ids::{ClientId, ClientIdSigner, PairId, ShortPairId};
pub use keys::{Direction, ExchangeKey, PairKeys};
pub use relay_header::{EncodeType, RelayHeader};
pub use seal::ExchangeContext;

/// Version of the wire protocol. It travels in every pairing message, in every `x-mte-relay`
/// header and in the associated data of every sealed item, so a later version can change any
/// part of the protocol and an old peer rejects it instead of misreading it.
pub const PROTOCOL_VERSION: u8 = 1;

/// Maximum plaintext bytes of one body record (64 KiB): large enough that the 20 bytes of framing
/// and tag per record cost about 0.03%, small enough that a relay streaming an `MKE` body holds
/// only about one record of it in memory.
pub const MAX_RECORD_PLAINTEXT: usize = 64 * 1024;
