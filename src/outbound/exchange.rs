//! One outbound exchange on the wire: the options the application chose, sealing the request,
//! sending it to the peer, and opening the peer's answer.

use std::cell::Cell;
use std::rc::Rc;

use actix_web::body::SizedStream;
use actix_web::http::header::HeaderName;
use actix_web::http::{Method, StatusCode, header};
use actix_web::{HttpRequest, HttpResponse};
use api_relay_actors::Exchange;
use api_relay_protocol::fields::FieldLimits;
use api_relay_protocol::records::{self, RecordOpener, RecordSealer};
use api_relay_protocol::relay_header::SealFlags;
use api_relay_protocol::seal::ItemCipher;
use api_relay_protocol::{Direction, EncodeType, ExchangeContext, PROTOCOL_VERSION, RelayHeader};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use futures_util::StreamExt;

use crate::body::{self, BodyError, OpenStream, SealStream, Source, WHOLE_BODY_BYTES};
use crate::error::RelayError;
use crate::headers::{self, PSEUDO_METHOD, PSEUDO_STATUS};
use crate::metrics::BodyDirection;
use crate::outbound::peer::{PeerOrigin, send_error};
use crate::server::RelayState;

/// Maximum bytes of an error body relay A reads from the peer.
const MAX_PEER_ERROR_BYTES: usize = 4096;

/// What the application asked for with `x-mte-encode-*`.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeOptions {
    pub encode_type: EncodeType,
    pub flags: SealFlags,
}

impl ExchangeOptions {
    /// Reads `x-mte-encode-type` (`MKE` default, or `MTE`), `x-mte-encode-headers` and
    /// `x-mte-encode-url` (`true` default, or `false`).
    ///
    /// # Errors
    /// `BadHeader` for any other value.
    pub fn from_request(request: &HttpRequest) -> Result<Self, RelayError> {
        let encode_type = match header_text(request, &headers::name::ENCODE_TYPE)? {
            None => EncodeType::default(),
            Some(text) => text.parse().map_err(|_| RelayError::BadHeader {
                header: headers::ENCODE_TYPE,
                reason: "expected MKE or MTE".into(),
            })?,
        };
        let flags = SealFlags {
            url: flag(request, &headers::name::ENCODE_URL)?,
            headers: flag(request, &headers::name::ENCODE_HEADERS)?,
            body: true,
        };
        Ok(Self { encode_type, flags })
    }
}

fn header_text<'a>(
    request: &'a HttpRequest,
    name: &'static HeaderName,
) -> Result<Option<&'a str>, RelayError> {
    match request.headers().get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|text| Some(text.trim()))
            .map_err(|_| RelayError::BadHeader { header: name.as_str(), reason: "not ASCII text".into() }),
    }
}

fn flag(request: &HttpRequest, name: &'static HeaderName) -> Result<bool, RelayError> {
    match header_text(request, name)?.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => {
            Err(RelayError::BadHeader { header: name.as_str(), reason: "expected true or false".into() })
        }
    }
}

/// The parts of the application's request that get sealed, the header block already encoded.
pub struct PlainParts {
    method: Method,
    path_and_query: String,
    block: Vec<u8>,
}

/// A request sealed for one attempt, plus the cipher relay A needs to open the response.
pub struct SealedRequest {
    relay_header: String,
    path: String,
    header_block: String,
    flags: SealFlags,
    encode_type: EncodeType,
    method: Method,
    request_cipher: ItemCipher,
    response_cipher: ItemCipher,
}

impl SealedRequest {
    /// Takes the method, the exact path and query, and the end-to-end headers of `request`.
    ///
    /// # Errors
    /// `HeadersTooLarge` when the header block would pass `MAX_HEADER_COUNT` or
    /// `MAX_HEADER_BYTES`, the limits relay B opens it with when both relays share the settings.
    pub fn plain_parts(request: &HttpRequest, limits: FieldLimits) -> Result<PlainParts, RelayError> {
        let mut fields = headers::end_to_end(request.headers());
        let client_ip = request.peer_addr().map(|address| headers::ip_text(address.ip()));
        // The scheme the application used. `connection_info` takes it from `Forwarded` or
        // `X-Forwarded-Proto` first and makes five heap allocations, so it runs only when the
        // request carries one of them. Otherwise the scheme comes from the request line or from
        // the listener, in `connection_info`'s order.
        let forwarded = request.headers();
        let info;
        let scheme =
            if forwarded.contains_key(header::FORWARDED) || forwarded.contains_key("x-forwarded-proto") {
                info = request.connection_info();
                info.scheme()
            } else if let Some(scheme) = request.uri().scheme_str() {
                scheme
            } else if request.app_config().secure() {
                "https"
            } else {
                "http"
            };
        headers::add_forwarded(&mut fields, client_ip, scheme);
        let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
        let method = request.method().clone();
        let block =
            headers::encode_limited(PSEUDO_METHOD, method.as_str(), &fields, limits).map_err(|reason| {
                tracing::warn!(%reason, "request headers over the limit; not sent");
                RelayError::HeadersTooLarge { reason }
            })?;
        Ok(PlainParts { method, path_and_query, block })
    }

    /// Seals URL and header block for `exchange`.
    pub fn seal(plain: &PlainParts, exchange: &Exchange, options: &ExchangeOptions) -> Self {
        let context = ExchangeContext {
            direction: Direction::Request,
            client_id: exchange.client_id.clone(),
            pair_id: exchange.pair_id,
            seq: exchange.seq,
            encode_type: options.encode_type,
            flags: options.flags,
        };
        let key = |direction| exchange.keys.exchange(direction, options.encode_type, exchange.seq);
        let request_cipher = ItemCipher::new(key(Direction::Request), context.clone());
        let response_cipher = ItemCipher::new(key(Direction::Response), context.reversed());
        let path = match options.flags.url {
            true => {
                let sealed_url = request_cipher.seal_url(plain.path_and_query.as_bytes());
                let mut path = String::with_capacity(1 + sealed_url.len().div_ceil(3) * 4);
                path.push('/');
                B64.encode_string(sealed_url, &mut path);
                path
            }
            false => plain.path_and_query.clone(),
        };
        let block = match options.flags.headers {
            true => request_cipher.seal_headers(&plain.block),
            false => plain.block.clone(),
        };
        let relay_header = RelayHeader {
            client_id: exchange.client_id.clone(),
            pair_id: exchange.pair_id,
            encode_type: options.encode_type,
            flags: options.flags,
            seq: exchange.seq,
            version: PROTOCOL_VERSION,
        };
        Self {
            relay_header: relay_header.encode(),
            path,
            header_block: B64.encode(block),
            flags: options.flags,
            encode_type: options.encode_type,
            method: plain.method.clone(),
            request_cipher,
            response_cipher,
        }
    }
}

/// The application's request body for one attempt.
pub enum PlainBody {
    /// Held whole in memory: sealed in one step and sent with `Content-Length`.
    Whole(bytes::Bytes),
    /// Still arriving: sealed while it streams (`MKE`) or read whole first (`MTE`).
    Stream(Source),
}

/// Sends a sealed request with its body to the peer.
///
/// # Errors
/// 413 when the body passes `MAX_BODY_BYTES` while streaming, 502 or 504 when the peer cannot
/// be reached in time.
pub async fn send(
    client: &awc::Client,
    origin: &PeerOrigin,
    sealed: &SealedRequest,
    plain: PlainBody,
    options: &ExchangeOptions,
    state: &RelayState,
) -> Result<awc::ClientResponse, RelayError> {
    let limit = state.config.max_body_bytes;
    let counter = state.metrics.body_bytes(crate::server::Role::Outbound, BodyDirection::Request);
    let request = client
        .post(origin.url(&sealed.path))
        .insert_header((headers::name::RELAY.clone(), sealed.relay_header.as_str()))
        .insert_header((headers::name::RELAY_EH.clone(), sealed.header_block.as_str()))
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"));
    let mut sealer = RecordSealer::new(sealed.request_cipher.clone());
    let source = match plain {
        PlainBody::Whole(whole) => {
            counter.inc_by(whole.len() as u64);
            let sealed_body = match options.encode_type {
                EncodeType::Mke => body::seal_whole(&mut sealer, &whole)?,
                EncodeType::Mte => body::seal_padded(&mut sealer, &whole)?,
            };
            let result = request.send_body(sealed_body).await;
            return result.map_err(|error| send_error(error, "peer relay", state.config.upstream_timeout));
        }
        PlainBody::Stream(source) => body::counted(source, counter),
    };
    let result = match options.encode_type {
        EncodeType::Mke => {
            let too_large = Rc::new(Cell::new(false));
            let flag = Rc::clone(&too_large);
            let stream = SealStream::new(source, sealer, limit).inspect(move |item| {
                if matches!(item, Err(BodyError::TooLarge { .. })) {
                    flag.set(true);
                }
            });
            let result = request.send_stream(stream).await;
            if too_large.get() {
                return Err(RelayError::BodyTooLarge { limit });
            }
            result
        }
        EncodeType::Mte => {
            let plain = body::collect(source, limit).await?;
            request.send_body(body::seal_padded(&mut sealer, &plain)?).await
        }
    };
    result.map_err(|error| send_error(error, "peer relay", state.config.upstream_timeout))
}

/// Opens the peer's sealed response and turns it into the application's response.
///
/// # Errors
/// 502 when the response does not open: tampered, truncated or from the wrong keys.
pub async fn open_response<S>(
    response: awc::ClientResponse<S>,
    sealed: &SealedRequest,
    state: &RelayState,
) -> Result<HttpResponse, RelayError>
where
    S: futures_core::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>> + Unpin + 'static,
{
    let block = open_block(&response, sealed, state).map_err(|error| {
        tracing::warn!(%error, "answer from peer relay did not open");
        RelayError::BadGateway { hop: "peer relay", reason: "answer did not open".into() }
    })?;
    let status = block
        .pseudo
        .parse::<u16>()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| RelayError::BadGateway { hop: "peer relay", reason: "invalid status".into() })?;
    let length = block.content_length();
    let mut builder = HttpResponse::build(status);
    for header in block.into_without_length() {
        builder.append_header(header);
    }
    let source = body::source(response);
    let mut opener = RecordOpener::new(sealed.response_cipher.clone());
    let limit = state.config.max_body_bytes;
    let bodyless = sealed.method == Method::HEAD
        || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        || status.is_informational();
    if bodyless {
        // The sealed body is one empty final record; reading it checks the exchange ended well.
        let sealed_body = body::collect(source, 64 * 1024).await?;
        records::open_body(&mut opener, &sealed_body).map_err(BodyError::from)?;
        return Ok(match (length, status) {
            (Some(length), StatusCode::NOT_MODIFIED) => {
                builder.insert_header((header::CONTENT_LENGTH, length)).finish()
            }
            (Some(length), _) if sealed.method == Method::HEAD => builder.body(SizedStream::new(
                length,
                futures_util::stream::empty::<Result<bytes::Bytes, BodyError>>(),
            )),
            // `finish` would send `Content-Length: 0`, which for HEAD claims an empty GET body, so
            // the application gets a length only where the upstream sent one.
            _ => builder.body(actix_web::body::None::new()),
        });
    }
    let counter = state.metrics.body_bytes(crate::server::Role::Outbound, BodyDirection::Response);
    match (sealed.encode_type, length) {
        (EncodeType::Mte, _) => {
            let whole = body::open_padded(source, &mut opener, limit).await?;
            counter.inc_by(whole.len() as u64);
            Ok(builder.body(whole))
        }
        (EncodeType::Mke, Some(length)) if length <= WHOLE_BODY_BYTES => {
            let whole = body::open_whole(source, opener, length).await?;
            counter.inc_by(length);
            Ok(builder.body(whole))
        }
        (EncodeType::Mke, Some(length)) => Ok(builder.body(SizedStream::new(
            length,
            body::counted(OpenStream::new(source, opener).boxed_local(), counter),
        ))),
        (EncodeType::Mke, None) => {
            Ok(builder.streaming(body::counted(OpenStream::new(source, opener).boxed_local(), counter)))
        }
    }
}

fn open_block<S>(
    response: &awc::ClientResponse<S>,
    sealed: &SealedRequest,
    state: &RelayState,
) -> Result<headers::Block, RelayError> {
    let missing = || RelayError::BadGateway { hop: "peer relay", reason: "missing x-mte-relay-eh".into() };
    let encoded = response.headers().get(&headers::name::RELAY_EH).ok_or_else(missing)?;
    let bytes = B64.decode(encoded.as_bytes()).map_err(|_| missing())?;
    let block = match sealed.flags.headers {
        true => sealed.response_cipher.open_headers(&bytes)?,
        false => bytes,
    };
    headers::decode_block(block, PSEUDO_STATUS, state.field_limits())
}

/// Turns a non-200, non-relay status from the peer into the application's error. Relay B
/// answers 502 or 504 with a JSON error when its upstream API is unreachable or slow.
pub async fn peer_failure<S>(mut response: awc::ClientResponse<S>, status: u16) -> RelayError
where
    S: futures_core::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>>,
{
    #[derive(serde::Deserialize)]
    struct PeerError {
        error: String,
    }
    if matches!(status, 502 | 504)
        && let Ok(body) = response.json::<PeerError>().limit(MAX_PEER_ERROR_BYTES).await
    {
        return RelayError::PeerReported { status, message: format!("peer relay: {}", body.error) };
    }
    RelayError::BadGateway { hop: "peer relay", reason: format!("unexpected status {status}") }
}
