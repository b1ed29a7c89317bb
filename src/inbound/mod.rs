//! The inbound role (relay B): a request carrying `x-mte-relay` is checked, opened, proxied to
//! `UPSTREAM`, and the answer is sealed back.
//!
//! Order matters: the client id, the pair, the URL, the header block and the first body record
//! are all verified, and only then is `seq` accepted against the replay window, so a replayed or
//! tampered exchange never reaches the upstream API, and garbage cannot burn sequence numbers.
//! A body of more than one record streams to the upstream as it opens; a record that fails
//! later aborts the upstream request mid-body, so the upstream never sees a complete request.

pub mod limits;
pub mod pairing;
mod proxy;
pub mod upstream;

use actix_web::{HttpRequest, HttpResponse, web};
use api_relay_actors::{SessionError, SessionHandle};
use api_relay_protocol::records::RecordOpener;
use api_relay_protocol::seal::ItemCipher;
use api_relay_protocol::{Direction, EncodeType, ExchangeContext, RelayHeader};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use futures_util::StreamExt;

use crate::body::{self, BodyError, OpenStream, Source};
use crate::error::{RelayCode, RelayError};
use crate::headers::{self, PSEUDO_METHOD};
use crate::metrics::StoreOperation;
use crate::server::{RelayState, Role};

/// The opened request, ready for the upstream API.
pub struct OpenedRequest {
    pub method: actix_web::http::Method,
    pub path_and_query: String,
    pub headers: headers::Block,
    pub body: OpenedBody,
    pub response_cipher: ItemCipher,
    pub encode_type: EncodeType,
    pub seal_headers: bool,
}

/// The request body after the checks: whole for `MTE` and for an `MKE` body that ended in its
/// first record, else streaming. The stream is boxed because it contains the cipher state,
/// which is large.
pub enum OpenedBody {
    Stream(Box<OpenStream>),
    Whole(bytes::Bytes),
}

/// Handles one inbound request.
///
/// # Errors
/// `RelayError`: a 559-569 relay error before the upstream is contacted, or 502/504 when the
/// upstream API cannot be reached in time.
pub async fn handle(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<RelayState>,
    clients: web::Data<crate::client::HopClients>,
) -> Result<HttpResponse, RelayError> {
    state.metrics.role(&request, Role::Inbound);
    crate::telemetry::relayed(&request);
    let source = body::source::<_, BodyError>(payload.map(|item| item.map_err(BodyError::from)));
    let opened = match open(&request, source, &state).await {
        Ok(opened) => opened,
        Err(error) => {
            if let Some(code) = error.relay_code() {
                state.metrics.rejected(code);
            }
            tracing::warn!(%error, status = error_status(&error), "inbound exchange rejected");
            return Err(error);
        }
    };
    proxy::forward(opened, &request, &clients.upstream, &state).await
}

/// Returns `UPSTREAM`'s origin and path prefix without a trailing slash: relay B appends the
/// exact path and query relay A sent.
pub fn upstream_base(upstream: &url::Url) -> String {
    let origin = upstream.origin().ascii_serialization();
    let prefix = upstream.path().trim_end_matches('/');
    format!("{origin}{prefix}")
}

fn error_status(error: &RelayError) -> u16 {
    actix_web::ResponseError::status_code(error).as_u16()
}

async fn open(
    request: &HttpRequest,
    source: Source,
    state: &RelayState,
) -> Result<OpenedRequest, RelayError> {
    let value = request
        .headers()
        .get(&headers::name::RELAY)
        .ok_or_else(|| RelayError::relay(RelayCode::MissingRelayHeader, "missing x-mte-relay header"))?;
    let relay = RelayHeader::parse(value.as_bytes())?;
    crate::telemetry::note(request, |fields| {
        fields.pair = Some(relay.pair_id.short());
        fields.peer = request.peer_addr().map(|address| headers::ip_text(address.ip()));
    });
    state.signer.verify(&relay.client_id)?;
    let session = find_session(&relay, state).await?;
    let context = ExchangeContext {
        direction: Direction::Request,
        client_id: relay.client_id.clone(),
        pair_id: relay.pair_id,
        seq: relay.seq,
        encode_type: relay.encode_type,
        flags: relay.flags,
    };
    let key = |direction| session.keys.exchange(direction, relay.encode_type, relay.seq);
    let request_cipher = ItemCipher::new(key(Direction::Request), context.clone());
    let response_cipher = ItemCipher::new(key(Direction::Response), context.reversed());

    let path_and_query = open_url(request, &relay, &request_cipher)?;
    let headers = open_headers(request, &relay, &request_cipher, state)?;
    let method = actix_web::http::Method::from_bytes(headers.pseudo.as_bytes())
        .map_err(|_| RelayError::relay(RelayCode::OpenFailed, "invalid method in header block"))?;
    let opener = RecordOpener::new(request_cipher);
    let body = open_body(source, opener, relay.encode_type, state).await?;

    accept(&session, relay.seq).await?;
    tracing::debug!(pair = %relay.pair_id.short(), seq = relay.seq, encode_type = relay.encode_type.as_str(), "inbound exchange accepted");
    Ok(OpenedRequest {
        method,
        path_and_query,
        headers,
        body,
        response_cipher,
        encode_type: relay.encode_type,
        seal_headers: relay.flags.headers,
    })
}

async fn find_session(relay: &RelayHeader, state: &RelayState) -> Result<SessionHandle, RelayError> {
    let found = state.registry.find(&relay.pair_id).await;
    state.metrics.store_operation(StoreOperation::FindPair, found.is_ok());
    let found = found.map_err(|error| {
        tracing::error!(%error, "state store lookup failed");
        RelayError::relay(RelayCode::StoreUnavailable, "state store unavailable")
    })?;
    match found {
        Some(session) if session.client_id == relay.client_id => Ok(session),
        _ => Err(RelayError::relay(RelayCode::StateNotFound, "pair not found; pair again")),
    }
}

fn open_url(request: &HttpRequest, relay: &RelayHeader, cipher: &ItemCipher) -> Result<String, RelayError> {
    if !relay.flags.url {
        return Ok(request.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned());
    }
    let invalid = || RelayError::relay(RelayCode::OpenFailed, "sealed url is not valid base64url");
    let sealed = B64.decode(request.uri().path().trim_start_matches('/')).map_err(|_| invalid())?;
    let url = cipher.open_url(&sealed)?;
    let url =
        String::from_utf8(url).map_err(|_| RelayError::relay(RelayCode::OpenFailed, "url is not text"))?;
    if !url.starts_with('/') || url.parse::<actix_web::http::Uri>().is_err() {
        return Err(RelayError::relay(RelayCode::OpenFailed, "url is not a path and query"));
    }
    Ok(url)
}

fn open_headers(
    request: &HttpRequest,
    relay: &RelayHeader,
    cipher: &ItemCipher,
    state: &RelayState,
) -> Result<headers::Block, RelayError> {
    let invalid = || RelayError::relay(RelayCode::OpenFailed, "missing or invalid x-mte-relay-eh header");
    let encoded = request.headers().get(&headers::name::RELAY_EH).ok_or_else(invalid)?;
    let bytes = B64.decode(encoded.as_bytes()).map_err(|_| invalid())?;
    let block = match relay.flags.headers {
        true => cipher.open_headers(&bytes)?,
        false => bytes,
    };
    headers::decode_block(block, PSEUDO_METHOD, state.field_limits())
}

async fn open_body(
    source: Source,
    opener: RecordOpener,
    encode_type: EncodeType,
    state: &RelayState,
) -> Result<OpenedBody, RelayError> {
    let relay_error = |error: BodyError| {
        let code = body::request_body_code(&error);
        RelayError::relay(code, error.to_string())
    };
    match encode_type {
        EncodeType::Mte => {
            let mut opener = opener;
            let whole = body::open_padded(source, &mut opener, state.config.max_body_bytes).await;
            Ok(OpenedBody::Whole(whole.map_err(relay_error)?))
        }
        EncodeType::Mke => {
            let mut stream = OpenStream::new(source, opener);
            stream.open_first().await.map_err(relay_error)?;
            // A body that ended in its first record goes to the upstream whole.
            if let Some(whole) = stream.whole() {
                return Ok(OpenedBody::Whole(whole));
            }
            Ok(OpenedBody::Stream(Box::new(stream)))
        }
    }
}

async fn accept(session: &SessionHandle, seq: u64) -> Result<(), RelayError> {
    match session.accept_seq(seq).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(SessionError::Replay(error))) => Err(error.into()),
        Ok(Err(SessionError::Expired)) => {
            Err(RelayError::relay(RelayCode::PairExpired, "pair expired; pair again"))
        }
        // The seq stays unmarked and the upstream has not seen the exchange, so the replay
        // window still accepts a later copy of it once.
        Ok(Err(SessionError::Store(reason))) => {
            tracing::error!(pair = %session.pair_id.short(), seq, %reason, "replay check in the state store failed");
            Err(RelayError::relay(RelayCode::StoreUnavailable, "state store unavailable"))
        }
        Err(_) => Err(RelayError::relay(RelayCode::StateNotFound, "pair not found; pair again")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_prefix_joins_exact_path() {
        let upstream = url::Url::parse("http://api.internal:3000/v1/").unwrap();
        assert_eq!(
            format!("{}{}", upstream_base(&upstream), "/items?a=%2F&a=2;x"),
            "http://api.internal:3000/v1/items?a=%2F&a=2;x"
        );
        let upstream = url::Url::parse("https://api.example.com").unwrap();
        assert_eq!(format!("{}{}", upstream_base(&upstream), "/"), "https://api.example.com/");
    }
}
