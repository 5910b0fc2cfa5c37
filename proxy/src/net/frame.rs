//! Frontend (client → server) framing after startup: `Byte1 tag`,
//! `Int32 length` (including itself), body. Frames are cut from a read
//! buffer and forwarded as the raw bytes they arrived in; only the few the
//! proxy must understand (Query, Parse, Terminate...) are looked into.
//!
//! Written by hand rather than with pgwire's codec because pgwire decodes
//! every message into owned structs (and panics on some malformed bodies);
//! the hot path needs boundaries only.

use std::borrow::Cow;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(u32),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("invalid message format: {0}")]
    Malformed(&'static str),
}

/// One frontend message: its tag and where it lies in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    pub tag: u8,
    pub start: usize,
    pub len: usize,
}

/// Complete frames read together; `bytes` is exactly their concatenation.
#[derive(Debug, Default)]
pub struct Batch {
    pub bytes: BytesMut,
    pub frames: Vec<FrameRef>,
}

impl Batch {
    pub fn body(&self, f: &FrameRef) -> &[u8] {
        &self.bytes[f.start + 5..f.start + f.len]
    }
}

/// A message at least this big is passed on as it arrives (its start,
/// then the rest read straight from the client) instead of being buffered
/// whole, so a session's memory stays bounded however big the rows a
/// client copies in, the query it sends, the parameters it binds or the
/// arguments of a function it calls: CopyData, Query, Parse, Bind and
/// FunctionCall. The proxy reads only the start of a Query, Parse or Bind
/// that big ([`STREAM_HEAD`]). The other messages a client sends are small
/// by nature; they are held whole, up to `max_message_size`.
pub const STREAM_AT: usize = 256 * 1024;

/// How much of a streamed Query, Parse or Bind is buffered before it is
/// handed over: enough for its names and the start of its SQL.
pub const STREAM_HEAD: usize = 64 * 1024;

/// Whether a message of this kind and size is streamed ([`STREAM_AT`]).
pub fn streams(tag: u8, total: usize) -> bool {
    total >= STREAM_AT && matches!(tag, b'd' | b'Q' | b'P' | b'B' | b'F')
}

/// What [`FrameReader::next_read`] found.
#[derive(Debug)]
pub enum Read {
    /// Whole frames.
    Batch(Batch),
    /// The start of a big frame ([`streams`]; header included, as buffered
    /// so far, at least [`STREAM_HEAD`] bytes of a Query, Parse or Bind);
    /// `remaining` bytes of it are still to be read from the client.
    Stream { head: BytesMut, remaining: usize },
}

pub struct FrameReader {
    buf: BytesMut,
    max_message_size: usize,
}

impl FrameReader {
    pub fn new(max_message_size: usize) -> Self {
        FrameReader { buf: BytesMut::with_capacity(16 * 1024), max_message_size }
    }

    /// Applies to frames not yet cut (a reload changes it for open sessions).
    pub fn set_max_message_size(&mut self, max_message_size: usize) {
        self.max_message_size = max_message_size;
    }

    /// Reads until at least one whole frame is buffered and returns every
    /// whole frame buffered. `Ok(None)`: the client closed cleanly between
    /// messages.
    pub async fn next_batch<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Option<Batch>, FrameIoError> {
        loop {
            if let Some(batch) = self.split_batch()? {
                return Ok(Some(batch));
            }
            if let Some(need) = self.pending_frame_len() {
                self.buf.reserve(need.saturating_sub(self.buf.len()).min(1 << 20));
            } else if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            let n = r.read_buf(&mut self.buf).await.map_err(FrameIoError::Io)?;
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated.into()) };
            }
        }
    }

    /// Like [`FrameReader::next_batch`], but a big frame at the head of the
    /// buffer ([`streams`]) is handed over before it is complete.
    pub async fn next_read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Option<Read>, FrameIoError> {
        loop {
            if let Some(batch) = self.split_batch()? {
                return Ok(Some(Read::Batch(batch)));
            }
            if let Some(total) = self.pending_frame_len().filter(|&t| streams(self.buf[0], t)) {
                if total > self.max_message_size {
                    return Err(FrameError::TooLarge { size: total, limit: self.max_message_size }.into());
                }
                let head_wanted = if matches!(self.buf[0], b'd' | b'F') { 0 } else { STREAM_HEAD };
                if self.buf.len() >= head_wanted {
                    let head = self.buf.split_to(self.buf.len().min(total));
                    return Ok(Some(Read::Stream { remaining: total - head.len(), head }));
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            let n = r.read_buf(&mut self.buf).await.map_err(FrameIoError::Io)?;
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated.into()) };
            }
        }
    }

    /// Length of the frame at the head of the buffer, if its header is in.
    fn pending_frame_len(&self) -> Option<usize> {
        (self.buf.len() >= 5).then(|| 1 + u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize)
    }

    /// Appends bytes as if read from the client (tests and fuzzing).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Cuts every complete frame off the buffer, validating lengths.
    pub fn split_batch(&mut self) -> Result<Option<Batch>, FrameError> {
        let mut frames = Vec::new();
        let mut pos = 0;
        while self.buf.len() - pos >= 5 {
            let tag = self.buf[pos];
            let len = u32::from_be_bytes([self.buf[pos + 1], self.buf[pos + 2], self.buf[pos + 3], self.buf[pos + 4]]);
            if len < 4 {
                return Err(FrameError::BadLength(len));
            }
            let total = 1 + len as usize;
            if total > self.max_message_size {
                return Err(FrameError::TooLarge { size: total, limit: self.max_message_size });
            }
            if self.buf.len() - pos < total {
                break;
            }
            frames.push(FrameRef { tag, start: pos, len: total });
            pos += total;
        }
        if frames.is_empty() {
            return Ok(None);
        }
        Ok(Some(Batch { bytes: self.buf.split_to(pos), frames }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(std::io::Error),
}

/// Reads one whole message of any kind (used during authentication, where
/// the proxy reads exactly one PasswordMessage at a time).
pub async fn read_one<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<(u8, BytesMut), FrameIoError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await.map_err(eof_as_truncated)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len).into());
    }
    if 1 + len as usize > limit {
        return Err(FrameError::TooLarge { size: 1 + len as usize, limit }.into());
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await.map_err(eof_as_truncated)?;
    Ok((head[0], body))
}

fn eof_as_truncated(e: std::io::Error) -> FrameIoError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated.into()
    } else {
        FrameIoError::Io(e)
    }
}

/// Bounds-checked reader over a message body, for the messages the proxy
/// looks into. Every accessor fails instead of panicking on short input.
pub struct BodyReader<'a>(&'a [u8]);

impl<'a> BodyReader<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        BodyReader(body)
    }
    pub fn cstr(&mut self) -> Result<&'a str, FrameError> {
        std::str::from_utf8(self.cbytes()?).map_err(|_| FrameError::Malformed("invalid UTF-8"))
    }
    /// A string as its bytes, in whatever encoding the client uses.
    pub fn cbytes(&mut self) -> Result<&'a [u8], FrameError> {
        let end = self.0.iter().position(|&b| b == 0).ok_or(FrameError::Malformed("missing string terminator"))?;
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
    pub fn i32(&mut self) -> Result<i32, FrameError> {
        if self.0.len() < 4 {
            return Err(FrameError::Malformed("message too short"));
        }
        Ok(self.0.get_i32())
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Malformed("message too short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A whole message: tag, length word, body (for messages passed on or
/// built from parts).
pub fn frame(tag: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The SQL text of a Query ('Q') body.
pub fn query_text(body: &[u8]) -> Result<Cow<'_, str>, FrameError> {
    let mut r = BodyReader::new(body);
    let q = r.cbytes()?;
    if !r.is_empty() {
        return Err(FrameError::Malformed("data after the query string"));
    }
    Ok(sql_text(q))
}

/// The SQL text of a Parse ('P') body: statement name, then query.
pub fn parse_text(body: &[u8]) -> Result<Cow<'_, str>, FrameError> {
    let mut r = BodyReader::new(body);
    r.cbytes()?;
    Ok(sql_text(r.cbytes()?))
}

/// SQL as the proxy reads it: the text itself when it is UTF-8; in a
/// client encoding that is not (`SET client_encoding TO latin9`), one
/// char per byte — its keywords, quotes and semicolons, all ASCII in
/// every client encoding PostgreSQL accepts, stay where they were, and a
/// part of it goes back to the node byte for byte ([`sql_bytes`]).
pub fn sql_text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytes.iter().map(|&b| b as char).collect()),
    }
}

/// The bytes of `sql`, read by [`sql_text`] one char per byte when
/// `bytewise` (else its UTF-8).
pub fn sql_bytes(sql: &str, bytewise: bool) -> Vec<u8> {
    if bytewise {
        sql.chars().map(|c| c as u32 as u8).collect()
    } else {
        sql.as_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        frame(tag, body).to_vec()
    }

    #[test]
    fn sql_in_any_client_encoding_goes_back_byte_for_byte() {
        assert!(matches!(sql_text("select 'é'".as_bytes()), Cow::Borrowed("select 'é'")));
        let latin9 = b"insert into t values ('caf\xe9 \xa4'); commit";
        let text = sql_text(latin9);
        assert!(matches!(text, Cow::Owned(_)));
        let cut = text.find(';').unwrap();
        let byte = latin9.iter().position(|&b| b == b';').unwrap();
        assert_eq!(sql_bytes(&text[..cut], true), latin9[..byte].to_vec(), "a part cut at its ASCII goes back as it came");
        assert_eq!(sql_bytes(&text[cut..], true), latin9[byte..].to_vec());
        assert_eq!(sql_bytes("select 'é'", false), "select 'é'".as_bytes());
    }

    #[tokio::test]
    async fn batches_whole_frames_and_keeps_the_rest() {
        let mut wire = msg(b'Q', b"select 1\0");
        wire.extend(msg(b'S', b""));
        let partial = msg(b'P', b"\0select 2\0\0\0");
        wire.extend_from_slice(&partial[..4]);
        let mut r = FrameReader::new(1 << 20);
        let mut src: &[u8] = &wire;
        let b = r.next_batch(&mut src).await.unwrap().unwrap();
        assert_eq!(b.frames.len(), 2);
        assert_eq!(b.frames[0].tag, b'Q');
        assert_eq!(query_text(b.body(&b.frames[0])).unwrap(), "select 1");
        assert_eq!(b.frames[1], FrameRef { tag: b'S', start: 14, len: 5 });
        assert_eq!(&b.bytes[..], &wire[..19], "raw bytes are forwarded untouched");
        // The partial Parse is an error at EOF, not a silent drop.
        assert!(matches!(r.next_batch(&mut src).await, Err(FrameIoError::Frame(FrameError::Truncated))));
    }

    #[tokio::test]
    async fn clean_eof_between_messages() {
        let mut r = FrameReader::new(1024);
        let mut src: &[u8] = &[];
        assert!(r.next_batch(&mut src).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_big_copy_data_frame_is_handed_over_before_it_is_complete() {
        let mut bytes = frame(b'Q', b"copy t from stdin\0").to_vec();
        let big = vec![7u8; STREAM_AT * 3];
        bytes.extend_from_slice(&frame(b'd', &big));
        bytes.extend_from_slice(&frame(b'c', b""));
        let mut src: &[u8] = &bytes;
        let mut r = FrameReader::new(1 << 30);
        // The Query comes whole, alone.
        match r.next_read(&mut src).await.unwrap().unwrap() {
            Read::Batch(b) => assert_eq!(b.frames.iter().map(|f| f.tag).collect::<Vec<_>>(), [b'Q']),
            other => panic!("{other:?}"),
        }
        // Then the CopyData's start, with what is left to read of it.
        let Read::Stream { head, remaining } = r.next_read(&mut src).await.unwrap().unwrap() else { panic!("not streamed") };
        assert_eq!(&head[..5], &frame(b'd', &big)[..5]);
        assert_eq!(head.len() + remaining, 5 + big.len());
        assert!(head.len() < 5 + big.len(), "not buffered whole");
        // The caller reads `remaining` bytes itself; then framing goes on.
        let mut rest = vec![0u8; remaining];
        tokio::io::AsyncReadExt::read_exact(&mut src, &mut rest).await.unwrap();
        match r.next_read(&mut src).await.unwrap().unwrap() {
            Read::Batch(b) => assert_eq!(b.frames.iter().map(|f| f.tag).collect::<Vec<_>>(), [b'c']),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_big_query_is_handed_over_with_its_start_only() {
        let sql = format!("insert into t values ('{}')\0", "x".repeat(STREAM_AT * 2));
        let mut bytes = frame(b'Q', sql.as_bytes()).to_vec();
        bytes.extend_from_slice(&frame(b'S', b""));
        let mut src: &[u8] = &bytes;
        let mut r = FrameReader::new(1 << 30);
        let Read::Stream { head, remaining } = r.next_read(&mut src).await.unwrap().unwrap() else { panic!("not streamed") };
        assert!(head.len() >= STREAM_HEAD, "enough to classify it: {}", head.len());
        assert!(remaining > 0, "not buffered whole");
        assert_eq!(head.len() + remaining, 5 + sql.len());
        assert!(head[5..].starts_with(b"insert into t"));
        // Under the streaming size: whole, as before.
        let small = frame(b'B', &vec![1u8; STREAM_AT - 100]).to_vec();
        let mut src: &[u8] = &small;
        let mut r = FrameReader::new(1 << 30);
        assert!(matches!(r.next_read(&mut src).await.unwrap().unwrap(), Read::Batch(_)));
        // Over the session's limit: refused before anything is streamed.
        let mut src: &[u8] = &bytes;
        let mut r = FrameReader::new(STREAM_AT);
        assert!(matches!(r.next_read(&mut src).await, Err(FrameIoError::Frame(FrameError::TooLarge { .. }))));
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut r = FrameReader::new(1024);
        r.buf.extend_from_slice(&[b'Q', 0, 0, 0, 3]);
        assert_eq!(r.split_batch().unwrap_err(), FrameError::BadLength(3));
        let mut r = FrameReader::new(1024);
        r.buf.extend_from_slice(&[b'Q', 0, 1, 0, 0]);
        assert!(matches!(r.split_batch().unwrap_err(), FrameError::TooLarge { size: 65537, limit: 1024 }));
    }

    #[test]
    fn body_reader_never_panics_on_short_input() {
        assert!(query_text(b"no terminator").is_err());
        assert!(query_text(b"a\0b").is_err());
        assert!(parse_text(b"stmt\0").is_err());
        assert_eq!(parse_text(b"s1\0select $1\0\0\0").unwrap(), "select $1");
        let mut r = BodyReader::new(&[0, 0]);
        assert!(r.i32().is_err());
        assert!(r.bytes(3).is_err());
    }
}
