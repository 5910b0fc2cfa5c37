//! The first packet of a PostgreSQL connection. It has no type byte:
//! `Int32 length` (including itself), `Int32 code`, then a body that depends
//! on the code. See "Message Formats" in the PostgreSQL manual.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// PostgreSQL refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET: usize = 10_000;
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    /// A protocol 3.x StartupMessage: its parameters in order (protocol
    /// options, `_pq_.*`, left out), the minor version the client asked
    /// for and the protocol options it named, and the raw packet. The
    /// proxy speaks 3.0 and knows no protocol option: when `minor` > 0 or
    /// `protocol_options` is not empty it answers NegotiateProtocolVersion
    /// first, as PostgreSQL 15 does, and the session goes on in 3.0.
    Startup { params: Vec<(String, String)>, minor: u32, protocol_options: Vec<String>, raw: BytesMut },
}

impl StartupPacket {
    /// Whether the client must hear NegotiateProtocolVersion before
    /// anything else: it asked for a newer minor version or for protocol
    /// options.
    pub fn needs_negotiation(&self) -> bool {
        matches!(self, StartupPacket::Startup { minor, protocol_options, .. } if *minor > 0 || !protocol_options.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("connection closed before the startup packet")]
    Closed,
    #[error("invalid startup packet length {0}")]
    BadLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u32, minor: u32 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, StartupError> {
    let mut len_buf = [0u8; 4];
    match r.read_exact(&mut len_buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(StartupError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let mut raw = BytesMut::with_capacity(len);
    raw.extend_from_slice(&len_buf);
    raw.resize(len, 0);
    r.read_exact(&mut raw[4..]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StartupError::Malformed("truncated packet")
        } else {
            e.into()
        }
    })?;
    parse_startup(raw)
}

/// Parses a complete startup packet (length prefix included).
pub fn parse_startup(raw: BytesMut) -> Result<StartupPacket, StartupError> {
    if raw.len() < 8 || u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize != raw.len() {
        return Err(StartupError::BadLength(raw.len()));
    }
    let mut body = &raw[4..];
    let code = body.get_u32();
    match code {
        SSL_REQUEST if body.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST if body.is_empty() => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST if body.len() == 8 => {
            let pid = body.get_i32();
            let secret = body.get_i32();
            Ok(StartupPacket::Cancel { pid, secret })
        }
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(StartupError::Malformed("bad request length")),
        // 3.x: PostgreSQL 15 accepts any minor version and offers 3.0.
        _ if code >> 16 == 3 && code != SSL_REQUEST && code != GSSENC_REQUEST && code != CANCEL_REQUEST => {
            let (params, protocol_options): (Vec<_>, Vec<_>) = parse_params(body)?.into_iter().partition(|(k, _)| !k.starts_with("_pq_."));
            let protocol_options = protocol_options.into_iter().map(|(k, _)| k).collect();
            Ok(StartupPacket::Startup { params, minor: code & 0xffff, protocol_options, raw })
        }
        other => Err(StartupError::UnsupportedProtocol { major: other >> 16, minor: other & 0xffff }),
    }
}

/// `name\0value\0 ... \0`
fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstr(&mut body)?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut body)?;
        params.push((name, value));
    }
    if !body.is_empty() {
        return Err(StartupError::Malformed("data after the final terminator"));
    }
    if !params.iter().any(|(k, _)| k == "user") {
        return Err(StartupError::NoUser);
    }
    Ok(params)
}

fn take_cstr(body: &mut &[u8]) -> Result<String, StartupError> {
    let end = body.iter().position(|&b| b == 0).ok_or(StartupError::Malformed("missing terminator"))?;
    let s = std::str::from_utf8(&body[..end]).map_err(|_| StartupError::Malformed("invalid UTF-8"))?;
    let s = s.to_owned();
    *body = &body[end + 1..];
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn parses_startup_params() {
        let p = parse_startup(packet(PROTOCOL_3_0, b"user\0bob\0database\0db\0\0")).unwrap();
        match p {
            StartupPacket::Startup { params, .. } => {
                assert_eq!(params, vec![("user".into(), "bob".into()), ("database".into(), "db".into())]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_missing_user_and_bad_terminators() {
        assert!(parse_startup(packet(PROTOCOL_3_0, b"database\0db\0\0")).is_err());
        assert!(parse_startup(packet(PROTOCOL_3_0, b"user\0bob")).is_err());
        assert!(parse_startup(packet(PROTOCOL_3_0, b"user\0bob\0\0junk")).is_err());
    }

    #[test]
    fn parses_requests() {
        assert_eq!(parse_startup(packet(SSL_REQUEST, b"")).unwrap(), StartupPacket::SslRequest);
        assert_eq!(parse_startup(packet(GSSENC_REQUEST, b"")).unwrap(), StartupPacket::GssEncRequest);
        let mut body = Vec::new();
        body.extend_from_slice(&7i32.to_be_bytes());
        body.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(
            parse_startup(packet(CANCEL_REQUEST, &body)).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: 9 }
        );
        assert!(parse_startup(packet(SSL_REQUEST, b"x")).is_err());
    }

    #[test]
    fn short_or_inconsistent_packets_are_errors() {
        assert!(parse_startup(BytesMut::from(&[0u8, 0, 0][..])).is_err());
        assert!(parse_startup(BytesMut::from(&[0u8, 0, 0, 9, 0, 3, 0, 0][..])).is_err());
    }

    #[test]
    fn a_newer_minor_version_or_protocol_options_ask_for_negotiation() {
        let plain = parse_startup(packet(PROTOCOL_3_0, b"user\0bob\0\0")).unwrap();
        assert!(!plain.needs_negotiation());
        let newer = parse_startup(packet(PROTOCOL_3_0 + 2, b"user\0bob\0\0")).unwrap();
        assert!(newer.needs_negotiation());
        match parse_startup(packet(PROTOCOL_3_0, b"user\0bob\0_pq_.opt\0x\0database\0db\0\0")).unwrap() {
            p @ StartupPacket::Startup { .. } => {
                assert!(p.needs_negotiation());
                let StartupPacket::Startup { params, protocol_options, minor, .. } = p else { unreachable!() };
                assert_eq!(params, vec![("user".into(), "bob".into()), ("database".into(), "db".into())]);
                assert_eq!(protocol_options, vec!["_pq_.opt".to_string()]);
                assert_eq!(minor, 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_startup(packet(PROTOCOL_3_0, b"database\0db\0\0")), Err(StartupError::NoUser)));
    }

    #[test]
    fn rejects_other_protocols() {
        assert!(matches!(
            parse_startup(packet(2 << 16, b"")),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        ));
    }

    #[tokio::test]
    async fn bounds_length() {
        let mut huge: &[u8] = &[0, 1, 0, 0, 0, 3, 0, 0];
        assert!(matches!(read_startup(&mut huge).await, Err(StartupError::BadLength(_))));
        let mut short: &[u8] = &[0, 0, 0, 4];
        assert!(matches!(read_startup(&mut short).await, Err(StartupError::BadLength(4))));
        let mut truncated: &[u8] = &[0, 0, 0, 20, 0, 3, 0, 0];
        assert!(matches!(read_startup(&mut truncated).await, Err(StartupError::Malformed(_))));
    }
}
