//! Bodies on the hop between the relays: plaintext streams in, sealed records out, and back.
//!
//! `SealStream` turns a plaintext body into record frames as bytes arrive: it emits a full record
//! every 64 KiB and flushes a shorter one whenever the source has nothing ready, so neither
//! latency nor memory grows with the body. `OpenStream` does the reverse and fails the body at
//! the first record that does not authenticate. `MTE` bodies are buffered whole instead, because
//! padding hides the total length.
//!
//! A body a relay already has whole, or one of at most `WHOLE_BODY_BYTES` with a declared
//! length, is sealed or opened in one step and sent with `Content-Length`. It becomes full
//! records and a final one, with no chunked framing and no stream per body on either relay.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use api_relay_protocol::MAX_RECORD_PLAINTEXT;
use api_relay_protocol::padding;
use api_relay_protocol::records::{self, RecordOpener, RecordSealer};
use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_util::StreamExt;
use futures_util::stream::LocalBoxStream;
use thiserror::Error;

use crate::error::{RelayCode, RelayError};

/// Largest declared plaintext length a relay reads whole before sealing or opening it: one
/// record, so reading it whole adds no wait that streaming would avoid.
pub const WHOLE_BODY_BYTES: u64 = MAX_RECORD_PLAINTEXT as u64;

/// A body stream failure.
#[derive(Debug, Error)]
pub enum BodyError {
    /// The plaintext body exceeds `MAX_BODY_BYTES`.
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// The source connection failed.
    #[error("body transfer failed: {0}")]
    Transfer(String),
    /// A record did not open or the framing is wrong.
    #[error(transparent)]
    Protocol(#[from] api_relay_protocol::ProtocolError),
}

impl From<PayloadError> for BodyError {
    fn from(error: PayloadError) -> Self {
        BodyError::Transfer(error.to_string())
    }
}

impl From<BodyError> for RelayError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge { limit } => RelayError::BodyTooLarge { limit },
            BodyError::Transfer(reason) => RelayError::BadGateway { hop: "body source", reason },
            BodyError::Protocol(error) => RelayError::from(error),
        }
    }
}

impl From<BodyError> for actix_web::Error {
    fn from(error: BodyError) -> Self {
        actix_web::error::ErrorBadGateway(error.to_string())
    }
}

/// Any body source, with errors already converted.
pub type Source = LocalBoxStream<'static, Result<Bytes, BodyError>>;

/// Wraps a payload or client response body as a [`Source`].
pub fn source<S, E>(stream: S) -> Source
where
    S: Stream<Item = Result<Bytes, E>> + 'static,
    E: Into<BodyError>,
{
    stream.map(|item| item.map_err(Into::into)).boxed_local()
}

/// Counts the bytes that pass through `source` on `counter`.
pub fn counted(source: Source, counter: prometheus::IntCounter) -> Source {
    source
        .inspect(move |item| {
            if let Ok(chunk) = item {
                counter.inc_by(chunk.len() as u64);
            }
        })
        .boxed_local()
}

/// A source that starts with chunks already read.
pub fn prepend(chunks: Vec<Bytes>, rest: Source) -> Source {
    futures_util::stream::iter(chunks.into_iter().map(Ok)).chain(rest).boxed_local()
}

/// Seals a plaintext body as record frames while it streams.
pub struct SealStream {
    source: Source,
    sealer: RecordSealer,
    buffer: BytesMut,
    source_done: bool,
    seen: u64,
    limit: u64,
}

impl SealStream {
    pub fn new(source: Source, sealer: RecordSealer, limit: u64) -> Self {
        Self { source, sealer, buffer: BytesMut::new(), source_done: false, seen: 0, limit }
    }

    fn emit(&mut self, len: usize, is_final: bool) -> Poll<Option<Result<Bytes, BodyError>>> {
        let plaintext = self.buffer.split_to(len);
        Poll::Ready(Some(self.sealer.seal(&plaintext, is_final).map(Bytes::from).map_err(BodyError::from)))
    }
}

impl Stream for SealStream {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.sealer.is_finished() {
                return Poll::Ready(None);
            }
            if this.buffer.len() > MAX_RECORD_PLAINTEXT
                || (this.buffer.len() == MAX_RECORD_PLAINTEXT && !this.source_done)
            {
                return this.emit(MAX_RECORD_PLAINTEXT, false);
            }
            if this.source_done {
                let len = this.buffer.len();
                return this.emit(len, true);
            }
            match this.source.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.seen += chunk.len() as u64;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
                    }
                    this.buffer.extend_from_slice(&chunk);
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => this.source_done = true,
                Poll::Pending if this.buffer.is_empty() => return Poll::Pending,
                Poll::Pending => {
                    let len = this.buffer.len();
                    return this.emit(len, false);
                }
            }
        }
    }
}

/// Opens a stream of record frames into the plaintext body.
pub struct OpenStream {
    source: Source,
    opener: RecordOpener,
    first: Option<Bytes>,
    failed: bool,
}

impl OpenStream {
    pub fn new(source: Source, opener: RecordOpener) -> Self {
        Self { source, opener, first: None, failed: false }
    }

    /// Reads until the first record opened (or the body failed), so the caller can reject a
    /// tampered body before contacting the upstream API. The record is kept and streamed first.
    ///
    /// # Errors
    /// `BodyError` when the first record is missing, malformed or does not authenticate.
    pub async fn open_first(&mut self) -> Result<(), BodyError> {
        match self.next().await {
            Some(Ok(record)) => {
                self.first = Some(record);
                Ok(())
            }
            Some(Err(error)) => Err(error),
            None => Ok(()),
        }
    }

    /// Returns the whole plaintext when [`OpenStream::open_first`] already reached the final record.
    pub fn whole(&mut self) -> Option<Bytes> {
        self.opener.is_finished().then(|| self.first.take().unwrap_or_default())
    }

    fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        loop {
            match self.opener.next_record() {
                Ok(Some(record)) if record.is_empty() => continue,
                Ok(Some(record)) => return Poll::Ready(Some(Ok(Bytes::from(record)))),
                Ok(None) => {}
                Err(error) => return Poll::Ready(Some(Err(error.into()))),
            }
            match self.source.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.opener.push(&chunk),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => {
                    return match self.opener.finish() {
                        Ok(()) => Poll::Ready(None),
                        Err(error) => Poll::Ready(Some(Err(error.into()))),
                    };
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Stream for OpenStream {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let item = self.poll_record(cx);
        if matches!(item, Poll::Ready(Some(Err(_)))) {
            self.failed = true;
        }
        item
    }
}

/// Reads a whole source into memory, up to `limit` bytes.
///
/// # Errors
/// `TooLarge` past the limit, or the source's error.
pub async fn collect(mut source: Source, limit: u64) -> Result<Bytes, BodyError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = source.next().await {
        let chunk = chunk?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Seals a whole `MKE` body: full records, then the final one.
///
/// # Errors
/// As [`records::seal_body`].
pub fn seal_whole(sealer: &mut RecordSealer, body: &[u8]) -> Result<Bytes, BodyError> {
    Ok(Bytes::from(records::seal_body(sealer, body)?))
}

/// Opens a whole `MKE` body of `length` plaintext bytes read from `source`, in whatever records
/// the peer cut it into, through an [`OpenStream`]. Memory stays at `length` plus one record.
///
/// # Errors
/// As [`OpenStream`], and `Transfer` when the plaintext is not `length` bytes long.
pub async fn open_whole(source: Source, opener: RecordOpener, length: u64) -> Result<Bytes, BodyError> {
    let wrong_length =
        |got: u64| BodyError::Transfer(format!("body has {got} bytes, expected the declared {length}"));
    let mut records = OpenStream::new(source, opener);
    let mut parts = Vec::new();
    let mut total = 0u64;
    while let Some(part) = records.next().await {
        let part = part?;
        total += part.len() as u64;
        if total > length {
            return Err(wrong_length(total));
        }
        parts.push(part);
    }
    if total != length {
        return Err(wrong_length(total));
    }
    Ok(join(parts))
}

/// Joins the chunks of a body into one buffer, without a copy when there is only one.
pub fn join(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    }
}

/// Seals a whole `MTE` body: padded to its size bucket, then cut into records.
///
/// # Errors
/// As [`records::seal_body`].
pub fn seal_padded(sealer: &mut RecordSealer, body: &[u8]) -> Result<Bytes, BodyError> {
    Ok(Bytes::from(records::seal_body(sealer, &padding::pad_body(body))?))
}

/// Opens a whole `MTE` body read from `source` (at most `limit` plaintext bytes plus padding).
///
/// # Errors
/// `TooLarge`, or a protocol error when a record or the padding is wrong.
pub async fn open_padded(source: Source, opener: &mut RecordOpener, limit: u64) -> Result<Bytes, BodyError> {
    // Padding can double a body, and each record adds its header and tag.
    let sealed =
        collect(source, records::sealed_body_len(limit.saturating_mul(2).saturating_add(256))).await?;
    let padded = records::open_body(opener, &sealed)?;
    let body = padding::unpad_body(&padded)?;
    if body.len() as u64 > limit {
        return Err(BodyError::TooLarge { limit });
    }
    Ok(Bytes::copy_from_slice(body))
}

/// Maps a body failure seen by relay B on the request to its relay error code.
pub fn request_body_code(error: &BodyError) -> RelayCode {
    match error {
        BodyError::Protocol(error) => RelayCode::from(error),
        BodyError::TooLarge { .. } | BodyError::Transfer(_) => RelayCode::MalformedBody,
    }
}

#[cfg(test)]
mod tests {
    use api_relay_protocol::keys::PairKeys;
    use api_relay_protocol::relay_header::SealFlags;
    use api_relay_protocol::seal::ItemCipher;
    use api_relay_protocol::{ClientIdSigner, Direction, EncodeType, ExchangeContext, PairId};

    use super::*;

    fn cipher() -> ItemCipher {
        let pair_id = PairId::from_bytes([7; 16]);
        let keys = PairKeys::derive(&[1; 32], &[2; 64], &pair_id, &[3; 32]).keys;
        let context = ExchangeContext {
            direction: Direction::Response,
            client_id: ClientIdSigner::new(&[9; 32], None).issue(),
            pair_id,
            seq: 4,
            encode_type: EncodeType::Mke,
            flags: SealFlags { url: true, headers: true, body: true },
        };
        ItemCipher::new(keys.exchange(Direction::Response, EncodeType::Mke, 4), context)
    }

    /// Returns a source that yields `bytes` in pieces of `piece` bytes.
    fn pieces(bytes: &[u8], piece: usize) -> Source {
        let chunks: Vec<Bytes> = bytes.chunks(piece).map(Bytes::copy_from_slice).collect();
        futures_util::stream::iter(chunks.into_iter().map(Ok)).boxed_local()
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|n| (n % 251) as u8).collect()
    }

    #[actix_web::test]
    async fn whole_body_opens_from_any_record_cut() {
        let cipher = cipher();
        for len in [0, 1, 1000, MAX_RECORD_PLAINTEXT, MAX_RECORD_PLAINTEXT + 1] {
            let plain = body(len);
            // Sealed whole: full records and a final one.
            let whole = seal_whole(&mut RecordSealer::new(cipher.clone()), &plain).unwrap();
            let opened = open_whole(pieces(&whole, 7), RecordOpener::new(cipher.clone()), len as u64).await;
            assert_eq!(opened.unwrap(), plain, "{len} bytes sealed whole");

            // Sealed while streaming in pieces of 300 bytes: a record per piece.
            let stream = SealStream::new(pieces(&plain, 300), RecordSealer::new(cipher.clone()), u64::MAX);
            let streamed: Vec<u8> = stream.map(|record| record.unwrap().to_vec()).concat().await;
            let opener = RecordOpener::new(cipher.clone());
            let opened = open_whole(pieces(&streamed, 1024), opener, len as u64).await;
            assert_eq!(opened.unwrap(), plain, "{len} bytes sealed while streaming");
        }
    }

    #[actix_web::test]
    async fn whole_body_of_wrong_length_fails() {
        let cipher = cipher();
        let plain = body(100);
        let whole = seal_whole(&mut RecordSealer::new(cipher.clone()), &plain).unwrap();
        for declared in [0, 99, 101] {
            let opened = open_whole(pieces(&whole, 50), RecordOpener::new(cipher.clone()), declared).await;
            assert!(matches!(opened, Err(BodyError::Transfer(_))), "declared {declared}: {opened:?}");
        }
    }

    #[actix_web::test]
    async fn truncated_or_tampered_whole_body_fails() {
        let cipher = cipher();
        let plain = body(100);
        let whole = seal_whole(&mut RecordSealer::new(cipher.clone()), &plain).unwrap();
        let opener = RecordOpener::new(cipher.clone());
        let truncated = open_whole(pieces(&whole[..whole.len() - 1], 50), opener, 100).await;
        assert!(matches!(truncated, Err(BodyError::Protocol(_))), "{truncated:?}");
        let mut tampered = whole.to_vec();
        tampered[10] ^= 1;
        let opened = open_whole(pieces(&tampered, 50), RecordOpener::new(cipher.clone()), 100).await;
        assert!(matches!(opened, Err(BodyError::Protocol(_))));
    }

    #[actix_web::test]
    async fn single_record_stream_is_whole() {
        let cipher = cipher();
        let plain = body(1000);
        let whole = seal_whole(&mut RecordSealer::new(cipher.clone()), &plain).unwrap();
        let mut stream = OpenStream::new(pieces(&whole, 64), RecordOpener::new(cipher.clone()));
        stream.open_first().await.unwrap();
        assert_eq!(stream.whole().unwrap(), plain);

        // Two records: after the first one opened, the body goes on streaming.
        let mut sealer = RecordSealer::new(cipher.clone());
        let mut two = sealer.seal(&plain[..500], false).unwrap();
        two.extend_from_slice(&sealer.seal(&plain[500..], true).unwrap());
        let mut stream = OpenStream::new(pieces(&two, 64), RecordOpener::new(cipher));
        stream.open_first().await.unwrap();
        assert!(stream.whole().is_none());
        let rest: Vec<u8> = stream.map(|record| record.unwrap().to_vec()).concat().await;
        assert_eq!(rest, plain);
    }
}
