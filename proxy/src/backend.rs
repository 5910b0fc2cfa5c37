//! Opening a session on a node: TCP (and TLS if configured), the
//! StartupMessage, authentication, and the node's ParameterStatus /
//! BackendKeyData up to its first ReadyForQuery.
//!
//! Authentication towards the node is either done by the proxy with a
//! password it knows (cleartext, md5 or SCRAM-SHA-256, the client side from
//! postgres-protocol), or relayed to the client (`passthrough`), in which
//! case the node's SASL offer is narrowed to SCRAM-SHA-256 so a TLS client
//! does not try channel binding to a certificate the node never saw.

use crate::config::BackendTlsMode;
use crate::net::frame::{frame, read_one, FrameIoError};
use crate::net::messages::{self, PgError};
use crate::net::stream::ServerStream;
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Startup-phase messages from a node are small; bound them anyway.
const STARTUP_MESSAGE_LIMIT: usize = 1 << 20;

#[derive(Clone)]
pub struct BackendSettings {
    pub tls: BackendTlsMode,
    pub connector: Option<tokio_rustls::TlsConnector>,
}

/// How to answer the node's authentication requests.
pub enum NodeAuth<'a, C> {
    /// The proxy answers, with this password if the node asks for one.
    Password { user: &'a str, password: Option<&'a str> },
    /// The client answers, through the proxy.
    Relay(&'a mut C),
}

pub struct ServerConn {
    pub stream: ServerStream,
    /// ParameterStatus and NoticeResponse messages, raw, to pass on.
    pub startup_messages: BytesMut,
    pub pid: i32,
    pub secret: i32,
    /// Transaction status of the first ReadyForQuery.
    pub status: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The node could not be reached or spoke nonsense: try another.
    #[error("{0}")]
    Unreachable(String),
    /// The node refused the session (bad password, unknown database...):
    /// the raw ErrorResponse goes to the client as is. `before_auth`: it
    /// came before any authentication exchange (nothing was relayed to
    /// the client yet).
    #[error("node refused the session: {message}")]
    Refused { raw: BytesMut, code: String, message: String, before_auth: bool },
    /// Something the proxy itself must report.
    #[error("{0}")]
    Proxy(PgError),
    /// The client went away or misbehaved while we relayed its auth.
    #[error("client: {0}")]
    Client(String),
}

pub async fn connect<C: AsyncRead + AsyncWrite + Unpin>(
    addr: &str,
    host: &str,
    settings: &BackendSettings,
    limits: &crate::config::Limits,
    params: &[(String, String)],
    auth: NodeAuth<'_, C>,
) -> Result<ServerConn, ConnectError> {
    let fut = async {
        if addr.starts_with('/') {
            // PostgreSQL does not use TLS over a unix socket.
            if settings.tls == BackendTlsMode::Require {
                return Err(ConnectError::Unreachable(format!("{addr} is a unix socket, which does not use TLS (backend.tls = require)")));
            }
            let unix = tokio::net::UnixStream::connect(addr).await.map_err(|e| ConnectError::Unreachable(format!("connect to {addr}: {e}")))?;
            return Ok(ServerStream::Unix(unix));
        }
        let tcp = TcpStream::connect(addr).await.map_err(|e| ConnectError::Unreachable(format!("connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        if let Err(e) = crate::net::keepalive::enable(&tcp, limits.tcp_keepalive) {
            tracing::warn!(error = %e, addr, "cannot set TCP keepalive on a node connection");
        }
        let stream = negotiate_tls(tcp, host, settings).await?;
        Ok::<_, ConnectError>(stream)
    };
    let connect_timeout = limits.server_connect_timeout;
    let mut stream = tokio::time::timeout(connect_timeout, fut)
        .await
        .map_err(|_| ConnectError::Unreachable(format!("connect to {addr}: timed out after {connect_timeout:?}")))??;

    let mut buf = BytesMut::new();
    frontend::startup_message(params.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut buf)
        .map_err(|e| ConnectError::Proxy(PgError::fatal("08P01", format!("invalid startup parameters: {e}"))))?;
    write(&mut stream, &buf).await?;

    let mut auth = auth;
    let mut scram: Option<ScramSha256> = None;
    let mut startup_messages = BytesMut::new();
    let (mut pid, mut secret) = (0, 0);
    let mut authenticating = false;
    loop {
        let (tag, body) = read_one(&mut stream, STARTUP_MESSAGE_LIMIT).await.map_err(unreachable)?;
        match tag {
            b'R' => {
                authenticating = true;
                let code = body.get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(-1);
                match &mut auth {
                    NodeAuth::Relay(client) => {
                        let raw = if code == 10 { messages::auth_sasl(&["SCRAM-SHA-256"]) } else { frame(tag, &body) };
                        client.write_all(&raw).await.map_err(|e| ConnectError::Client(e.to_string()))?;
                        if matches!(code, 3 | 5 | 10 | 11) {
                            let (t, b) = read_one(*client, 8192).await.map_err(|e| ConnectError::Client(e.to_string()))?;
                            write(&mut stream, &frame(t, &b)).await?;
                        }
                    }
                    NodeAuth::Password { user, password } => {
                        answer_auth(&mut stream, code, &body[4.min(body.len())..], user, *password, &mut scram).await?
                    }
                }
            }
            b'E' => {
                let code = crate::net::scan::sqlstate(&body).unwrap_or_else(|| "XX000".into());
                let message = crate::net::scan::error_field(&body, b'M').unwrap_or_else(|| "unknown error".into());
                return Err(ConnectError::Refused { raw: frame(tag, &body), code, message, before_auth: !authenticating });
            }
            b'S' | b'N' | b'v' => startup_messages.extend_from_slice(&frame(tag, &body)),
            b'K' if body.len() >= 8 => {
                pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                secret = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
            }
            b'Z' => {
                let status = body.first().copied().unwrap_or(b'I');
                return Ok(ServerConn { stream, startup_messages, pid, secret, status });
            }
            other => return Err(ConnectError::Unreachable(format!("unexpected message {:?} during startup", other as char))),
        }
    }
}

async fn negotiate_tls(mut tcp: TcpStream, host: &str, settings: &BackendSettings) -> Result<ServerStream, ConnectError> {
    if settings.tls == BackendTlsMode::Disable {
        return Ok(ServerStream::Tcp(tcp));
    }
    let mut req = Vec::with_capacity(8);
    req.extend_from_slice(&8u32.to_be_bytes());
    req.extend_from_slice(&crate::startup::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await.map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    let answer = tcp.read_u8().await.map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    match (answer, settings.tls) {
        (b'S', _) => {
            let connector = settings.connector.as_ref().ok_or_else(|| ConnectError::Unreachable("no TLS connector".into()))?;
            let name = crate::tls::server_name(host).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Unreachable(format!("TLS handshake with {host}: {e}")))?;
            Ok(ServerStream::Tls(Box::new(tls)))
        }
        (b'N', BackendTlsMode::Prefer) => Ok(ServerStream::Tcp(tcp)),
        (b'N', _) => Err(ConnectError::Unreachable(format!("node {host} does not support TLS (backend.tls = require)"))),
        (other, _) => Err(ConnectError::Unreachable(format!("unexpected answer {other:#x} to SSLRequest"))),
    }
}

async fn answer_auth(
    stream: &mut ServerStream,
    code: i32,
    data: &[u8],
    user: &str,
    password: Option<&str>,
    scram: &mut Option<ScramSha256>,
) -> Result<(), ConnectError> {
    let need_password = || {
        ConnectError::Proxy(
            PgError::fatal("28P01", format!("node asked for a password for user \"{user}\" and the proxy has none"))
                .with_hint("Put a plain password for this user in the users file, set backend.password, or use auth.method = \"passthrough\"."),
        )
    };
    let mut out = BytesMut::new();
    match code {
        0 => return Ok(()),
        3 => {
            let pw = password.ok_or_else(need_password)?;
            frontend::password_message(pw.as_bytes(), &mut out).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
        }
        5 => {
            let pw = password.ok_or_else(need_password)?;
            let salt: [u8; 4] = data.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| ConnectError::Unreachable("bad md5 salt".into()))?;
            let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), pw.as_bytes(), salt);
            frontend::password_message(hash.as_bytes(), &mut out).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
        }
        10 => {
            let pw = password.ok_or_else(need_password)?;
            let offers_scram = data.split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256");
            if !offers_scram {
                return Err(ConnectError::Unreachable("node offers no SCRAM-SHA-256".into()));
            }
            let client = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
            frontend::sasl_initial_response("SCRAM-SHA-256", client.message(), &mut out)
                .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
            *scram = Some(client);
        }
        11 => {
            let client = scram.as_mut().ok_or_else(|| ConnectError::Unreachable("SASLContinue without SASL".into()))?;
            client.update(data).map_err(|e| ConnectError::Unreachable(format!("SCRAM with node: {e}")))?;
            frontend::sasl_response(client.message(), &mut out).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
        }
        12 => {
            let client = scram.as_mut().ok_or_else(|| ConnectError::Unreachable("SASLFinal without SASL".into()))?;
            client.finish(data).map_err(|e| ConnectError::Unreachable(format!("node's SCRAM signature is invalid: {e}")))?;
            return Ok(());
        }
        other => {
            return Err(ConnectError::Proxy(PgError::fatal(
                "28000",
                format!("node asked for an authentication method the proxy does not support (code {other})"),
            )))
        }
    }
    write(stream, &out).await
}

async fn write(stream: &mut ServerStream, bytes: &[u8]) -> Result<(), ConnectError> {
    stream.write_all(bytes).await.map_err(|e| ConnectError::Unreachable(e.to_string()))
}

fn unreachable(e: FrameIoError) -> ConnectError {
    ConnectError::Unreachable(format!("reading from node: {e}"))
}

