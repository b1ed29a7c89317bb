//! The outbound role (relay A): a request carrying `x-mte-outbound-token` is sealed and sent to
//! the peer relay named by `x-mte-upstream`, and the peer's sealed answer is opened and returned.
//!
//! Steps: check the token (401), the peer origin (400) and the allow-list (403), read the
//! options, take a pair from the pool, allocate `seq`, seal URL, header block and body, send,
//! then open the answer. When the peer lost the pair (560), the pair expired (567) or the client
//! id is no longer valid (566), relay A pairs again and retries once, provided it still holds the
//! whole body (up to `RETRY_BUFFER_BYTES`).

pub mod exchange;
pub mod peer;
pub mod pool;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use api_relay_actors::SessionError;
use bytes::Bytes;
use futures_util::StreamExt;
use subtle::ConstantTimeEq;

use crate::body::{self, BodyError, Source};
use crate::error::{RelayCode, RelayError};
use crate::headers;
use crate::server::{RelayState, Role};
use crate::telemetry;
use exchange::{ExchangeOptions, PlainBody, SealedRequest};
use peer::PeerOrigin;

/// Handles one outbound request.
///
/// # Errors
/// `RelayError` for every failure; its status is what the application sees.
pub async fn handle(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<RelayState>,
    clients: web::Data<crate::client::HopClients>,
) -> Result<HttpResponse, RelayError> {
    state.metrics.role(&request, Role::Outbound);
    telemetry::relayed(&request);
    authorize(&request, &state)?;
    let origin = peer_origin(&request).inspect_err(log_rejected)?;
    telemetry::note(&request, |fields| fields.peer = Some(origin.as_str().to_owned()));
    if !origin.is_allowed(&state.config) {
        tracing::warn!(peer = %origin, "x-mte-upstream rejected by OUTBOUND_ALLOWLIST");
        return Err(RelayError::UpstreamNotAllowed);
    }
    let options = ExchangeOptions::from_request(&request).inspect_err(log_rejected)?;
    let limit = state.config.max_body_bytes;
    if declared_length(&request).is_some_and(|length| length > limit) {
        let error = RelayError::BodyTooLarge { limit };
        log_rejected(&error);
        return Err(error);
    }
    let plain = SealedRequest::plain_parts(&request, state.field_limits())?;
    let mut body = OutboundBody::read(payload, &options, &state).await.inspect_err(log_rejected)?;
    relay_exchange(&request, &plain, &origin, &options, &mut body, &state, &clients)
        .await
        .map_err(application_error)
}

/// Logs a request rejected for what the application sent: an invalid `x-mte-*` header or a body
/// over `MAX_BODY_BYTES`. Other errors log where they happen.
fn log_rejected(error: &RelayError) {
    if matches!(error, RelayError::BadHeader { .. } | RelayError::BodyTooLarge { .. }) {
        tracing::warn!(%error, "outbound request rejected");
    }
}

/// Most pairs one request takes from the pool: a pair that expired locally is replaced without
/// using up the one retry, but a pool that keeps handing out dead pairs ends the request.
const MAX_PAIR_ATTEMPTS: usize = 4;

async fn relay_exchange(
    request: &HttpRequest,
    plain: &exchange::PlainParts,
    origin: &PeerOrigin,
    options: &ExchangeOptions,
    body: &mut OutboundBody,
    state: &RelayState,
    clients: &crate::client::HopClients,
) -> Result<HttpResponse, RelayError> {
    let mut sent = 0;
    for _ in 0..MAX_PAIR_ATTEMPTS {
        let lease = state.pool.acquire(origin, &clients.peer, &state.metrics).await?;
        let exchange = match lease.session.allocate_seq().await {
            Ok(Ok(exchange)) => exchange,
            Ok(Err(SessionError::Expired)) | Ok(Err(SessionError::Replay(_))) | Err(_) => {
                state.pool.discard(origin, &lease, false);
                continue;
            }
            Ok(Err(SessionError::Store(reason))) => {
                tracing::error!(peer = %origin, pair = %lease.session.pair_id.short(), %reason, "could not allocate a sequence number");
                return Err(RelayError::StoreUnavailable { reason });
            }
        };
        let sealed = SealedRequest::seal(plain, &exchange, options);
        telemetry::note(request, |fields| fields.pair = Some(exchange.pair_id.short()));
        tracing::debug!(pair = %exchange.pair_id.short(), seq = exchange.seq, encode_type = options.encode_type.as_str(), "outbound exchange sealed");
        let Some(plain_body) = body.attempt(sent) else { break };
        sent += 1;
        let response = send_with_resends(origin, &sealed, plain_body, options, body, state, clients).await?;
        let status = response.status().as_u16();
        let retryable = body.is_replayable() && sent == 1;
        match RelayCode::from_status(status) {
            None if status == 200 => {
                let response = exchange::open_response(response, &sealed, state).await?;
                let upstream_status = response.status().as_u16();
                telemetry::note(request, |fields| fields.upstream_status = Some(upstream_status));
                tracing::debug!(pair = %exchange.pair_id.short(), seq = exchange.seq, upstream_status, "outbound exchange opened");
                return Ok(response);
            }
            None => return Err(exchange::peer_failure(response, status).await),
            Some(code @ (RelayCode::StateNotFound | RelayCode::PairExpired | RelayCode::InvalidClientId)) => {
                state.metrics.relay_error(code);
                state.metrics.repair(code);
                state.pool.discard(origin, &lease, code == RelayCode::InvalidClientId);
                if !retryable {
                    return Err(RelayError::PeerRejected { stage: "exchange", status });
                }
                tracing::warn!(peer = %origin, status, reason = code.name(), "peer relay rejected the pair; pairing again and retrying once");
                state.metrics.retry(code);
            }
            Some(code) => {
                state.metrics.relay_error(code);
                tracing::warn!(peer = %origin, status, reason = code.name(), "peer relay rejected the exchange");
                return Err(RelayError::PeerRejected { stage: "exchange", status });
            }
        }
    }
    Err(RelayError::BadGateway { hop: "peer relay", reason: "no usable pair after pairing again".into() })
}

/// Sends one sealed exchange and, while the peer is unreachable and the body is held, sends the
/// same bytes again on another connection.
///
/// Resending is safe because it repeats the same `seq`: relay B's replay window accepts each
/// `seq` once, so a copy that already reached relay B gets 563 instead of reaching the upstream
/// a second time. The copy is byte for byte the same (same keys, nonces, records and zero
/// padding), so it reveals nothing the first copy did not.
async fn send_with_resends(
    origin: &PeerOrigin,
    sealed: &SealedRequest,
    first: PlainBody,
    options: &ExchangeOptions,
    body: &mut OutboundBody,
    state: &RelayState,
    clients: &crate::client::HopClients,
) -> Result<awc::ClientResponse, RelayError> {
    let send = |plain| exchange::send(&clients.peer, origin, sealed, plain, options, state);
    peer::resend_while_unreachable(origin, "exchange", send(first), |_| {
        if !body.is_replayable() {
            return None;
        }
        body.attempt(0).map(send)
    })
    .await
}

/// The application never sees a relay status (559-569): a relay-layer failure on the hop, such
/// as an answer that does not open, reaches it as 502.
fn application_error(error: RelayError) -> RelayError {
    match error {
        RelayError::Relay { code, message } => {
            tracing::warn!(reason = code.name(), %message, "exchange with the peer relay failed");
            RelayError::PeerRejected { stage: "exchange", status: code as u16 }
        }
        other => other,
    }
}

fn authorize(request: &HttpRequest, state: &RelayState) -> Result<(), RelayError> {
    let expected = state.config.outbound_token.expose().as_bytes();
    let presented = request
        .headers()
        .get(&headers::name::OUTBOUND_TOKEN)
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    if bool::from(presented.ct_eq(expected)) {
        return Ok(());
    }
    tracing::warn!("outbound request with an invalid or missing x-mte-outbound-token");
    Err(RelayError::Unauthorized)
}

fn peer_origin(request: &HttpRequest) -> Result<PeerOrigin, RelayError> {
    let value = request.headers().get(&headers::name::UPSTREAM).ok_or(RelayError::BadHeader {
        header: "x-mte-upstream",
        reason: "missing; set it to the peer relay's URL".into(),
    })?;
    let text = value
        .to_str()
        .map_err(|_| RelayError::BadHeader { header: "x-mte-upstream", reason: "not ASCII text".into() })?;
    PARSED_ORIGINS.with_borrow_mut(|parsed| {
        if let Some(origin) = parsed.get(text) {
            return Ok(origin.clone());
        }
        let origin = PeerOrigin::parse(text)?;
        if parsed.len() >= MAX_PARSED_ORIGINS {
            parsed.clear();
        }
        parsed.insert(text.into(), origin.clone());
        Ok(origin)
    })
}

/// Maximum number of `x-mte-upstream` values a worker keeps parsed. A full cache is cleared.
const MAX_PARSED_ORIGINS: usize = 64;

thread_local! {
    /// The worker's parsed `x-mte-upstream` values. An application names the same few peers in
    /// every request, and parsing and checking the URL each time was about 3 % of relay A's CPU.
    static PARSED_ORIGINS: std::cell::RefCell<std::collections::HashMap<Box<str>, PeerOrigin>> =
        std::cell::RefCell::default();
}

fn declared_length(request: &HttpRequest) -> Option<u64> {
    request.headers().get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The application's body as relay A holds it.
enum OutboundBody {
    /// Read whole: small enough to keep for a retry, or an `MTE` body.
    Buffered(Bytes),
    /// Larger than the retry buffer: streamed once, the chunks already read first.
    Streaming(Option<Source>),
}

impl OutboundBody {
    async fn read(
        payload: web::Payload,
        options: &ExchangeOptions,
        state: &RelayState,
    ) -> Result<Self, RelayError> {
        let limit = state.config.max_body_bytes;
        let mut source = body::source::<_, BodyError>(payload.map(|item| item.map_err(BodyError::from)));
        if options.encode_type == api_relay_protocol::EncodeType::Mte {
            return Ok(OutboundBody::Buffered(body::collect(source, limit).await?));
        }
        let keep = state.config.retry_buffer_bytes as u64;
        let mut chunks = Vec::new();
        let mut held = 0u64;
        while let Some(chunk) = source.next().await {
            let chunk = chunk?;
            held += chunk.len() as u64;
            if held > limit {
                return Err(RelayError::BodyTooLarge { limit });
            }
            chunks.push(chunk);
            if held > keep {
                return Ok(OutboundBody::Streaming(Some(body::prepend(chunks, source))));
            }
        }
        Ok(OutboundBody::Buffered(body::join(chunks)))
    }

    fn is_replayable(&self) -> bool {
        matches!(self, OutboundBody::Buffered(_))
    }

    /// The body for one attempt; a streamed body has only one.
    fn attempt(&mut self, attempt: usize) -> Option<PlainBody> {
        match self {
            OutboundBody::Buffered(bytes) => Some(PlainBody::Whole(bytes.clone())),
            OutboundBody::Streaming(source) if attempt == 0 => source.take().map(PlainBody::Stream),
            OutboundBody::Streaming(_) => None,
        }
    }
}
