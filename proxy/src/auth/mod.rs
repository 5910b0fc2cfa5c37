//! Client authentication at the proxy: the users file and the password
//! exchanges (SCRAM-SHA-256 in [`scram`], md5 here). In `passthrough` mode
//! none of this runs: the node authenticates the client through the proxy
//! (see [`crate::backend`]).

pub mod scram;

use crate::config::AuthMethod;
use crate::net::frame::{read_one, BodyReader};
use crate::net::messages::{self, PgError};
use md5::{Digest, Md5};
use std::collections::HashMap;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Authentication messages are small; anything bigger is an attack or a bug.
const AUTH_MESSAGE_LIMIT: usize = 8192;

/// A user's secret as stored in the users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(scram::Verifier),
    /// `md5` + hex(md5(password || user)), as in pg_authid.
    Md5(String),
    Plain(String),
}

#[derive(Debug, Clone, Default)]
pub struct Users(HashMap<String, Secret>);

impl Users {
    pub fn load(path: &Path) -> anyhow::Result<Users> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Users::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// PgBouncer's userlist.txt format: `"name" "secret"` per line, `;` or
    /// `#` comments, `""` for a quote inside a field.
    pub fn parse(text: &str) -> anyhow::Result<Users> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let fields = quoted_fields(line).ok_or_else(|| anyhow::anyhow!("line {}: expected \"user\" \"secret\"", i + 1))?;
            let [name, secret]: [String; 2] =
                fields.try_into().map_err(|_| anyhow::anyhow!("line {}: expected two quoted fields", i + 1))?;
            let secret = if secret.starts_with("SCRAM-SHA-256$") {
                Secret::Scram(scram::Verifier::parse(&secret).ok_or_else(|| anyhow::anyhow!("line {}: malformed SCRAM verifier", i + 1))?)
            } else if secret.len() == 35 && secret.starts_with("md5") && secret[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
                Secret::Md5(secret)
            } else {
                Secret::Plain(secret)
            };
            users.insert(name, secret);
        }
        Ok(Users(users))
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.0.get(user)
    }
}

fn quoted_fields(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(out),
            Some('"') => {}
            Some(_) => return None,
        }
        let mut field = String::new();
        loop {
            match chars.next()? {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => break,
                c => field.push(c),
            }
        }
        out.push(field);
    }
}

fn auth_failed(user: &str, method: &str) -> PgError {
    PgError::fatal("28P01", format!("{method} authentication failed for user \"{user}\""))
}

/// Runs the configured exchange with the client. On success returns the
/// user's plain password if the proxy learnt it (for logging in to nodes).
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: AuthMethod,
    users: &Users,
    user: &str,
) -> Result<Option<String>, AuthError> {
    let secret = users.get(user);
    let plain = match secret {
        Some(Secret::Plain(p)) => Some(p.clone()),
        _ => None,
    };
    match method {
        AuthMethod::Trust | AuthMethod::Passthrough => Ok(plain),
        AuthMethod::Md5 if !matches!(secret, Some(Secret::Scram(_))) => {
            let salt: [u8; 4] = rand::random();
            stream.write_all(&messages::auth_md5(salt)).await?;
            let body = read_password_message(stream).await?;
            let mut r = BodyReader::new(&body);
            let answer = r.cstr().map_err(|_| PgError::fatal("08P01", "invalid password packet"))?;
            let stored = match secret {
                Some(Secret::Md5(h)) => Some(h.clone()),
                Some(Secret::Plain(p)) => Some(md5_secret(user, p)),
                _ => None,
            };
            match stored {
                Some(stored) if subtle_eq(md5_response(&stored, salt).as_bytes(), answer.as_bytes()) => Ok(plain),
                _ => Err(auth_failed(user, "password").into()),
            }
        }
        AuthMethod::Md5 | AuthMethod::ScramSha256 => {
            let verifier = match secret {
                Some(Secret::Scram(v)) => Some(v.clone()),
                Some(Secret::Plain(p)) => Some(scram::Verifier::from_password(p)),
                // An md5 secret cannot do SCRAM; fail like an unknown user.
                _ => None,
            };
            scram::exchange(stream, user, verifier.as_ref()).await?;
            Ok(plain)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Pg(#[from] PgError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl std::error::Error for PgError {}

/// Reads one PasswordMessage ('p') body.
pub(crate) async fn read_password_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<bytes::BytesMut, AuthError> {
    match read_one(stream, AUTH_MESSAGE_LIMIT).await {
        Ok((b'p', body)) => Ok(body),
        Ok((tag, _)) => Err(PgError::fatal("08P01", format!("expected password response, got message type {}", tag as char)).into()),
        Err(crate::net::frame::FrameIoError::Io(e)) => Err(e.into()),
        Err(crate::net::frame::FrameIoError::Frame(e)) => Err(PgError::fatal("08P01", format!("invalid password packet: {e}")).into()),
    }
}

pub fn md5_secret(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{:x}", h.finalize())
}

/// What a client answers to an md5 challenge, given the stored secret.
fn md5_response(stored: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(&stored.as_bytes()[3..]);
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_formats() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        let text = format!("; comment\n\"alice\" \"{v}\"\n\"bob\" \"{}\"\n\"c\"\"q\" \"plain pw\"\n", md5_secret("bob", "pw"));
        let u = Users::parse(&text).unwrap();
        assert!(matches!(u.get("alice"), Some(Secret::Scram(_))));
        assert_eq!(u.get("bob"), Some(&Secret::Md5(md5_secret("bob", "pw"))));
        assert_eq!(u.get("c\"q"), Some(&Secret::Plain("plain pw".into())));
        assert!(Users::parse("alice pw").is_err());
        assert!(Users::parse("\"a\" \"SCRAM-SHA-256$x\"").is_err());
    }

    #[test]
    fn md5_matches_libpq() {
        let salt = [1, 2, 3, 4];
        let expected = postgres_protocol::authentication::md5_hash(b"bob", b"pw", salt);
        assert_eq!(md5_response(&md5_secret("bob", "pw"), salt), expected);
    }
}
