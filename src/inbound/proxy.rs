//! Relay B's hop to its upstream API: send the opened request to `UPSTREAM` and seal the answer.

use actix_web::HttpResponse;
use actix_web::http::header;
use api_relay_protocol::EncodeType;
use api_relay_protocol::records::RecordSealer;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use crate::body::{self, SealStream, WHOLE_BODY_BYTES};
use crate::error::{RelayCode, RelayError};
use crate::headers::{self, PSEUDO_STATUS};
use crate::inbound::upstream::{self, UpstreamClient, UpstreamResponse};
use crate::inbound::{OpenedBody, OpenedRequest};
use crate::metrics::BodyDirection;
use crate::server::{RelayState, Role};

/// Sends `opened` to the upstream API and returns the sealed answer for relay A.
///
/// # Errors
/// 502 when the upstream API is unreachable, 504 when it does not answer within
/// `UPSTREAM_TIMEOUT_SECS`. Its own 4xx and 5xx answers are not errors: they travel back sealed.
pub async fn forward(
    opened: OpenedRequest,
    downstream: &actix_web::HttpRequest,
    client: &UpstreamClient,
    state: &RelayState,
) -> Result<HttpResponse, RelayError> {
    let request = build_request(&opened, state)?;
    let length = opened.headers.content_length();
    let request_bytes = state.metrics.body_bytes(Role::Inbound, BodyDirection::Request);
    let body = match opened.body {
        OpenedBody::Whole(bytes) if bytes.is_empty() && length.is_none() => upstream::empty_body(),
        OpenedBody::Whole(bytes) => {
            request_bytes.inc_by(bytes.len() as u64);
            upstream::full_body(bytes)
        }
        OpenedBody::Stream(stream) => {
            upstream::streamed_body(body::counted(Box::pin(*stream), request_bytes))
        }
    };
    let request = request
        .body(body)
        .map_err(|_| RelayError::relay(RelayCode::OpenFailed, "opened request is not valid HTTP"))?;
    let started = std::time::Instant::now();
    let response = client.send(request).await.inspect_err(|error| {
        tracing::error!(%error, "request to the upstream API failed");
    })?;
    state.metrics.upstream_duration(started.elapsed());
    crate::telemetry::note(downstream, |fields| fields.upstream_status = Some(response.status.as_u16()));
    seal_response(response, &opened.response_cipher, opened.encode_type, opened.seal_headers, state).await
}

/// The request line and headers for the upstream API: the opened headers in order (with
/// `Content-Length` when the application sent one), then `HEADERS`.
fn build_request(opened: &OpenedRequest, state: &RelayState) -> Result<http::request::Builder, RelayError> {
    let invalid = || RelayError::relay(RelayCode::OpenFailed, "opened request is not valid HTTP");
    let url = [state.upstream_base.as_str(), opened.path_and_query.as_str()].concat();
    let method = http::Method::from_bytes(opened.method.as_str().as_bytes()).map_err(|_| invalid())?;
    let mut request = http::Request::builder().method(method).uri(url);
    let headers = request.headers_mut().ok_or_else(invalid)?;
    for (name, value) in opened.headers.without_length() {
        let name = http::HeaderName::from_bytes(name.as_str().as_bytes()).map_err(|_| invalid())?;
        headers.append(name, http::HeaderValue::from_bytes(value.as_bytes()).map_err(|_| invalid())?);
    }
    if let Some(length) = opened.headers.content_length() {
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(length));
    }
    for (name, value) in &state.config.headers {
        let name = http::HeaderName::from_bytes(name.as_str().as_bytes()).map_err(|_| invalid())?;
        headers.insert(name, http::HeaderValue::from_bytes(value.as_bytes()).map_err(|_| invalid())?);
    }
    Ok(request)
}

async fn seal_response(
    response: UpstreamResponse,
    cipher: &api_relay_protocol::seal::ItemCipher,
    encode_type: EncodeType,
    seal_headers: bool,
    state: &RelayState,
) -> Result<HttpResponse, RelayError> {
    let pairs = || response.headers.iter().map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
    let fields = headers::end_to_end_pairs(pairs);
    let block =
        headers::encode_limited(PSEUDO_STATUS, response.status.as_str(), &fields, state.field_limits())
            .map_err(|reason| {
                tracing::warn!(%reason, "upstream response headers over the limit; not relayed");
                RelayError::BadGateway {
                    hop: "upstream API",
                    reason: format!("response headers too large: {reason}"),
                }
            })?;
    let block = match seal_headers {
        true => cipher.seal_headers(&block),
        false => block,
    };
    let mut answer = HttpResponse::Ok();
    answer.insert_header((headers::name::RELAY_EH.clone(), B64.encode(block)));
    answer.insert_header((header::CONTENT_TYPE, "application/octet-stream"));
    let mut sealer = RecordSealer::new(cipher.clone());
    let limit = state.config.max_body_bytes;
    let response_bytes = state.metrics.body_bytes(Role::Inbound, BodyDirection::Response);
    let source = body::counted(response.body, response_bytes);
    let length = response
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    match encode_type {
        EncodeType::Mke if length.is_some_and(|length| length <= WHOLE_BODY_BYTES) => {
            let plain = body::collect(source, WHOLE_BODY_BYTES).await?;
            Ok(answer.body(body::seal_whole(&mut sealer, &plain)?))
        }
        EncodeType::Mke => Ok(answer.streaming(SealStream::new(source, sealer, limit))),
        EncodeType::Mte => {
            let plain = body::collect(source, limit).await?;
            Ok(answer.body(body::seal_padded(&mut sealer, &plain)?))
        }
    }
}
