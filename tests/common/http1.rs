//! HTTP/1.1 wire code for the test upstream: reading request heads and bodies from a TCP
//! stream and encoding response heads, with every byte kept exactly as sent.
//!
//! It accepts only CRLF line endings, rejects obsolete line folding and whitespace before a
//! header colon (RFC 9112, section 5), and decodes chunked bodies including trailers.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Maximum size of a request line plus headers.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Maximum size of one chunk-size line or trailer line.
const MAX_LINE_BYTES: usize = 8 * 1024;
/// Size of each read from the socket.
const READ_SIZE: usize = 16 * 1024;

/// Header fields in the order sent, as (name with its original case, value bytes) pairs.
pub type HeaderFields = Vec<(String, Vec<u8>)>;

/// Request line and header fields of one request.
#[derive(Clone, Debug)]
pub struct RequestHead {
    pub method: String,
    /// Request target exactly as sent, for example `/echo?a=%20b`.
    pub target: Vec<u8>,
    /// Protocol version as sent, for example `HTTP/1.1`.
    pub version: String,
    /// Header fields in the order sent, names with their original case, values without the
    /// surrounding whitespace.
    pub headers: HeaderFields,
}

/// How the length of a request body is determined (RFC 9112, section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    Empty,
    ContentLength(u64),
    Chunked,
}

impl RequestHead {
    /// Returns the values of every header field named `name` (ASCII case-insensitive), in
    /// the order sent.
    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        header_values(&self.headers, name)
    }

    /// Returns whether the comma-separated list in header `name` contains `token`, ignoring
    /// ASCII case, across all fields with that name.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name)
            .iter()
            .flat_map(|value| value.split(|byte| *byte == b','))
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    /// Returns the target up to the first `?`.
    pub fn path(&self) -> &[u8] {
        match self.target.iter().position(|byte| *byte == b'?') {
            Some(end) => &self.target[..end],
            None => &self.target,
        }
    }

    /// Returns the raw value of query parameter `key`, without percent-decoding.
    pub fn query_param(&self, key: &str) -> Option<String> {
        let query_start = self.target.iter().position(|byte| *byte == b'?')? + 1;
        let query = String::from_utf8_lossy(&self.target[query_start..]);
        query.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (name == key).then(|| value.to_owned())
        })
    }

    /// Returns whether the client allows another request on this connection.
    pub fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.version == "HTTP/1.1" || self.has_token("connection", "keep-alive")
    }

    /// Determines the body framing, or an `InvalidData` error for a transfer coding other
    /// than a final `chunked` or for conflicting or invalid `Content-Length` values.
    pub fn body_framing(&self) -> io::Result<BodyFraming> {
        if !self.header_values("transfer-encoding").is_empty() {
            return self.chunked_framing();
        }
        let lengths = self.header_values("content-length");
        let Some(first) = lengths.first() else {
            return Ok(BodyFraming::Empty);
        };
        if lengths.iter().any(|value| value != first) {
            return Err(invalid("conflicting Content-Length values"));
        }
        let length = std::str::from_utf8(first)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| invalid("invalid Content-Length value"))?;
        Ok(BodyFraming::ContentLength(length))
    }

    fn chunked_framing(&self) -> io::Result<BodyFraming> {
        let codings: Vec<Vec<u8>> = self
            .header_values("transfer-encoding")
            .iter()
            .flat_map(|value| value.split(|byte| *byte == b','))
            .map(|item| item.trim_ascii().to_ascii_lowercase())
            .collect();
        if codings.last().map(Vec::as_slice) == Some(b"chunked".as_slice()) {
            Ok(BodyFraming::Chunked)
        } else {
            Err(invalid("unsupported Transfer-Encoding, the final coding must be chunked"))
        }
    }
}

/// Returns the values of every field named `name` (ASCII case-insensitive) in `headers`.
pub fn header_values<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|(field, _)| field.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_slice())
        .collect()
}

/// A TCP connection with a read buffer, so that bytes read past one request stay available
/// for the next request on the same connection.
pub struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    pub fn new(stream: TcpStream) -> Connection {
        Connection { stream, buffer: Vec::new() }
    }

    /// Reads and parses the next request head. Returns `None` when the client closed the
    /// connection cleanly between requests.
    pub async fn read_head(&mut self) -> io::Result<Option<RequestHead>> {
        loop {
            // RFC 9112, section 2.2: a server should ignore empty lines before a request line.
            while self.buffer.starts_with(b"\r\n") {
                self.buffer.drain(..2);
            }
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                let head: Vec<u8> = self.buffer.drain(..end + 4).collect();
                return parse_head(&head[..end]).map(Some);
            }
            if self.buffer.len() > MAX_HEAD_BYTES {
                return Err(invalid("request head exceeds 64 KiB"));
            }
            if self.fill().await? == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads a body with the given framing and passes it to `on_data` piece by piece.
    pub async fn read_body(
        &mut self,
        framing: BodyFraming,
        mut on_data: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        match framing {
            BodyFraming::Empty => Ok(()),
            BodyFraming::ContentLength(length) => self.read_exact_to(length, &mut on_data).await,
            BodyFraming::Chunked => self.read_chunked(&mut on_data).await,
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes `data` as one chunk of a chunked body. Empty data is skipped, because an empty
    /// chunk ends the body.
    pub async fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
        frame.extend_from_slice(data);
        frame.extend_from_slice(b"\r\n");
        self.stream.write_all(&frame).await
    }

    /// Writes the last chunk of a chunked body, without trailers.
    pub async fn finish_chunks(&mut self) -> io::Result<()> {
        self.stream.write_all(b"0\r\n\r\n").await
    }

    /// Flushes and closes the sending side, so the client sees the end of a close-delimited
    /// body.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let start = self.buffer.len();
        self.buffer.resize(start + READ_SIZE, 0);
        let result = self.stream.read(&mut self.buffer[start..]).await;
        let count = *result.as_ref().unwrap_or(&0);
        self.buffer.truncate(start + count);
        result
    }

    async fn read_exact_to(&mut self, mut remaining: u64, on_data: &mut impl FnMut(&[u8])) -> io::Result<()> {
        while remaining > 0 {
            if self.buffer.is_empty() && self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = self.buffer.len().min(remaining.try_into().unwrap_or(usize::MAX));
            on_data(&self.buffer[..take]);
            self.buffer.drain(..take);
            remaining -= take as u64;
        }
        Ok(())
    }

    async fn read_chunked(&mut self, on_data: &mut impl FnMut(&[u8])) -> io::Result<()> {
        loop {
            let size_line = self.read_line().await?;
            let size = parse_chunk_size(&size_line)?;
            if size == 0 {
                return self.skip_trailers().await;
            }
            self.read_exact_to(size, on_data).await?;
            if !self.read_line().await?.is_empty() {
                return Err(invalid("chunk data is not followed by CRLF"));
            }
        }
    }

    async fn skip_trailers(&mut self) -> io::Result<()> {
        while !self.read_line().await?.is_empty() {}
        Ok(())
    }

    /// Reads one line and returns it without its CRLF.
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.buffer, b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Ok(line[..end].to_vec());
            }
            if self.buffer.len() > MAX_LINE_BYTES {
                return Err(invalid("chunk-size or trailer line exceeds 8 KiB"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

fn parse_head(head: &[u8]) -> io::Result<RequestHead> {
    let lines = split_crlf(head);
    if lines.iter().any(|line| line.contains(&b'\r') || line.contains(&b'\n')) {
        return Err(invalid("bare CR or LF in the request head"));
    }
    let (method, target, version) = parse_request_line(lines[0])?;
    let mut headers = Vec::new();
    for line in &lines[1..] {
        headers.push(parse_header_line(line)?);
    }
    Ok(RequestHead { method, target, version, headers })
}

fn parse_request_line(line: &[u8]) -> io::Result<(String, Vec<u8>, String)> {
    let parts: Vec<&[u8]> = line.split(|byte| *byte == b' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(invalid("request line does not have the form METHOD SP TARGET SP VERSION"));
    };
    let method = String::from_utf8(method.to_vec()).map_err(|_| invalid("non-ASCII method"))?;
    let version = String::from_utf8(version.to_vec()).map_err(|_| invalid("invalid version"))?;
    if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(invalid("invalid request line"));
    }
    Ok((method, target.to_vec(), version))
}

fn parse_header_line(line: &[u8]) -> io::Result<(String, Vec<u8>)> {
    if line.starts_with(b" ") || line.starts_with(b"\t") {
        return Err(invalid("obsolete line folding in a header field"));
    }
    let colon =
        line.iter().position(|byte| *byte == b':').ok_or_else(|| invalid("header line without a colon"))?;
    let name = &line[..colon];
    if name.is_empty() || name.iter().any(u8::is_ascii_whitespace) {
        return Err(invalid("empty header name or whitespace before the colon"));
    }
    let value = line[colon + 1..].trim_ascii();
    Ok((String::from_utf8_lossy(name).into_owned(), value.to_vec()))
}

fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let size_end = line.iter().position(|byte| *byte == b';').unwrap_or(line.len());
    let digits =
        std::str::from_utf8(line[..size_end].trim_ascii()).map_err(|_| invalid("non-ASCII chunk size"))?;
    u64::from_str_radix(digits, 16).map_err(|_| invalid("invalid chunk size"))
}

/// Splits `bytes` at every CRLF. The result always has at least one element.
fn split_crlf(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    while let Some(end) = find(bytes, b"\r\n") {
        lines.push(&bytes[..end]);
        bytes = &bytes[end + 2..];
    }
    lines.push(bytes);
    lines
}

/// Encodes a status line and header fields, followed by the empty line that ends the head.
pub fn encode_response_head(status: u16, headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).into_bytes();
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Returns the reason phrase for common status codes and `Unknown` for the rest.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Returns the offset of the first occurrence of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}
