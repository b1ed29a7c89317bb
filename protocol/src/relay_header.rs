//! The clear `x-mte-relay` control header of one exchange on the relay A to relay B hop:
//!
//! ```text
//! x-mte-relay: <client id>,<pair id>,<type>,<url flag>,<headers flag>,<body flag>,<seq>,<version>
//! ```
//!
//! `type` is `MKE` or `MTE`; each flag is `1` (sealed) or `0` (clear); `seq` is decimal; the pair
//! id is 32 hex digits. Version 1 always seals the body, so its body flag is always `1`.

use std::fmt;
use std::str::FromStr;

use crate::ids::PAIR_ID_LEN;
use crate::{ClientId, PROTOCOL_VERSION, PairId, ProtocolError};

/// How an exchange is sealed, chosen per request with `x-mte-encode-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum EncodeType {
    /// Streaming: each item sealed with the exchange key, sizes visible (default).
    #[default]
    #[serde(rename = "MKE")]
    Mke,
    /// Padded: each item padded to a power-of-two size bucket before sealing; bodies buffered.
    #[serde(rename = "MTE")]
    Mte,
}

impl EncodeType {
    pub fn as_str(self) -> &'static str {
        match self {
            EncodeType::Mke => "MKE",
            EncodeType::Mte => "MTE",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            EncodeType::Mke => 1,
            EncodeType::Mte => 2,
        }
    }

    pub(crate) fn key_label(self) -> &'static [u8; 3] {
        match self {
            EncodeType::Mke => b"mke",
            EncodeType::Mte => b"mte",
        }
    }
}

impl FromStr for EncodeType {
    type Err = ProtocolError;

    /// Accepts `MKE` or `MTE` in any letter case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("MKE") {
            Ok(EncodeType::Mke)
        } else if text.eq_ignore_ascii_case("MTE") {
            Ok(EncodeType::Mte)
        } else {
            Err(ProtocolError::MalformedRelayHeader { reason: "encode type must be MKE or MTE" })
        }
    }
}

/// Which items of an exchange are sealed. The same flags apply to the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealFlags {
    pub url: bool,
    pub headers: bool,
    pub body: bool,
}

impl SealFlags {
    /// Everything sealed: the default.
    pub const ALL: SealFlags = SealFlags { url: true, headers: true, body: true };

    pub(crate) fn bits(self) -> u8 {
        u8::from(self.url) | u8::from(self.headers) << 1 | u8::from(self.body) << 2
    }
}

/// One parsed `x-mte-relay` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayHeader {
    pub client_id: ClientId,
    pub pair_id: PairId,
    pub encode_type: EncodeType,
    pub flags: SealFlags,
    pub seq: u64,
    pub version: u8,
}

impl RelayHeader {
    /// Parses the header value.
    ///
    /// # Errors
    /// `UnsupportedVersion` for another version, `InvalidClientId` for a malformed client id,
    /// `MalformedRelayHeader` for anything else.
    pub fn parse(value: &[u8]) -> Result<Self, ProtocolError> {
        let malformed = |reason| ProtocolError::MalformedRelayHeader { reason };
        let text = std::str::from_utf8(value).map_err(|_| malformed("not ascii"))?;
        let count_error = || malformed("expected 8 comma-separated fields");
        let mut parts = text.split(',').map(str::trim);
        let mut fields = [""; 8];
        for field in &mut fields {
            *field = parts.next().ok_or_else(count_error)?;
        }
        if parts.next().is_some() {
            return Err(count_error());
        }
        let [client_id, pair_id, encode_type, url, headers, body, seq, version] = fields;
        let version: u64 = version.parse().map_err(|_| malformed("version must be a number"))?;
        if version != u64::from(PROTOCOL_VERSION) {
            return Err(ProtocolError::UnsupportedVersion { found: version, expected: PROTOCOL_VERSION });
        }
        let flags =
            SealFlags { url: parse_flag(url)?, headers: parse_flag(headers)?, body: parse_flag(body)? };
        if !flags.body {
            return Err(malformed("protocol version 1 always seals the body"));
        }
        Ok(Self {
            client_id: ClientId::parse(client_id)?,
            pair_id: PairId::parse(pair_id)?,
            encode_type: encode_type.parse()?,
            flags,
            seq: seq.parse().map_err(|_| malformed("seq must be a decimal u64"))?,
            version: PROTOCOL_VERSION,
        })
    }

    /// Returns the header value. Relay A writes one per exchange, so the text is put together
    /// directly instead of through a formatting pass.
    pub fn encode(&self) -> String {
        let flag = |on: bool| if on { '1' } else { '0' };
        let client_id = self.client_id.as_str();
        // Client id, 32 hex digits, type, three flags, up to 20 digits of seq, the version and
        // the seven commas.
        let mut text = String::with_capacity(client_id.len() + 32 + 3 + 3 + 20 + 3 + 7);
        text.push_str(client_id);
        text.push(',');
        let mut pair_hex = [0u8; 2 * PAIR_ID_LEN];
        hex::encode_to_slice(self.pair_id.as_bytes(), &mut pair_hex).expect("two hex digits per byte fit");
        text.push_str(std::str::from_utf8(&pair_hex).expect("hex digits are ASCII"));
        text.push(',');
        text.push_str(self.encode_type.as_str());
        for on in [self.flags.url, self.flags.headers, self.flags.body] {
            text.push(',');
            text.push(flag(on));
        }
        text.push(',');
        text.push_str(itoa::Buffer::new().format(self.seq));
        text.push(',');
        text.push_str(itoa::Buffer::new().format(self.version));
        text
    }
}

impl fmt::Display for RelayHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

fn parse_flag(text: &str) -> Result<bool, ProtocolError> {
    match text {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(ProtocolError::MalformedRelayHeader { reason: "flags must be 0 or 1" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientIdSigner;

    fn header() -> RelayHeader {
        RelayHeader {
            client_id: ClientIdSigner::new(b"k", None).issue(),
            pair_id: PairId::random(),
            encode_type: EncodeType::Mte,
            flags: SealFlags { url: false, headers: true, body: true },
            seq: u64::MAX,
            version: PROTOCOL_VERSION,
        }
    }

    #[test]
    fn header_round_trips() {
        let header = header();
        assert_eq!(RelayHeader::parse(header.to_string().as_bytes()), Ok(header));
    }

    #[test]
    fn encode_writes_the_documented_fields() {
        for (seq, flags) in
            [(0, SealFlags::ALL), (9, SealFlags::ALL), (10, header().flags), (u64::MAX, SealFlags::ALL)]
        {
            let header = RelayHeader { seq, flags, ..header() };
            let flag = |on: bool| if on { "1" } else { "0" };
            let expected = format!(
                "{},{},MTE,{},{},{},{seq},{PROTOCOL_VERSION}",
                header.client_id.as_str(),
                hex::encode(header.pair_id.as_bytes()),
                flag(flags.url),
                flag(flags.headers),
                flag(flags.body),
            );
            assert_eq!(header.encode(), expected);
            assert_eq!(header.to_string(), expected);
        }
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let good = header().to_string();
        let cases = [
            String::new(),
            good.replacen(",MTE,", ",XYZ,", 1),
            good.replacen(",0,1,1,", ",2,1,1,", 1),
            format!("{good},extra"),
            good.replace(&format!(",{}", u64::MAX), ",-1"),
        ];
        for case in cases {
            assert!(RelayHeader::parse(case.as_bytes()).is_err(), "accepted {case:?}");
        }
    }

    #[test]
    fn other_version_is_reported_as_unsupported() {
        let text = header().to_string();
        let text = format!("{}9", &text[..text.len() - 1]);
        assert!(matches!(RelayHeader::parse(text.as_bytes()), Err(ProtocolError::UnsupportedVersion { .. })));
    }
}
