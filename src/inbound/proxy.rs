//! Relay B's hop to its upstream API: send the opened request to `UPSTREAM` and seal the answer.

use actix_web::HttpResponse;
use actix_web::body::SizedStream;
use actix_web::http::header;
use api_relay_protocol::EncodeType;
use api_relay_protocol::records::RecordSealer;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use crate::body::{self, SealStream};
use crate::error::RelayError;
use crate::headers::{self, PSEUDO_STATUS};
use crate::inbound::{OpenedBody, OpenedRequest};
use crate::outbound::peer::send_error;
use crate::server::RelayState;

/// Sends `opened` to the upstream API and returns the sealed answer for relay A.
///
/// # Errors
/// 502 when the upstream API is unreachable, 504 when it does not answer within
/// `UPSTREAM_TIMEOUT_SECS`. Its own 4xx and 5xx answers are not errors: they travel back sealed.
pub async fn forward(
    opened: OpenedRequest,
    client: &awc::Client,
    state: &RelayState,
) -> Result<HttpResponse, RelayError> {
    let url = upstream_url(&state.config.upstream, &opened.path_and_query);
    // Without `no_decompress`, awc adds `Accept-Encoding: identity` when the application sent
    // none, which would stop the upstream API from compressing.
    let mut request = client.request(opened.method.clone(), url).no_decompress();
    for (name, value) in opened.headers.without_length() {
        request = request.append_header((name.clone(), value.clone()));
    }
    for (name, value) in &state.config.headers {
        request = request.insert_header((name.clone(), value.clone()));
    }
    let length = opened.headers.content_length();
    let started = std::time::Instant::now();
    let sent = match opened.body {
        OpenedBody::Whole(bytes) if bytes.is_empty() && length.is_none() => request.send().await,
        OpenedBody::Whole(bytes) => request.send_body(bytes).await,
        OpenedBody::Stream { empty: true, .. } if length.is_none() => request.send().await,
        OpenedBody::Stream { stream, .. } => match length {
            Some(length) => request.send_body(SizedStream::new(length, stream)).await,
            None => request.send_stream(stream).await,
        },
    };
    let response = sent.map_err(|error| {
        let error = send_error(error, "upstream API", state.config.upstream_timeout);
        tracing::error!(%error, "request to the upstream API failed");
        error
    })?;
    state.metrics.upstream_duration(started.elapsed());
    seal_response(response, &opened.response_cipher, opened.encode_type, opened.seal_headers, state).await
}

/// `UPSTREAM` (with its path prefix) joined with the exact path and query relay A sent.
fn upstream_url(upstream: &url::Url, path_and_query: &str) -> String {
    let origin = upstream.origin().ascii_serialization();
    let prefix = upstream.path().trim_end_matches('/');
    format!("{origin}{prefix}{path_and_query}")
}

async fn seal_response<S>(
    response: awc::ClientResponse<S>,
    cipher: &api_relay_protocol::seal::ItemCipher,
    encode_type: EncodeType,
    seal_headers: bool,
    state: &RelayState,
) -> Result<HttpResponse, RelayError>
where
    S: futures_core::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>> + Unpin + 'static,
{
    let fields = headers::end_to_end(response.headers());
    let block = headers::encode_block(PSEUDO_STATUS, response.status().as_str(), &fields);
    let block = match seal_headers {
        true => cipher.seal_headers(&block),
        false => block,
    };
    let mut answer = HttpResponse::Ok();
    answer.insert_header((headers::RELAY_EH, B64.encode(block)));
    answer.insert_header((header::CONTENT_TYPE, "application/octet-stream"));
    let source = body::source(response);
    let mut sealer = RecordSealer::new(cipher.clone());
    let limit = state.config.max_body_bytes;
    match encode_type {
        EncodeType::Mke => Ok(answer.streaming(SealStream::new(source, sealer, limit))),
        EncodeType::Mte => {
            let plain = body::collect(source, limit).await?;
            Ok(answer.body(body::seal_padded(&mut sealer, &plain)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_prefix_joins_exact_path() {
        let upstream = url::Url::parse("http://api.internal:3000/v1/").unwrap();
        assert_eq!(
            upstream_url(&upstream, "/items?a=%2F&a=2;x"),
            "http://api.internal:3000/v1/items?a=%2F&a=2;x"
        );
        let upstream = url::Url::parse("https://api.example.com").unwrap();
        assert_eq!(upstream_url(&upstream, "/"), "https://api.example.com/");
    }
}
