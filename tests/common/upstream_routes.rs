//! Responses of the test upstream, chosen by path prefix of the request target, and the
//! code that writes them.
//!
//! Routes, matched by prefix of the path (the target up to `?`), first match wins:
//!
//! | Prefix        | Response |
//! |---------------|----------|
//! | `/echo`       | 200 `application/json` [`echo_json`] of the request. Every `x-test-echo` request field is copied into the response. |
//! | `/cookies`    | 200 with `Set-Cookie` fields `a=1`, `b=2`, `c=3` in that order, `x-binary` = [`BINARY_HEADER_VALUE`] (obs-text bytes 0x80 0xff), body `ok`. |
//! | `/status/NNN` | Status NNN (200 to 599). 204 and 304 have no body, 304 carries `ETag: "v1"`, 302 carries `Location: /elsewhere`. Others have the text body `status NNN`. |
//! | `/head`       | 200, `Content-Length: 1234`, `ETag: "h1"`. GET gets the first 1234 pattern bytes, HEAD gets no body. |
//! | `/gzip`       | 200, `Content-Encoding: gzip`, body [`GZIP_BODY`] with its `Content-Length`. |
//! | `/close`      | 200, `Connection: close`, no length and no chunking, body `closed-body`, then the connection closes. |
//! | `/slow?ms=N`  | Waits N ms (at most 120 000) after reading the request, then 200 `slow`. |
//! | `/big?bytes=N`| 200, chunked body of the first N pattern bytes (see `pattern_byte`), generated piece by piece. |
//! | `/sink`       | Reads the body without storing it and records only its length and SHA-256. 200 JSON `{"body_len":N,"body_sha256":"hex"}`. |
//! | anything else | Same as `/echo`. |
//!
//! Invalid route parameters get 400 with a text body that names the problem.

use std::io;
use std::time::Duration;

use serde_json::json;

use super::http1::{self, Connection, HeaderFields, RequestHead};
use super::upstream::RecordedRequest;
use super::{fill_pattern, pattern_bytes};

/// Value of the `x-binary` response field of `/cookies`. It contains the obs-text bytes 0x80
/// and 0xff, which are valid in a field value but not UTF-8.
pub const BINARY_HEADER_VALUE: &[u8] = b"bin-\x80\xff-end";

/// Body of `/gzip`: the gzip encoding of
/// `"gzip-body: the relay must pass these bytes through undecoded\n"`.
pub const GZIP_BODY: &[u8] = &[
    0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0x4b, 0xaf, 0xca, 0x2c, 0xd0, 0x4d, 0xca,
    0x4f, 0xa9, 0xb4, 0x52, 0x28, 0xc9, 0x48, 0x55, 0x28, 0x4a, 0xcd, 0x49, 0xac, 0x54, 0xc8, 0x2d, 0x2d,
    0x2e, 0x51, 0x28, 0x48, 0x2c, 0x2e, 0x06, 0x89, 0x15, 0xa7, 0x2a, 0x24, 0x55, 0x96, 0xa4, 0x82, 0xd8,
    0x45, 0xf9, 0xa5, 0xe9, 0x19, 0x0a, 0xa5, 0x79, 0x29, 0xa9, 0xc9, 0xf9, 0x29, 0xa9, 0x29, 0x5c, 0x00,
    0xb5, 0xe3, 0x2f, 0x03, 0x3d, 0x00, 0x00, 0x00,
];

/// Body of `/close`.
pub const CLOSE_BODY: &[u8] = b"closed-body";

/// Value of the `Content-Length` field of `/head`.
pub const HEAD_CONTENT_LENGTH: usize = 1234;

/// Maximum delay accepted by `/slow`, so that a typo cannot stall a test for hours.
const MAX_SLOW_MS: u64 = 120_000;
/// Size of each chunk that `/big` writes.
const BIG_CHUNK_BYTES: usize = 64 * 1024;

pub(super) enum Route {
    Echo,
    Cookies,
    Status(u16),
    Head,
    Gzip,
    Close,
    Slow(u64),
    Big(u64),
    Sink,
    Invalid(String),
}

impl Route {
    pub(super) fn parse(head: &RequestHead) -> Route {
        let path = head.path();
        if path.starts_with(b"/echo") {
            Route::Echo
        } else if path.starts_with(b"/cookies") {
            Route::Cookies
        } else if let Some(code) = path.strip_prefix(b"/status/") {
            parse_status(code)
        } else if path.starts_with(b"/head") {
            Route::Head
        } else if path.starts_with(b"/gzip") {
            Route::Gzip
        } else if path.starts_with(b"/close") {
            Route::Close
        } else if path.starts_with(b"/slow") {
            numeric_param(head, "ms").map_or_else(Route::Invalid, |ms| Route::Slow(ms.min(MAX_SLOW_MS)))
        } else if path.starts_with(b"/big") {
            numeric_param(head, "bytes").map_or_else(Route::Invalid, Route::Big)
        } else if path.starts_with(b"/sink") {
            Route::Sink
        } else {
            Route::Echo
        }
    }

    /// Returns whether the recorded request keeps its body. `/sink` keeps only the length
    /// and hash.
    pub(super) fn stores_body(&self) -> bool {
        !matches!(self, Route::Sink)
    }

    pub(super) async fn respond(&self, head: &RequestHead, request: &RecordedRequest) -> Reply {
        match self {
            Route::Echo => echo_reply(head, request),
            Route::Cookies => cookies_reply(),
            Route::Status(status) => status_reply(*status),
            Route::Head => Reply::bytes(200, "application/octet-stream", pattern_bytes(HEAD_CONTENT_LENGTH))
                .header("etag", b"\"h1\""),
            Route::Gzip => {
                Reply::bytes(200, "text/plain", GZIP_BODY.to_vec()).header("content-encoding", b"gzip")
            }
            Route::Close => Reply::text(200, "").with_body(Body::CloseDelimited(CLOSE_BODY.to_vec())),
            Route::Slow(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                Reply::text(200, "slow")
            }
            Route::Big(len) => Reply::text(200, "")
                .with_content_type("application/octet-stream")
                .with_body(Body::ChunkedPattern(*len)),
            Route::Sink => Reply::json(&json!({
                "body_len": request.body_len,
                "body_sha256": request.body_sha256,
            })),
            Route::Invalid(message) => Reply::text(400, format!("{message}\n")),
        }
    }
}

fn parse_status(code: &[u8]) -> Route {
    let status = std::str::from_utf8(code).ok().and_then(|text| text.parse::<u16>().ok());
    match status {
        Some(status) if (200..=599).contains(&status) => Route::Status(status),
        _ => Route::Invalid(format!(
            "invalid status {:?} in /status/NNN, expected 200 to 599",
            String::from_utf8_lossy(code)
        )),
    }
}

fn numeric_param(head: &RequestHead, key: &str) -> Result<u64, String> {
    let value = head.query_param(key).ok_or_else(|| format!("missing query parameter {key}"))?;
    value.parse().map_err(|_| format!("invalid query parameter {key}={value:?}, expected an integer"))
}

/// Returns the `/echo` body: method, target, header fields as `[name, lossy value]` pairs,
/// body length and body SHA-256 hex.
pub fn echo_json(request: &RecordedRequest) -> serde_json::Value {
    let headers: Vec<[String; 2]> = request
        .headers
        .iter()
        .map(|(name, value)| [name.clone(), String::from_utf8_lossy(value).into_owned()])
        .collect();
    json!({
        "method": request.method,
        "target": request.target_str(),
        "headers": headers,
        "body_len": request.body_len,
        "body_sha256": request.body_sha256,
    })
}

fn echo_reply(head: &RequestHead, request: &RecordedRequest) -> Reply {
    let mut reply = Reply::json(&echo_json(request));
    for value in head.header_values("x-test-echo") {
        reply = reply.header("x-test-echo", value);
    }
    reply
}

fn cookies_reply() -> Reply {
    Reply::text(200, "ok")
        .header("set-cookie", b"a=1")
        .header("set-cookie", b"b=2")
        .header("set-cookie", b"c=3")
        .header("x-binary", BINARY_HEADER_VALUE)
}

fn status_reply(status: u16) -> Reply {
    match status {
        204 => Reply::empty(204),
        304 => Reply::empty(304).header("etag", b"\"v1\""),
        302 => Reply::text(302, "status 302").header("location", b"/elsewhere"),
        _ => Reply::text(status, format!("status {status}")),
    }
}

enum Body {
    /// No body and no length field, as for 204 and 304.
    None,
    /// Body with a `Content-Length` field.
    Fixed(Vec<u8>),
    /// Body that ends when the server closes the connection.
    CloseDelimited(Vec<u8>),
    /// The first N pattern bytes, sent chunked.
    ChunkedPattern(u64),
}

pub(super) struct Reply {
    status: u16,
    headers: HeaderFields,
    body: Body,
}

impl Reply {
    fn empty(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: Body::None }
    }

    fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        Reply::empty(status).with_content_type(content_type).with_body(Body::Fixed(body))
    }

    pub(super) fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply::bytes(status, "text/plain", body.into().into_bytes())
    }

    fn json(value: &serde_json::Value) -> Reply {
        Reply::bytes(200, "application/json", value.to_string().into_bytes())
    }

    fn header(mut self, name: &str, value: &[u8]) -> Reply {
        self.headers.push((name.to_owned(), value.to_vec()));
        self
    }

    fn with_content_type(mut self, content_type: &str) -> Reply {
        self.headers.retain(|(name, _)| name != "content-type");
        self.header("content-type", content_type.as_bytes())
    }

    fn with_body(mut self, body: Body) -> Reply {
        self.body = body;
        self
    }

    pub(super) fn closes_connection(&self) -> bool {
        matches!(self.body, Body::CloseDelimited(_))
    }
}

/// Writes the head and, unless `is_head_request`, the body of `reply`. Framing fields
/// (`content-length`, `transfer-encoding`, `connection`) are added here.
pub(super) async fn write_reply(
    connection: &mut Connection,
    reply: Reply,
    is_head_request: bool,
    keep_alive: bool,
) -> io::Result<()> {
    let mut headers = reply.headers;
    match &reply.body {
        Body::None | Body::CloseDelimited(_) => {}
        Body::Fixed(bytes) => headers.push(("content-length".into(), bytes.len().to_string().into())),
        Body::ChunkedPattern(_) => headers.push(("transfer-encoding".into(), b"chunked".to_vec())),
    }
    if !keep_alive {
        headers.push(("connection".into(), b"close".to_vec()));
    }
    connection.write_all(&http1::encode_response_head(reply.status, &headers)).await?;
    if is_head_request {
        return Ok(());
    }
    match reply.body {
        Body::None => Ok(()),
        Body::Fixed(bytes) | Body::CloseDelimited(bytes) => connection.write_all(&bytes).await,
        Body::ChunkedPattern(len) => write_pattern_chunks(connection, len).await,
    }
}

async fn write_pattern_chunks(connection: &mut Connection, len: u64) -> io::Result<()> {
    let mut piece = vec![0u8; BIG_CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < len {
        let size = piece.len().min((len - offset) as usize);
        fill_pattern(offset, &mut piece[..size]);
        connection.write_chunk(&piece[..size]).await?;
        offset += size as u64;
    }
    connection.finish_chunks().await
}
