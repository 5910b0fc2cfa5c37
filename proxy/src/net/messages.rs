//! The messages the proxy writes itself (its own errors, authentication,
//! key data, the admin console's result sets), encoded with pgwire's
//! message types. Everything a node sends is forwarded as raw bytes instead.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey};
use pgwire::messages::Message;

/// OID of `text`: every admin-console column is text.
const TEXT_OID: u32 = 25;

fn encode<M: Message>(m: M) -> BytesMut {
    let mut buf = BytesMut::new();
    // Encoding into a growable buffer cannot fail for these types.
    m.encode(&mut buf).expect("encoding a backend message");
    buf
}

/// An error the proxy raises, shaped like PostgreSQL's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl PgError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError { severity: "FATAL", code, message: message.into(), hint: None }
    }
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        PgError { severity: "ERROR", code, message: message.into(), hint: None }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn encode(&self) -> BytesMut {
        let mut fields = vec![
            (b'S', self.severity.to_string()),
            (b'V', self.severity.to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        encode(ErrorResponse::new(fields))
    }
}

/// An ERROR with a SQLSTATE known only at run time (a node's own).
pub fn error_response(code: &str, message: &str, hint: Option<&str>) -> BytesMut {
    let mut fields = vec![(b'S', "ERROR".to_string()), (b'V', "ERROR".to_string()), (b'C', code.to_string()), (b'M', message.to_string())];
    if let Some(h) = hint {
        fields.push((b'H', h.to_string()));
    }
    encode(ErrorResponse::new(fields))
}

/// A WARNING notice, as PostgreSQL sends one.
pub fn warning(code: &str, message: &str) -> BytesMut {
    let fields = vec![(b'S', "WARNING".to_string()), (b'V', "WARNING".to_string()), (b'C', code.to_string()), (b'M', message.to_string())];
    encode(NoticeResponse::new(fields))
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

pub fn auth_ok() -> BytesMut {
    encode(Authentication::Ok)
}
pub fn auth_md5(salt: [u8; 4]) -> BytesMut {
    encode(Authentication::MD5Password(salt.to_vec()))
}
pub fn auth_sasl(mechanisms: &[&str]) -> BytesMut {
    encode(Authentication::SASL(mechanisms.iter().map(|s| s.to_string()).collect()))
}
pub fn auth_sasl_continue(data: &[u8]) -> BytesMut {
    encode(Authentication::SASLContinue(bytes::Bytes::copy_from_slice(data)))
}
pub fn auth_sasl_final(data: &[u8]) -> BytesMut {
    encode(Authentication::SASLFinal(bytes::Bytes::copy_from_slice(data)))
}
pub fn parameter_status(name: &str, value: &str) -> BytesMut {
    encode(ParameterStatus::new(name.into(), value.into()))
}
/// PostgreSQL 15's answer to a startup packet asking for a newer minor
/// version or naming protocol options: it speaks 3.0 (the field holds
/// the whole version number, as PostgreSQL 15 sends it) and knows none
/// of the options.
pub fn negotiate_protocol_version(options: &[String]) -> BytesMut {
    encode(NegotiateProtocolVersion::new(crate::startup::PROTOCOL_3_0 as i32, options.to_vec()))
}
pub fn backend_key_data(pid: i32, secret: i32) -> BytesMut {
    encode(BackendKeyData::new(pid, SecretKey::I32(secret)))
}
pub fn ready_for_query(status: u8) -> BytesMut {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(ReadyForQuery::new(status))
}
pub fn command_complete(tag: &str) -> BytesMut {
    encode(CommandComplete::new(tag.into()))
}

/// RowDescription + DataRows + CommandComplete for a text result set.
pub fn result_set(columns: &[&str], rows: &[Vec<String>]) -> BytesMut {
    let fields = columns
        .iter()
        .map(|name| FieldDescription::new((*name).into(), 0, 0, TEXT_OID, -1, -1, 0))
        .collect();
    let mut out = encode(RowDescription::new(fields));
    for row in rows {
        let mut data = BytesMut::new();
        for v in row {
            data.put_i32(v.len() as i32);
            data.put_slice(v.as_bytes());
        }
        out.extend_from_slice(&encode(DataRow::new(data, row.len() as i16)));
    }
    out.extend_from_slice(&command_complete(&format!("SHOW {}", rows.len())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_layout() {
        let e = PgError::fatal("28P01", "password authentication failed for user \"x\"").encode();
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert_eq!(crate::net::scan::sqlstate(&e[5..]).as_deref(), Some("28P01"));
        assert_eq!(*e.last().unwrap(), 0);
    }

    #[test]
    fn result_set_is_well_framed() {
        let rs = result_set(&["a", "b"], &[vec!["1".into(), "x".into()]]);
        let mut s = crate::net::scan::BackendScanner::default();
        let mut ev = crate::net::scan::Events::default();
        s.feed(&rs, &mut ev).unwrap();
        assert!(s.at_boundary());
        assert_eq!(rs[0], b'T');
        assert_eq!(&ready_for_query(b'T')[..], &[b'Z', 0, 0, 0, 5, b'T']);
    }
}
