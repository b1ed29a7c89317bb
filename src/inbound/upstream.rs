//! The HTTP client of relay B's hop to its upstream API.
//!
//! This hop uses hyper rather than awc because awc's HTTP/1.1 response parser treats a response
//! with neither `Content-Length` nor `Transfer-Encoding` as bodiless, where HTTP/1.1 says the
//! body runs until the connection closes; with awc such a body would silently arrive empty.
//! The client pools keep-alive connections, never follows redirects, never decompresses, and
//! bounds the wait for the response head with `UPSTREAM_TIMEOUT_SECS`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::body::{BodyError, Source};
use crate::error::RelayError;

/// Seconds an idle pooled connection to the upstream API is kept: below the 5 s keep-alive of
/// common application servers (Node.js, Gunicorn), so relay B never reuses a connection the
/// upstream is about to close.
const IDLE_SECS: u64 = 4;
/// Maximum bytes of one read from an upstream connection, and so of one body chunk. Each chunk
/// waits in the sealing stream until it is cut into records. hyper would grow its read buffer
/// to about 400 KiB on large bodies, so the cap keeps relay B's memory flat.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Request body chunks buffered between the opening stream and the connection.
const BODY_CHANNEL_CHUNKS: usize = 4;

/// Body type of upstream requests.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BodyError>;

/// A pooled client for the upstream API.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>,
    timeout: Duration,
}

/// The upstream API's answer: status, headers in received order, and the body as a stream.
pub struct UpstreamResponse {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Source,
}

impl UpstreamClient {
    pub fn new(tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(rustls::ClientConfig::clone(tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(IDLE_SECS))
            .http1_max_buf_size(READ_BUFFER_BYTES)
            .build(https);
        Self { client, timeout }
    }

    /// Sends `request` and waits for the response head.
    ///
    /// # Errors
    /// 504 when no response head arrives within the timeout, 502 when the upstream cannot be
    /// reached or breaks the connection.
    pub async fn send(&self, request: http::Request<UpstreamBody>) -> Result<UpstreamResponse, RelayError> {
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => return Err(RelayError::Timeout { hop: "upstream API", secs: self.timeout.as_secs() }),
            Ok(Err(error)) => {
                tracing::debug!(%error, connect = error.is_connect(), "request to the upstream API failed");
                return Err(RelayError::Unreachable { hop: "upstream API" });
            }
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        let body =
            body.into_data_stream().map(|item| item.map_err(|error| BodyError::Transfer(error.to_string())));
        Ok(UpstreamResponse { status: parts.status, headers: parts.headers, body: body.boxed_local() })
    }
}

/// An empty request body.
pub fn empty_body() -> UpstreamBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A request body held in memory.
pub fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// A request body that streams from `source`, which lives on this worker thread: a local task
/// feeds it through a small channel to the connection. An error in `source` (a record that does
/// not open) aborts the upstream request mid-body.
pub fn streamed_body(mut source: Source) -> UpstreamBody {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, BodyError>>(BODY_CHANNEL_CHUNKS);
    actix_web::rt::spawn(async move {
        while let Some(item) = source.next().await {
            let failed = item.is_err();
            if sender.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let item = receiver.recv().await?;
        Some((item.map(Frame::data), receiver))
    });
    StreamBody::new(frames).boxed_unsync()
}
