//! Server side of SCRAM-SHA-256 (RFC 5802 / 7677) against verifiers in
//! PostgreSQL's pg_authid format.
//!
//! Written here because the SCRAM crates we found implement the server from
//! a salted password; PostgreSQL verifiers hold only StoredKey and
//! ServerKey. The cryptographic primitives (HMAC, SHA-256, base64, constant
//! time comparison) come from maintained crates; only the message exchange
//! is ours. No channel binding is offered (SCRAM-SHA-256 without -PLUS).

use super::{read_password_message, AuthError};
use crate::net::frame::BodyReader;
use crate::net::messages::{self, PgError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub const MECHANISM: &str = "SCRAM-SHA-256";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl Verifier {
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let v = Verifier {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        };
        (v.stored_key.len() == 32 && v.server_key.len() == 32 && v.iterations > 0).then_some(v)
    }

    pub fn from_password(password: &str) -> Verifier {
        Verifier::parse(&postgres_protocol::password::scram_sha_256(password.as_bytes()))
            .expect("postgres-protocol produces valid verifiers")
    }

    /// A verifier nobody can satisfy, so an unknown user sees the same
    /// exchange as a known one and fails only at the end (as PostgreSQL does).
    fn mock(user: &str) -> Verifier {
        let salt = Sha256::digest(format!("mtm-mock-salt:{user}")).to_vec();
        Verifier { iterations: 4096, salt: salt[..16].to_vec(), stored_key: vec![0; 32], server_key: vec![0; 32] }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn protocol_error(msg: &str) -> AuthError {
    PgError::fatal("08P01", msg.to_string()).into()
}

/// The state between the client's first and final messages.
#[derive(Debug)]
pub struct ServerExchange {
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// Parses client-first-message and builds server-first-message.
pub fn server_first(client_first: &str, verifier: &Verifier, server_nonce: &str) -> Result<ServerExchange, &'static str> {
    let mut parts = client_first.splitn(3, ',');
    let flag = parts.next().ok_or("malformed SCRAM message")?;
    let authzid = parts.next().ok_or("malformed SCRAM message")?;
    let bare = parts.next().ok_or("malformed SCRAM message")?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err("channel binding is not supported by this server"),
        _ => return Err("malformed SCRAM message (unexpected channel-binding flag)"),
    }
    if !authzid.is_empty() {
        return Err("client uses authorization identity, but it is not supported");
    }
    let client_nonce = bare
        .split(',')
        .find_map(|kv| kv.strip_prefix("r="))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
        .ok_or("malformed SCRAM message (nonce)")?;
    let nonce = format!("{client_nonce}{server_nonce}");
    let server_first = format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
    Ok(ServerExchange {
        gs2_header: format!("{flag},{authzid},"),
        client_first_bare: bare.to_string(),
        server_first,
        nonce,
    })
}

/// Checks client-final-message. Ok(Some(server-final)) when the proof is
/// right, Ok(None) when it is wrong, Err for a malformed message.
pub fn server_final(ex: &ServerExchange, client_final: &str, verifier: &Verifier) -> Result<Option<String>, &'static str> {
    let (without_proof, proof_b64) = client_final.rsplit_once(",p=").ok_or("malformed SCRAM message (no proof)")?;
    let mut binding = None;
    let mut nonce = None;
    for kv in without_proof.split(',') {
        if let Some(v) = kv.strip_prefix("c=") {
            binding = Some(v);
        } else if let Some(v) = kv.strip_prefix("r=") {
            nonce = Some(v);
        }
    }
    if binding != Some(B64.encode(&ex.gs2_header).as_str()) {
        return Err("SCRAM channel binding check failed");
    }
    if nonce != Some(ex.nonce.as_str()) {
        return Err("SCRAM nonce mismatch");
    }
    let proof = B64.decode(proof_b64).map_err(|_| "malformed SCRAM message (proof)")?;
    if proof.len() != 32 {
        return Err("malformed SCRAM message (proof length)");
    }
    let auth_message = format!("{},{},{}", ex.client_first_bare, ex.server_first, without_proof);
    let client_signature = hmac(&verifier.stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof.iter().zip(&client_signature).map(|(a, b)| a ^ b).collect();
    let ok = {
        use subtle::ConstantTimeEq;
        bool::from(Sha256::digest(&client_key).as_slice().ct_eq(&verifier.stored_key))
    };
    if !ok {
        return Ok(None);
    }
    let server_signature = hmac(&verifier.server_key, auth_message.as_bytes());
    Ok(Some(format!("v={}", B64.encode(server_signature))))
}

/// The whole exchange with a client. `verifier` None: unknown user (or
/// one without a usable secret): the exchange runs and fails at the end.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    verifier: Option<&Verifier>,
) -> Result<(), AuthError> {
    let mock = Verifier::mock(user);
    let v = verifier.unwrap_or(&mock);
    stream.write_all(&messages::auth_sasl(&[MECHANISM])).await?;

    let body = read_password_message(stream).await?;
    let mut r = BodyReader::new(&body);
    let mechanism = r.cstr().map_err(|_| protocol_error("malformed SASLInitialResponse"))?;
    if mechanism != MECHANISM {
        return Err(protocol_error("client selected an invalid SASL authentication mechanism"));
    }
    let len = r.i32().map_err(|_| protocol_error("malformed SASLInitialResponse"))?;
    let data = usize::try_from(len)
        .ok()
        .and_then(|n| r.bytes(n).ok())
        .ok_or_else(|| protocol_error("malformed SASLInitialResponse"))?;
    let client_first = std::str::from_utf8(data).map_err(|_| protocol_error("malformed SCRAM message"))?;
    let server_nonce = B64.encode(rand::random::<[u8; 18]>());
    let ex = server_first(client_first, v, &server_nonce).map_err(protocol_error)?;
    stream.write_all(&messages::auth_sasl_continue(ex.server_first.as_bytes())).await?;

    let body = read_password_message(stream).await?;
    let client_final = std::str::from_utf8(&body).map_err(|_| protocol_error("malformed SCRAM message"))?;
    match server_final(&ex, client_final, v).map_err(protocol_error)? {
        Some(final_msg) if verifier.is_some() => {
            stream.write_all(&messages::auth_sasl_final(final_msg.as_bytes())).await?;
            Ok(())
        }
        _ => Err(super::auth_failed(user, "password").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs our server side against postgres-protocol's client side.
    fn run(password_on_server: &str, password_of_client: &str) -> bool {
        let v = Verifier::from_password(password_on_server);
        let mut client = ScramSha256::new(password_of_client.as_bytes(), ChannelBinding::unrequested());
        let first = std::str::from_utf8(client.message()).unwrap().to_string();
        let ex = server_first(&first, &v, "servernonce").unwrap();
        client.update(ex.server_first.as_bytes()).unwrap();
        let fin = std::str::from_utf8(client.message()).unwrap().to_string();
        match server_final(&ex, &fin, &v).unwrap() {
            Some(server_final_msg) => {
                client.finish(server_final_msg.as_bytes()).expect("client accepts our server signature");
                true
            }
            None => false,
        }
    }

    #[test]
    fn accepts_the_right_password_and_rejects_a_wrong_one() {
        assert!(run("secret", "secret"));
        assert!(!run("secret", "Secret"));
    }

    #[test]
    fn verifier_round_trip_and_rejects() {
        let s = postgres_protocol::password::scram_sha_256(b"x");
        let v = Verifier::parse(&s).unwrap();
        assert_eq!(v.stored_key.len(), 32);
        assert!(Verifier::parse("SCRAM-SHA-256$0:AAAA$AAAA:AAAA").is_none());
        assert!(Verifier::parse("md5abc").is_none());
    }

    #[test]
    fn malformed_client_messages_are_errors_not_panics() {
        let v = Verifier::from_password("x");
        for bad in ["", "n", "n,,", "x,,n=,r=abc", "p=tls-server-end-point,,n=,r=a", "n,a=bob,n=,r=abc", "n,,n=,r="] {
            assert!(server_first(bad, &v, "s").is_err(), "{bad:?}");
        }
        let ex = server_first("n,,n=,r=abc", &v, "s").unwrap();
        for bad in ["", "c=biws,r=abcs", "c=eSws,r=abcs,p=AAAA", "c=biws,r=zzz,p=AAAA", "c=biws,r=abcs,p=!!!"] {
            assert!(server_final(&ex, bad, &v).is_err(), "{bad:?}");
        }
    }
}
