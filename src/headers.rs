//! Header handling on both hops: which headers travel, and the header block each relay seals.
//!
//! Hop-by-hop headers (`Connection` and every name it lists, `Keep-Alive`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-*`) describe one connection and are dropped at every
//! relay. `x-mte-*` control headers never reach the upstream API or the application. `Host` is
//! dropped so the client sets the next hop's authority, and `Expect` is answered by each hop.

use std::borrow::Cow;

use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use api_relay_protocol::fields::{self, FieldLimits};

use crate::error::RelayError;

/// Prefix of the relay's control headers.
pub const CONTROL_PREFIX: &str = "x-mte-";
/// Relay A to relay B: the exchange's control header.
pub const RELAY: &str = "x-mte-relay";
/// Both directions: the header block, base64url, sealed unless `x-mte-encode-headers: false`.
pub const RELAY_EH: &str = "x-mte-relay-eh";
/// Application to relay A: the shared token that makes a request outbound.
pub const OUTBOUND_TOKEN: &str = "x-mte-outbound-token";
/// Application to relay A: the peer relay's origin.
pub const UPSTREAM: &str = "x-mte-upstream";
/// Application to relay A: `MKE` (default) or `MTE`.
pub const ENCODE_TYPE: &str = "x-mte-encode-type";
/// Application to relay A: `false` sends the header block unsealed.
pub const ENCODE_HEADERS: &str = "x-mte-encode-headers";
/// Application to relay A: `false` sends the path and query unsealed.
pub const ENCODE_URL: &str = "x-mte-encode-url";
/// The control headers as parsed names, so lookups and inserts on every exchange skip parsing
/// and checking the name.
pub mod name {
    use actix_web::http::header::HeaderName;

    pub static RELAY: HeaderName = HeaderName::from_static(super::RELAY);
    pub static RELAY_EH: HeaderName = HeaderName::from_static(super::RELAY_EH);
    pub static OUTBOUND_TOKEN: HeaderName = HeaderName::from_static(super::OUTBOUND_TOKEN);
    pub static UPSTREAM: HeaderName = HeaderName::from_static(super::UPSTREAM);
    pub static ENCODE_TYPE: HeaderName = HeaderName::from_static(super::ENCODE_TYPE);
    pub static ENCODE_HEADERS: HeaderName = HeaderName::from_static(super::ENCODE_HEADERS);
    pub static ENCODE_URL: HeaderName = HeaderName::from_static(super::ENCODE_URL);
}

/// Pseudo-field carrying the request method in a request block.
pub const PSEUDO_METHOD: &str = ":method";
/// Pseudo-field carrying the status in a response block.
pub const PSEUDO_STATUS: &str = ":status";

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "expect",
];

/// One header line on its way into a block: the name borrowed from the message it came from,
/// the value borrowed too unless the relay wrote it.
pub type Line<'a> = (&'a [u8], Cow<'a, [u8]>);

/// Whether the lowercase `name` must not be forwarded, given the names `Connection` lists.
fn is_dropped(name: &[u8], connection_listed: &[&str]) -> bool {
    HOP_BY_HOP.iter().any(|dropped| dropped.as_bytes() == name)
        || name.starts_with(b"proxy-")
        || name.starts_with(CONTROL_PREFIX.as_bytes())
        || name == b"host"
        || connection_listed.iter().any(|listed| listed.as_bytes().eq_ignore_ascii_case(name))
}

/// The end-to-end headers of `headers`, in the order the map keeps: repeated names stay in
/// their received order.
pub fn end_to_end(headers: &HeaderMap) -> Vec<Line<'_>> {
    end_to_end_pairs(|| headers.iter().map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())))
}

/// Returns the end-to-end headers among the (name, value) pairs of a parsed header map, which
/// `pairs` iterates over afresh on each call, in their order. The map has already checked the
/// names and made them lowercase.
pub fn end_to_end_pairs<'a, I>(pairs: impl Fn() -> I) -> Vec<Line<'a>>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    let listed: Vec<&str> = pairs()
        .filter(|(name, _)| *name == b"connection")
        .filter_map(|(_, value)| std::str::from_utf8(value).ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .collect();
    // Sized once for every pair, so the lines are one allocation.
    let mut lines = Vec::with_capacity(pairs().count());
    lines.extend(
        pairs()
            .filter(|(name, _)| !is_dropped(name, &listed))
            .map(|(name, value)| (name, Cow::Borrowed(value))),
    );
    lines
}

/// Formats an IP address the way `Display` does. IPv4 addresses, the common case, are written
/// digit by digit, because `Display` formats them through a padding formatter (about 1,300
/// instructions per address under callgrind, Rust 1.95).
pub fn ip_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    for (index, octet) in v4.octets().into_iter().enumerate() {
        if index > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

/// Merges the application's `X-Forwarded-For` lines and its address into one line, and sets
/// `X-Forwarded-Proto`, so the upstream API sees exactly one of each.
pub fn add_forwarded(fields: &mut Vec<Line<'_>>, client_ip: Option<String>, scheme: &str) {
    let mut chain: Vec<String> = Vec::new();
    fields.retain(|(name, value)| match *name {
        b"x-forwarded-for" => {
            chain.push(String::from_utf8_lossy(value).trim().to_owned());
            false
        }
        b"x-forwarded-proto" => false,
        _ => true,
    });
    chain.extend(client_ip);
    chain.retain(|entry| !entry.is_empty());
    if !chain.is_empty() {
        fields.push((b"x-forwarded-for", Cow::Owned(chain.join(", ").into_bytes())));
    }
    fields.push((b"x-forwarded-proto", Cow::Owned(scheme.as_bytes().to_vec())));
}

/// Encodes a block with its pseudo-field first.
pub fn encode_block(pseudo: &str, pseudo_value: &str, fields: &[Line<'_>]) -> Vec<u8> {
    let mut all: Vec<(&[u8], &[u8])> = Vec::with_capacity(fields.len() + 1);
    all.push((pseudo.as_bytes(), pseudo_value.as_bytes()));
    all.extend(fields.iter().map(|(name, value)| (*name, value.as_ref())));
    fields::encode(&all)
}

/// Encodes a block like [`encode_block`] and checks it against the limits the peer decodes it
/// with, so a block the peer would reject is refused here with a reason naming the setting.
///
/// # Errors
/// The reason, when the block has more lines than `MAX_HEADER_COUNT` allows or more bytes
/// than `MAX_HEADER_BYTES`.
pub fn encode_limited(
    pseudo: &str,
    pseudo_value: &str,
    fields: &[Line<'_>],
    limits: FieldLimits,
) -> Result<Vec<u8>, String> {
    // The pseudo-field takes one of the block's lines.
    let allowed = limits.max_fields.saturating_sub(1);
    if fields.len() > allowed {
        return Err(format!("{} header lines, MAX_HEADER_COUNT allows {allowed}", fields.len()));
    }
    let block = encode_block(pseudo, pseudo_value, fields);
    if block.len() > limits.max_bytes {
        return Err(format!(
            "{} bytes of headers once encoded, MAX_HEADER_BYTES allows {}",
            block.len(),
            limits.max_bytes
        ));
    }
    Ok(block)
}

/// A decoded header block: its pseudo-field value and the ordinary headers.
pub struct Block {
    pub pseudo: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Block {
    /// The `Content-Length` the block declares, if any.
    pub fn content_length(&self) -> Option<u64> {
        self.headers
            .iter()
            .find(|(name, _)| name == header::CONTENT_LENGTH)
            .and_then(|(_, value)| value.to_str().ok()?.trim().parse().ok())
    }

    /// Every header except `Content-Length`, which the body framing sets.
    pub fn without_length(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.headers.iter().filter(|(name, _)| name != header::CONTENT_LENGTH)
    }

    /// Moves out every header except `Content-Length`, like [`Block::without_length`].
    pub fn into_without_length(self) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
        self.headers.into_iter().filter(|(name, _)| name != header::CONTENT_LENGTH)
    }
}

/// Decodes a block and checks its pseudo-field and every name and value. The header values
/// share the block's memory instead of each taking a copy.
///
/// # Errors
/// `RelayError` with code 562 (open failed) when the block is malformed: a block that
/// authenticated but does not parse was sealed by a broken or hostile peer.
pub fn decode_block(block: Vec<u8>, pseudo: &str, limits: FieldLimits) -> Result<Block, RelayError> {
    let block = bytes::Bytes::from(block);
    let fields = fields::decode(&block, limits)?;
    let mut iter = fields.into_iter();
    let invalid = |reason: &str| {
        RelayError::relay(crate::error::RelayCode::OpenFailed, format!("malformed header block: {reason}"))
    };
    let (first_name, first_value) = iter.next().ok_or_else(|| invalid("missing pseudo-field"))?;
    if first_name != pseudo.as_bytes() {
        return Err(invalid("missing pseudo-field"));
    }
    let pseudo =
        std::str::from_utf8(first_value).map_err(|_| invalid("pseudo-field is not text"))?.to_owned();
    let mut headers = Vec::with_capacity(iter.len());
    for (name, value) in iter {
        let name = HeaderName::from_bytes(name).map_err(|_| invalid("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(block.slice_ref(value))
            .map_err(|_| invalid("invalid header value"))?;
        if !is_dropped(name.as_str().as_bytes(), &[]) {
            headers.push((name, value));
        }
    }
    Ok(Block { pseudo, headers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn ip_text_matches_display() {
        let mut addresses: Vec<IpAddr> = Vec::new();
        for octet in 0..=255u8 {
            addresses.push(Ipv4Addr::new(octet, 0, 9, 255 - octet).into());
            addresses.push(Ipv4Addr::new(10, octet, octet / 3, 1).into());
        }
        addresses.push(Ipv6Addr::LOCALHOST.into());
        addresses.push(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0xff00, 0x42, 0x8329).into());
        addresses.push(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().into());
        for address in addresses {
            assert_eq!(ip_text(address), address.to_string());
        }
    }

    fn map(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_and_control_headers_are_dropped() {
        let headers = map(&[
            ("connection", b"keep-alive, x-private"),
            ("x-private", b"1"),
            ("keep-alive", b"timeout=5"),
            ("proxy-authorization", b"basic x"),
            ("x-mte-outbound-token", b"secret"),
            ("host", b"relay-a"),
            ("te", b"trailers"),
            ("accept", b"*/*"),
        ]);
        let names: Vec<&[u8]> = end_to_end(&headers).into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, vec![b"accept".as_slice()]);
    }

    #[test]
    fn repeated_and_binary_values_keep_order() {
        let headers = map(&[("x-multi", b"one"), ("x-multi", b"two"), ("x-bin", &[0x80, 0xfe])]);
        let fields = end_to_end(&headers);
        let multi: Vec<&[u8]> =
            fields.iter().filter(|(n, _)| *n == b"x-multi").map(|(_, v)| v.as_ref()).collect();
        assert_eq!(multi, vec![b"one".as_slice(), b"two"]);
        let block = encode_block(PSEUDO_METHOD, "GET", &fields);
        let limits = FieldLimits { max_fields: 10, max_bytes: 1000 };
        let decoded = decode_block(block, PSEUDO_METHOD, limits).unwrap();
        assert_eq!(decoded.pseudo, "GET");
        assert!(decoded.headers.iter().any(|(_, v)| v.as_bytes() == [0x80, 0xfe]));
    }

    #[test]
    fn forwarded_headers_become_one_line_each() {
        let line = |name: &'static [u8], value: &'static [u8]| (name, Cow::Borrowed(value));
        let mut fields = vec![
            line(b"x-forwarded-for", b"10.0.0.1"),
            line(b"x-forwarded-for", b"10.0.0.2"),
            line(b"x-forwarded-proto", b"http"),
        ];
        add_forwarded(&mut fields, Some("192.0.2.7".into()), "https");
        assert_eq!(
            fields,
            vec![
                line(b"x-forwarded-for", b"10.0.0.1, 10.0.0.2, 192.0.2.7"),
                line(b"x-forwarded-proto", b"https"),
            ]
        );
    }
}
