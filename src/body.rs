//! Bodies on the hop between the relays: plaintext streams in, sealed records out, and back.
//!
//! `SealStream` turns a plaintext body into record frames as bytes arrive: it emits a full record
//! every 64 KiB and flushes a shorter one whenever the source has nothing ready, so neither
//! latency nor memory grows with the body. `OpenStream` does the reverse and fails the body at
//! the first record that does not authenticate. `MTE` bodies are buffered whole instead, because
//! padding hides the total length.

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

    /// Whether the body is complete and empty: no record with data was opened.
    pub fn is_empty_and_finished(&self) -> bool {
        self.first.is_none() && self.opener.is_finished()
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
