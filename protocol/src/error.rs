//! Errors of the protocol layer. None of them carries key material, plaintext or ciphertext.

use thiserror::Error;

/// Why a protocol step failed. Each variant maps to one relay error status on the wire.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found}, this relay speaks version {expected}")]
    UnsupportedVersion { found: u64, expected: u8 },
    /// The `x-mte-relay` header is not `<client id>,<pair id>,<type>,<url>,<headers>,<body>,<seq>,<version>`.
    #[error("malformed x-mte-relay header: {reason}")]
    MalformedRelayHeader { reason: &'static str },
    /// A client id is not `<uuid>.<hex hmac>` or its signature does not verify.
    #[error("invalid client id")]
    InvalidClientId,
    /// A pairing message is malformed or its key agreement failed.
    #[error("pairing failed: {reason}")]
    Pairing { reason: &'static str },
    /// A pairing request offers no pairs, or more than the responder accepts in one request.
    #[error(
        "pairing request offers {offered} pairs, but this relay accepts 1 to {max} (MAX_PAIRS_PER_REQUEST)"
    )]
    OfferCount { offered: usize, max: usize },
    /// Key confirmation failed: the two sides derived different keys.
    #[error(
        "pairing key confirmation failed: PAIRING_PSK differs between the relays, or the handshake was altered in transit"
    )]
    KeyConfirmation,
    /// A sealed item failed authentication: tampered, truncated, reordered or sealed with other keys.
    #[error("open failed: the sealed {item} did not authenticate")]
    OpenFailed { item: &'static str },
    /// The framing of the sealed body is wrong (bad length, data after the final record, missing final record).
    #[error("malformed sealed body: {reason}")]
    MalformedBody { reason: &'static str },
    /// The header block could not be decoded or exceeds a limit.
    #[error("malformed header block: {reason}")]
    MalformedHeaders { reason: &'static str },
    /// Padding of an `MTE` item is not well formed.
    #[error("malformed padding")]
    MalformedPadding,
    /// The exchange's sequence number was already accepted.
    #[error("replayed exchange: seq {seq} was already accepted")]
    Replayed { seq: u64 },
    /// The exchange's sequence number is older than the replay window.
    #[error("stale exchange: seq {seq} is older than the replay window")]
    Stale { seq: u64 },
    /// A counter (sequence number or record index) reached its limit; the pair must be replaced.
    #[error("counter exhausted: {counter}")]
    CounterExhausted { counter: &'static str },
}
