//! One client session. This version is a plain forwarder: after the startup
//! packet it connects to the first reachable node and copies bytes both
//! ways. Encryption requests are declined.

use crate::config::Config;
use crate::startup::{read_startup, StartupPacket};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub async fn run(mut client: TcpStream, config: Arc<Config>) -> anyhow::Result<()> {
    loop {
        match read_startup(&mut client).await? {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                // 'N': not supported here; the client may go on in plain text.
                client.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                let mut raw = Vec::with_capacity(16);
                raw.extend_from_slice(&16u32.to_be_bytes());
                raw.extend_from_slice(&crate::startup::CANCEL_REQUEST.to_be_bytes());
                raw.extend_from_slice(&pid.to_be_bytes());
                raw.extend_from_slice(&secret.to_be_bytes());
                // Without key translation the backend key identifies the node
                // only implicitly, so offer the cancel to every node; a key
                // matches at most one backend.
                for node in &config.nodes {
                    if let Ok(mut s) = TcpStream::connect(node.addr()).await {
                        let _ = s.write_all(&raw).await;
                    }
                }
                return Ok(());
            }
            StartupPacket::Startup { raw, .. } => {
                let mut server = match connect_any(&config).await {
                    Some(s) => s,
                    None => {
                        client
                            .write_all(&error_response(
                                "FATAL",
                                "08006",
                                "no cluster node is reachable",
                            ))
                            .await?;
                        return Ok(());
                    }
                };
                server.write_all(&raw).await?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await?;
                return Ok(());
            }
        }
    }
}

async fn connect_any(config: &Config) -> Option<TcpStream> {
    for node in &config.nodes {
        if let Ok(s) = TcpStream::connect(node.addr()).await {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
    }
    None
}

/// An ErrorResponse ('E') with severity, SQLSTATE and message fields.
pub fn error_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, value) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', message)] {
        body.push(tag);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}
