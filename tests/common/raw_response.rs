//! Parsing of raw HTTP/1.1 response bytes, as returned by `send_raw`, into status, header
//! fields in order and decoded body. Malformed input panics with the bytes in the message.

use super::http1::{self, HeaderFields, find};

/// One response parsed from raw bytes.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header fields in the order received, names with their original case.
    pub headers: HeaderFields,
    /// Body after removing the chunked framing, if any.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Returns the value of the first field named `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_values(name).first().copied()
    }

    /// Returns the values of every field named `name`, ignoring ASCII case, in order.
    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        http1::header_values(&self.headers, name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses every response in `bytes`, including interim 1xx responses, in order.
///
/// The body ends by chunked framing, by `Content-Length`, or at the end of `bytes` when
/// neither is present. 1xx, 204 and 304 responses have no body. Responses to HEAD carry a
/// `Content-Length` without a body, so parse them with [`parse_head_response`].
pub fn parse_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut responses = Vec::new();
    while !bytes.is_empty() {
        let (status, headers, rest) = split_head(bytes);
        let (body, consumed) = read_body(status, &headers, rest);
        responses.push(RawResponse { status, headers, body });
        bytes = &rest[consumed..];
    }
    responses
}

/// Parses `bytes` as exactly one final response, skipping interim 1xx responses.
pub fn parse_response(bytes: &[u8]) -> RawResponse {
    let mut finals: Vec<RawResponse> =
        parse_responses(bytes).into_iter().filter(|response| response.status >= 200).collect();
    assert_eq!(finals.len(), 1, "expected one final response in: {}", bytes.escape_ascii());
    finals.remove(0)
}

/// Parses the head of a response to a HEAD request and checks that no body bytes follow.
pub fn parse_head_response(bytes: &[u8]) -> RawResponse {
    let (status, headers, rest) = split_head(bytes);
    assert!(
        rest.is_empty(),
        "expected no body after the head of a HEAD response, got: {}",
        rest.escape_ascii()
    );
    RawResponse { status, headers, body: Vec::new() }
}

/// Splits off one response head and returns its status, header fields and the bytes after it.
fn split_head(bytes: &[u8]) -> (u16, HeaderFields, &[u8]) {
    let end = find(bytes, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in: {}", bytes.escape_ascii()));
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = bytes[..end].split(|byte| *byte == b'\n');
    let status_line = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("invalid status line in response head: {head:?}"));
    let headers = lines.map(|line| split_field(line, &head)).collect();
    (status, headers, &bytes[end + 4..])
}

fn split_field(line: &[u8], head: &str) -> (String, Vec<u8>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let colon = line
        .iter()
        .position(|byte| *byte == b':')
        .unwrap_or_else(|| panic!("header line without a colon in response head: {head:?}"));
    let name = String::from_utf8_lossy(&line[..colon]).into_owned();
    (name, line[colon + 1..].trim_ascii().to_vec())
}

/// Returns the decoded body and the number of bytes of `rest` it used.
fn read_body(status: u16, headers: &[(String, Vec<u8>)], rest: &[u8]) -> (Vec<u8>, usize) {
    if status < 200 || status == 204 || status == 304 {
        return (Vec::new(), 0);
    }
    let is_chunked = http1::header_values(headers, "transfer-encoding")
        .iter()
        .any(|value| value.eq_ignore_ascii_case(b"chunked"));
    if is_chunked {
        return decode_chunked(rest);
    }
    let Some(length) = http1::header_values(headers, "content-length").first().copied() else {
        return (rest.to_vec(), rest.len());
    };
    let length: usize = String::from_utf8_lossy(length)
        .parse()
        .unwrap_or_else(|_| panic!("invalid Content-Length {:?}", length.escape_ascii().to_string()));
    assert!(
        rest.len() >= length,
        "response body truncated: Content-Length {length}, received {} bytes",
        rest.len()
    );
    (rest[..length].to_vec(), length)
}

/// Decodes a chunked body at the start of `bytes` and returns it with the number of bytes
/// used, trailers included.
fn decode_chunked(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut body = Vec::new();
    let mut position = 0;
    loop {
        let line_end = position
            + find(&bytes[position..], b"\r\n")
                .unwrap_or_else(|| panic!("chunked body truncated after {} bytes", body.len()));
        let size_text = String::from_utf8_lossy(&bytes[position..line_end]);
        let size_digits = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_digits, 16)
            .unwrap_or_else(|_| panic!("invalid chunk size line {size_text:?}"));
        position = line_end + 2;
        if size == 0 {
            let trailer_end = find(&bytes[position - 2..], b"\r\n\r\n")
                .unwrap_or_else(|| panic!("chunked body has no final CRLF"));
            return (body, position - 2 + trailer_end + 4);
        }
        assert!(bytes.len() >= position + size + 2, "chunked body truncated in a chunk");
        body.extend_from_slice(&bytes[position..position + size]);
        position += size + 2;
    }
}
