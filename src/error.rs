//! `RelayError`: every way a request can fail, and its `ResponseError` impl, the single table
//! from error to HTTP status and JSON body.
//!
//! Relay-layer failures on the relay A to relay B hop use the statuses 559-569 ([`RelayCode`]).
//! The application only ever sees ordinary statuses: 400, 401, 403, 413, 502, 504. Error bodies
//! are `{"error": "...", "code": N}` and never contain secrets, keys, plaintext or internal
//! addresses.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use api_relay_protocol::ProtocolError;
use serde::Serialize;
use thiserror::Error;

/// Relay error statuses of the relay A to relay B hop, as listed by `GET /api/mte-errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayCode {
    UnsupportedVersion = 559,
    StateNotFound = 560,
    MalformedRelayHeader = 561,
    OpenFailed = 562,
    Replayed = 563,
    PairingRejected = 564,
    MalformedBody = 565,
    InvalidClientId = 566,
    PairExpired = 567,
    StoreUnavailable = 568,
    MissingRelayHeader = 569,
}

impl RelayCode {
    /// Every code with its meaning, in order.
    pub const ALL: [(RelayCode, &'static str); 11] = [
        (RelayCode::UnsupportedVersion, "unsupported protocol version"),
        (RelayCode::StateNotFound, "state not found: the peer does not know this pair; pair again"),
        (RelayCode::MalformedRelayHeader, "malformed x-mte-relay header"),
        (RelayCode::OpenFailed, "open failed: a sealed item did not authenticate (tampered or wrong keys)"),
        (
            RelayCode::Replayed,
            "replayed or stale exchange: seq already accepted or older than the replay window",
        ),
        (RelayCode::PairingRejected, "pairing rejected: malformed or over-limit pairing request"),
        (RelayCode::MalformedBody, "malformed sealed body framing"),
        (RelayCode::InvalidClientId, "invalid client id: get a new one with HEAD /api/mte-relay"),
        (RelayCode::PairExpired, "pair expired: pair again"),
        (RelayCode::StoreUnavailable, "state store unavailable: the relay cannot decide safely; retry later"),
        (
            RelayCode::MissingRelayHeader,
            "missing relay header: send x-mte-outbound-token (outbound) or x-mte-relay (inbound)",
        ),
    ];

    pub fn status(self) -> StatusCode {
        StatusCode::from_u16(self as u16).expect("559-569 are valid status codes")
    }

    pub fn from_status(status: u16) -> Option<Self> {
        Self::ALL.iter().map(|(code, _)| *code).find(|code| *code as u16 == status)
    }

    /// Lowercase name used as a metric label and in logs.
    pub fn name(self) -> &'static str {
        match self {
            RelayCode::UnsupportedVersion => "unsupported_version",
            RelayCode::StateNotFound => "state_not_found",
            RelayCode::MalformedRelayHeader => "malformed_relay_header",
            RelayCode::OpenFailed => "open_failed",
            RelayCode::Replayed => "replayed",
            RelayCode::PairingRejected => "pairing_rejected",
            RelayCode::MalformedBody => "malformed_body",
            RelayCode::InvalidClientId => "invalid_client_id",
            RelayCode::PairExpired => "pair_expired",
            RelayCode::StoreUnavailable => "store_unavailable",
            RelayCode::MissingRelayHeader => "missing_relay_header",
        }
    }
}

impl From<&ProtocolError> for RelayCode {
    fn from(error: &ProtocolError) -> Self {
        match error {
            ProtocolError::UnsupportedVersion { .. } => RelayCode::UnsupportedVersion,
            ProtocolError::MalformedRelayHeader { .. } => RelayCode::MalformedRelayHeader,
            ProtocolError::InvalidClientId => RelayCode::InvalidClientId,
            ProtocolError::Pairing { .. }
            | ProtocolError::OfferCount { .. }
            | ProtocolError::KeyConfirmation => RelayCode::PairingRejected,
            ProtocolError::OpenFailed { .. }
            | ProtocolError::MalformedPadding
            | ProtocolError::MalformedHeaders { .. } => RelayCode::OpenFailed,
            ProtocolError::MalformedBody { .. } => RelayCode::MalformedBody,
            ProtocolError::Replayed { .. } | ProtocolError::Stale { .. } => RelayCode::Replayed,
            ProtocolError::CounterExhausted { .. } => RelayCode::PairExpired,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Error)]
pub enum RelayError {
    /// Outbound: `x-mte-outbound-token` missing or wrong.
    #[error("invalid or missing x-mte-outbound-token")]
    Unauthorized,
    /// Outbound: a request header has an invalid value.
    #[error("invalid {header} header: {reason}")]
    BadHeader { header: &'static str, reason: String },
    /// Outbound: `x-mte-upstream` names a peer that is not on `OUTBOUND_ALLOWLIST`.
    #[error("x-mte-upstream is not on the outbound allow-list")]
    UpstreamNotAllowed,
    /// Outbound: the application's headers exceed `MAX_HEADER_COUNT` or `MAX_HEADER_BYTES`.
    #[error("request headers too large: {reason}")]
    HeadersTooLarge { reason: String },
    /// The body exceeds `MAX_BODY_BYTES`.
    #[error("request body larger than the configured maximum of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// A relay-layer failure on the hop between the relays.
    #[error("{message}")]
    Relay { code: RelayCode, message: String },
    /// Outbound: the peer returned a relay error that a retry did not fix.
    #[error("peer relay rejected the {stage} with status {status}")]
    PeerRejected { stage: &'static str, status: u16 },
    /// The next hop (peer relay or upstream API) could not be reached.
    #[error("{hop} unreachable")]
    Unreachable { hop: &'static str },
    /// The next hop did not respond within the configured time.
    #[error("{hop} timed out after {secs} s")]
    Timeout { hop: &'static str, secs: u64 },
    /// Relay B could not reach its upstream API or timed out on it, and returned 502 or 504.
    #[error("{message}")]
    PeerReported { status: u16, message: String },
    /// The next hop's response broke the protocol.
    #[error("invalid answer from {hop}: {reason}")]
    BadGateway { hop: &'static str, reason: String },
    /// Outbound: this relay's shared state store did not respond in time, so relay A could not
    /// allocate a sequence number or store a pair safely.
    #[error("{reason}")]
    StoreUnavailable { reason: String },
}

impl RelayError {
    pub fn relay(code: RelayCode, message: impl Into<String>) -> Self {
        RelayError::Relay { code, message: message.into() }
    }

    /// Label for the relay error metric, when this is a relay-layer error.
    pub fn relay_code(&self) -> Option<RelayCode> {
        match self {
            RelayError::Relay { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<ProtocolError> for RelayError {
    fn from(error: ProtocolError) -> Self {
        RelayError::Relay { code: RelayCode::from(&error), message: error.to_string() }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: u16,
}

impl ResponseError for RelayError {
    fn status_code(&self) -> StatusCode {
        match self {
            RelayError::Unauthorized => StatusCode::UNAUTHORIZED,
            RelayError::BadHeader { .. } => StatusCode::BAD_REQUEST,
            RelayError::UpstreamNotAllowed => StatusCode::FORBIDDEN,
            RelayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RelayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RelayError::Relay { code, .. } => code.status(),
            RelayError::PeerRejected { .. }
            | RelayError::Unreachable { .. }
            | RelayError::BadGateway { .. }
            | RelayError::StoreUnavailable { .. } => StatusCode::BAD_GATEWAY,
            RelayError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            RelayError::PeerReported { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let message = self.to_string();
        HttpResponse::build(status)
            .insert_header(("cache-control", "no-store"))
            .json(ErrorBody { error: &message, code: status.as_u16() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_codes_cover_559_to_569() {
        let codes: Vec<u16> = RelayCode::ALL.iter().map(|(code, _)| *code as u16).collect();
        assert_eq!(codes, (559..=569).collect::<Vec<_>>());
        for code in codes {
            assert_eq!(RelayCode::from_status(code).map(|c| c as u16), Some(code));
        }
    }

    #[test]
    fn application_errors_use_ordinary_statuses() {
        assert_eq!(RelayError::Unauthorized.status_code(), 401);
        assert_eq!(RelayError::UpstreamNotAllowed.status_code(), 403);
        assert_eq!(RelayError::BodyTooLarge { limit: 1 }.status_code(), 413);
        assert_eq!(RelayError::Timeout { hop: "upstream", secs: 1 }.status_code(), 504);
        assert_eq!(RelayError::Unreachable { hop: "peer relay" }.status_code(), 502);
    }
}
