//! Parsing of raw HTTP/1.1 request bytes, as a [`super::TcpRecorder`] captures them, and
//! the byte edits that tamper with a captured request.
//!
//! A request body is framed by `Content-Length` or by chunked transfer coding. The parser
//! keeps the byte ranges of the body data inside the raw bytes, so a test can flip one body
//! byte without breaking the framing around it.

use std::ops::Range;

use super::http1::find;

/// One complete request inside raw bytes.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// The request bytes exactly as sent: head, framing and body.
    pub bytes: Vec<u8>,
    /// Request line without its CRLF.
    request_line: Range<usize>,
    /// Header fields in order: name and value ranges inside `bytes`.
    fields: Vec<(Range<usize>, Range<usize>)>,
    /// Ranges of body data inside `bytes`: one for `Content-Length`, one per chunk for
    /// chunked framing.
    body_ranges: Vec<Range<usize>>,
}

impl RawRequest {
    /// Parses the request at the start of `bytes` and returns it with the number of bytes it
    /// takes, or `None` while the request is incomplete. Panics on bytes that are not an
    /// HTTP/1.1 request.
    pub fn parse_prefix(bytes: &[u8]) -> Option<(RawRequest, usize)> {
        let head_end = find(bytes, b"\r\n\r\n")?;
        let mut lines = line_ranges(0, head_end, bytes);
        let request_line = lines.remove(0);
        let fields: Vec<_> = lines.into_iter().map(|line| split_field(bytes, line)).collect();
        let mut request = RawRequest { bytes: Vec::new(), request_line, fields, body_ranges: Vec::new() };
        let body_start = head_end + 4;
        let end = if request.header_has_token(bytes, "transfer-encoding", "chunked") {
            let (ranges, end) = chunk_ranges(bytes, body_start)?;
            request.body_ranges = ranges;
            end
        } else {
            let length = request.content_length(bytes);
            if bytes.len() < body_start + length {
                return None;
            }
            request.body_ranges = std::iter::once(body_start..body_start + length).collect();
            body_start + length
        };
        request.bytes = bytes[..end].to_vec();
        Some((request, end))
    }

    /// Splits bytes that contain whole requests one after another, as one connection's
    /// client-to-server capture does. Panics if bytes of an incomplete request are left.
    pub fn split_all(mut bytes: &[u8]) -> Vec<RawRequest> {
        let mut requests = Vec::new();
        while !bytes.is_empty() {
            let (request, len) = RawRequest::parse_prefix(bytes)
                .unwrap_or_else(|| panic!("incomplete request in captured bytes: {}", bytes.escape_ascii()));
            requests.push(request);
            bytes = &bytes[len..];
        }
        requests
    }

    /// Returns the request line, for example `POST /abc HTTP/1.1`.
    pub fn request_line(&self) -> String {
        String::from_utf8_lossy(&self.bytes[self.request_line.clone()]).into_owned()
    }

    /// Returns the request target as sent.
    pub fn target(&self) -> String {
        self.request_line().split(' ').nth(1).unwrap_or_default().to_owned()
    }

    /// Returns the value of the first field named `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_range(name).map(|range| &self.bytes[range])
    }

    /// Returns the body with the chunked framing removed.
    pub fn body(&self) -> Vec<u8> {
        self.body_ranges.iter().flat_map(|range| self.bytes[range.clone()].iter().copied()).collect()
    }

    /// Returns the index in [`RawRequest::bytes`] of byte `offset` of the unframed body.
    /// Panics if the body is shorter.
    pub fn body_byte_index(&self, offset: usize) -> usize {
        let mut remaining = offset;
        for range in &self.body_ranges {
            if remaining < range.len() {
                return range.start + remaining;
            }
            remaining -= range.len();
        }
        panic!("body offset {offset} is past the end of a {}-byte body", self.body().len())
    }

    /// Returns a copy with byte `index` of the raw bytes XORed with `mask`.
    pub fn with_byte_flipped(&self, index: usize, mask: u8) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        bytes[index] ^= mask;
        bytes
    }

    /// Returns a copy whose first field named `name` has `value` in place of its value.
    /// Panics if the field is missing.
    pub fn with_header_value(&self, name: &str, value: &[u8]) -> Vec<u8> {
        let range = self.header_range(name).unwrap_or_else(|| panic!("request has no {name} field"));
        let mut bytes = self.bytes[..range.start].to_vec();
        bytes.extend_from_slice(value);
        bytes.extend_from_slice(&self.bytes[range.end..]);
        bytes
    }

    /// Returns the index in [`RawRequest::bytes`] of byte `offset` of the request target.
    pub fn target_byte_index(&self, offset: usize) -> usize {
        let line = &self.bytes[self.request_line.clone()];
        let target_start = line.iter().position(|byte| *byte == b' ').expect("request line has a target") + 1;
        self.request_line.start + target_start + offset
    }

    fn header_range(&self, name: &str) -> Option<Range<usize>> {
        header_range(&self.bytes, &self.fields, name)
    }

    fn header_has_token(&self, bytes: &[u8], name: &str, token: &str) -> bool {
        header_range(bytes, &self.fields, name).is_some_and(|range| {
            bytes[range]
                .split(|byte| *byte == b',')
                .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    fn content_length(&self, bytes: &[u8]) -> usize {
        let Some(range) = header_range(bytes, &self.fields, "content-length") else { return 0 };
        let text = String::from_utf8_lossy(&bytes[range]);
        text.trim().parse().unwrap_or_else(|_| panic!("invalid Content-Length {text:?} in captured request"))
    }
}

fn header_range(bytes: &[u8], fields: &[(Range<usize>, Range<usize>)], name: &str) -> Option<Range<usize>> {
    fields
        .iter()
        .find(|(field, _)| bytes[field.clone()].eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, value)| value.clone())
}

/// Returns the ranges of the CRLF-separated lines of `bytes[start..end]`.
fn line_ranges(start: usize, end: usize, bytes: &[u8]) -> Vec<Range<usize>> {
    let mut lines = Vec::new();
    let mut position = start;
    while let Some(line_len) = find(&bytes[position..end], b"\r\n") {
        lines.push(position..position + line_len);
        position += line_len + 2;
    }
    lines.push(position..end);
    lines
}

/// Splits a header line into the ranges of its name and of its value without the
/// surrounding whitespace.
fn split_field(bytes: &[u8], line: Range<usize>) -> (Range<usize>, Range<usize>) {
    let text = &bytes[line.clone()];
    let colon = text
        .iter()
        .position(|byte| *byte == b':')
        .unwrap_or_else(|| panic!("header line without a colon: {}", text.escape_ascii()));
    let mut value_start = line.start + colon + 1;
    let mut value_end = line.end;
    while value_start < value_end && bytes[value_start].is_ascii_whitespace() {
        value_start += 1;
    }
    while value_end > value_start && bytes[value_end - 1].is_ascii_whitespace() {
        value_end -= 1;
    }
    (line.start..line.start + colon, value_start..value_end)
}

/// Walks a chunked body that starts at `start` and returns the data range of each chunk and
/// the end of the body, trailers included, or `None` while it is incomplete.
fn chunk_ranges(bytes: &[u8], start: usize) -> Option<(Vec<Range<usize>>, usize)> {
    let mut ranges = Vec::new();
    let mut position = start;
    loop {
        let line_end = position + find(&bytes[position..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&bytes[position..line_end]);
        let digits = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(digits, 16)
            .unwrap_or_else(|_| panic!("invalid chunk size line {size_text:?} in captured request"));
        position = line_end + 2;
        if size == 0 {
            // Trailer lines follow until an empty line.
            loop {
                let trailer_end = position + find(&bytes[position..], b"\r\n")?;
                let is_empty = trailer_end == position;
                position = trailer_end + 2;
                if is_empty {
                    return Some((ranges, position));
                }
            }
        }
        if bytes.len() < position + size + 2 {
            return None;
        }
        ranges.push(position..position + size);
        position += size + 2;
    }
}
