//! Login: from an accepted connection to an authenticated session on a
//! home node — the startup packet (TLS upgrade, cancel requests), limits
//! and TLS policy, the admin console's door, authentication at the proxy
//! or relayed to the node, and the choice of node (trying the next one if
//! a node turns out to be unreachable).

use crate::auth;
use crate::backend::{self, ConnectError, NodeAuth, ServerConn};
use crate::config::{AuthMethod, ClientTlsMode};
use crate::net::messages::{self, PgError};
use crate::net::stream::ClientStream;
use crate::router::NodeLease;
use crate::session::count_error;
use crate::startup::{read_startup, StartupError, StartupPacket};
use crate::state::{Reloadable, Shared, SocketAddrOrUnix};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// What login produced.
pub enum Login {
    /// Nothing more to do (a cancel request, or an error already sent).
    Done,
    Session(Box<Established>),
    Admin(ClientStream, String),
}

pub struct Established {
    pub client: ClientStream,
    pub server: ServerConn,
    pub lease: NodeLease,
    pub user: String,
    pub database: String,
    /// How to open more sessions as this user (statements run on every node).
    pub side: crate::everywhere::SideLogin,
}

/// Sends a FATAL error to the client and logs it.
pub async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, peer: &SocketAddrOrUnix, err: &PgError) {
    tracing::info!(%peer, code = err.code, "{}", err.message);
    count_error(err.code);
    let _ = client.write_all(&err.encode()).await;
    let _ = client.flush().await;
}

pub async fn login(mut client: ClientStream, peer: &SocketAddrOrUnix, shared: &Arc<Shared>, live: &Reloadable) -> Login {
    // 1. The startup packet, after an optional TLS upgrade.
    let params = loop {
        match read_startup(&mut client).await {
            Ok(StartupPacket::SslRequest) => {
                let acceptor = live.acceptor.clone();
                client = match (client, acceptor) {
                    (ClientStream::Tcp(mut tcp), Some(acceptor)) => {
                        if tcp.write_all(b"S").await.is_err() {
                            return Login::Done;
                        }
                        match acceptor.accept(tcp).await {
                            Ok(tls) => ClientStream::Tls(Box::new(tls)),
                            Err(e) => {
                                tracing::info!(%peer, "TLS handshake failed: {e}");
                                return Login::Done;
                            }
                        }
                    }
                    (ClientStream::Tls(_), _) => {
                        tracing::info!(%peer, "SSLRequest inside TLS");
                        return Login::Done;
                    }
                    (mut other, _) => {
                        if other.write_all(b"N").await.is_err() {
                            return Login::Done;
                        }
                        other
                    }
                };
            }
            Ok(StartupPacket::GssEncRequest) => {
                if client.write_all(b"N").await.is_err() {
                    return Login::Done;
                }
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                shared.cancels.cancel((pid, secret)).await;
                return Login::Done;
            }
            Ok(packet @ StartupPacket::Startup { .. }) => {
                let negotiate = packet.needs_negotiation();
                let StartupPacket::Startup { params, protocol_options, .. } = packet else { unreachable!() };
                // Before anything else, as PostgreSQL does: the session
                // goes on in 3.0 without the options.
                if negotiate && client.write_all(&messages::negotiate_protocol_version(&protocol_options)).await.is_err() {
                    return Login::Done;
                }
                break params;
            }
            Err(StartupError::Closed) => return Login::Done,
            Err(StartupError::Io(e)) => {
                tracing::debug!(%peer, "startup read failed: {e}");
                return Login::Done;
            }
            Err(StartupError::BadLength(len)) => {
                // Not a PostgreSQL client, or one that gave up before it
                // started (node-postgres sends Terminate first when ended
                // while connecting): PostgreSQL only logs it and closes,
                // and clients expect no answer.
                tracing::info!(%peer, "invalid length of startup packet ({len} bytes): connection closed");
                discard_what_arrived(&mut client).await;
                return Login::Done;
            }
            Err(e @ StartupError::UnsupportedProtocol { .. }) => {
                refuse(&mut client, peer, &PgError::fatal("0A000", e.to_string())).await;
                return Login::Done;
            }
            Err(e @ StartupError::NoUser) => {
                refuse(&mut client, peer, &PgError::fatal("28000", e.to_string())).await;
                return Login::Done;
            }
            Err(e) => {
                refuse(&mut client, peer, &PgError::fatal("08P01", e.to_string())).await;
                return Login::Done;
            }
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user = get("user").unwrap_or_default();
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    // A walsender's session (pg_basebackup, pg_receivewal, a subscriber)
    // speaks a protocol of its own that the proxy does not relay.
    if get("replication").is_some_and(|v| !is_false(&v)) {
        let e = PgError::fatal("0A000", "replication connections are not supported through the proxy")
            .with_hint("Connect to a node directly for pg_basebackup, pg_receivewal or logical replication.");
        refuse(&mut client, peer, &e).await;
        return Login::Done;
    }

    // 2. Limits and TLS policy.
    if live.config.tls.mode == ClientTlsMode::Require && !client.is_tls() && !matches!(peer, SocketAddrOrUnix::Unix) {
        let e = PgError::fatal("28000", format!("connection without TLS refused for user \"{user}\""))
            .with_hint("The proxy requires TLS (tls.mode = require); connect with sslmode=require.");
        refuse(&mut client, peer, &e).await;
        return Login::Done;
    }
    if shared.clients.load(Ordering::Relaxed) > live.config.limits.max_client_connections {
        refuse(&mut client, peer, &PgError::fatal("53300", "sorry, too many clients already")).await;
        return Login::Done;
    }
    if shared.shutting_down.load(Ordering::Relaxed) {
        refuse(&mut client, peer, &PgError::fatal("57P03", "the proxy is shutting down")).await;
        return Login::Done;
    }

    // 3. The admin console.
    let method = live.config.auth.method;
    if database == live.config.proxy.admin_database {
        if !live.config.proxy.admin_users.contains(&user) {
            let e = PgError::fatal("28000", format!("user \"{user}\" may not use the admin console"))
                .with_hint("List the user in proxy.admin_users.");
            refuse(&mut client, peer, &e).await;
            return Login::Done;
        }
        if method == AuthMethod::Passthrough {
            // Let a node check the password, then drop that session.
            let health_db = live.config.backend.health_database.clone();
            let p = vec![("user".to_string(), user.clone()), ("database".to_string(), health_db)];
            return match connect_any(shared, live, &p, None, NodeAuth::Relay(&mut client)).await {
                Ok((server, _lease)) => {
                    drop(server);
                    Login::Admin(client, user)
                }
                Err(e) => {
                    report_connect_error(&mut client, peer, e).await;
                    Login::Done
                }
            };
        }
        return match auth::authenticate(&mut client, method, &live.users, &user).await {
            Ok(_) => {
                if client.write_all(&messages::auth_ok()).await.is_err() {
                    return Login::Done;
                }
                Login::Admin(client, user)
            }
            Err(auth::AuthError::Pg(e)) => {
                refuse(&mut client, peer, &e).await;
                Login::Done
            }
            Err(auth::AuthError::Io(_)) => Login::Done,
        };
    }

    // 4. Authenticate at the proxy (unless the node does it), then open the
    //    session on a node.
    let password = if method == AuthMethod::Passthrough {
        None
    } else {
        match auth::authenticate(&mut client, method, &live.users, &user).await {
            Ok(p) => p.or_else(|| live.config.backend.password.clone()),
            Err(auth::AuthError::Pg(e)) => {
                refuse(&mut client, peer, &e).await;
                return Login::Done;
            }
            Err(auth::AuthError::Io(_)) => return Login::Done,
        }
    };
    // The node refuses a plain COMMIT of a writing transaction in the
    // proxy's sessions: those commit through the cluster's 2PC.
    let mut params = params;
    params.push((crate::relay::COORDINATED_COMMIT.to_string(), "on".to_string()));
    // A client may ask for its home node (maintenance, tests).
    let pinned = match take_node_option(&mut params) {
        None => None,
        Some(wanted) => match shared.router.index_of(&wanted) {
            Some(i) => Some(i),
            None => {
                let names: Vec<&str> = shared.router.nodes.iter().map(|n| n.config.name.as_str()).collect();
                let e = PgError::fatal("22023", format!("multimaster.node = \"{wanted}\" names no node of the cluster"))
                    .with_hint(format!("Give a node name or id: {}.", names.join(", ")));
                refuse(&mut client, peer, &e).await;
                return Login::Done;
            }
        },
    };
    let connected = if method == AuthMethod::Passthrough {
        connect_any(shared, live, &params, pinned, NodeAuth::Relay(&mut client)).await
    } else {
        connect_any::<ClientStream>(shared, live, &params, pinned, NodeAuth::Password { user: &user, password: password.as_deref() }).await
    };
    let (server, lease) = match connected {
        Ok(x) => x,
        Err(e) => {
            report_connect_error(&mut client, peer, e).await;
            return Login::Done;
        }
    };
    let side = crate::everywhere::SideLogin {
        params: params.clone(),
        user: user.clone(),
        password: password.or_else(|| live.config.backend.password.clone()),
    };
    Login::Session(Box::new(Established { client, server, lease, user, database, side }))
}

async fn report_connect_error<S: AsyncWrite + Unpin>(client: &mut S, peer: &SocketAddrOrUnix, e: ConnectError) {
    match e {
        ConnectError::Refused { raw, code, message, .. } => {
            tracing::info!(%peer, %code, "node refused the session: {message}");
            count_error(&code);
            let _ = client.write_all(&raw).await;
        }
        ConnectError::Proxy(pg) => refuse(client, peer, &pg).await,
        ConnectError::Unreachable(msg) => {
            let e = PgError::fatal("57P03", "no cluster node is available")
                .with_hint(format!("Every healthy node failed to accept the session (last: {msg}); see SHOW NODES in the admin console."));
            refuse(client, peer, &e).await;
        }
        ConnectError::Client(msg) => tracing::info!(%peer, "client left during authentication: {msg}"),
    }
}

/// Opens the session on the node the client pinned, or on a healthy node
/// chosen by the router, trying the others if one turns out to be
/// unreachable.
async fn connect_any<C: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    live: &Reloadable,
    params: &[(String, String)],
    pinned: Option<usize>,
    mut auth: NodeAuth<'_, C>,
) -> Result<(ServerConn, NodeLease), ConnectError> {
    if let Some(idx) = pinned {
        let lease = shared.router.lease(idx);
        let node = lease.node.config.clone();
        return match backend::connect(&node.addr(), &node.host, &shared.backend, &live.config.limits, params, auth).await {
            Ok(conn) => Ok((conn, lease)),
            Err(ConnectError::Unreachable(msg)) => Err(ConnectError::Proxy(
                PgError::fatal("57P03", format!("node {} is not available", node.name))
                    .with_hint(format!("The session asked for this node (multimaster.node); it failed: {msg}")),
            )),
            Err(other) => Err(other),
        };
    }
    let mut tried = Vec::new();
    let mut last = ConnectError::Unreachable("every node is marked down".into());
    let routing = &live.config.routing;
    while let Some((idx, lease)) = shared.router.pick(&tried, routing) {
        tried.push(idx);
        let node = &lease.node.config;
        let attempt = match &mut auth {
            NodeAuth::Relay(c) => NodeAuth::Relay(&mut **c),
            NodeAuth::Password { user, password } => NodeAuth::Password { user, password: *password },
        };
        match backend::connect(&node.addr(), &node.host, &shared.backend, &live.config.limits, params, attempt).await {
            Ok(conn) => return Ok((conn, lease)),
            Err(ConnectError::Unreachable(msg)) => {
                lease.node.mark_down(&msg);
                last = ConnectError::Unreachable(msg);
            }
            // Refused before any authentication because the node is not
            // ready (starting up, in crash recovery after one of its
            // processes died, shutting down: 57P03): another node takes
            // the session, and the node is down until a health check
            // finds it ready, as a health check would have said.
            Err(ConnectError::Refused { code, message, before_auth: true, .. }) if code == "57P03" => {
                tracing::info!(node = %node.name, %code, "node cannot take a session now, trying another: {message}");
                lease.node.mark_down(&format!("{code}: {message}"));
                last = ConnectError::Unreachable(format!("node {}: {message}", node.name));
            }
            Err(other) => return Err(other),
        }
    }
    Err(last)
}


/// Startup setting that pins a session to a node: `multimaster.node` as a
/// startup parameter, or `-c multimaster.node=…` in `options` (what
/// PGOPTIONS and the `options` connection keyword send). It is the proxy's,
/// so it is taken out before the startup packet goes to the node.
pub const NODE_OPTION: &str = "multimaster.node";

/// Removes [`NODE_OPTION`] from the startup parameters; returns its value.
fn take_node_option(params: &mut Vec<(String, String)>) -> Option<String> {
    let mut found = None;
    if let Some(i) = params.iter().position(|(k, _)| k == NODE_OPTION) {
        found = Some(params.remove(i).1);
    }
    if let Some(i) = params.iter().position(|(k, _)| k == "options") {
        let words: Vec<&str> = params[i].1.split_whitespace().collect();
        let mut kept = Vec::new();
        let mut j = 0;
        while j < words.len() {
            let (setting, used) = match words[j] {
                "-c" if j + 1 < words.len() => (words[j + 1], 2),
                w if w.starts_with("-c") => (&w[2..], 1),
                w if w.starts_with("--") => (&w[2..], 1),
                w => (w, 0),
            };
            match setting.strip_prefix(NODE_OPTION).and_then(|rest| rest.strip_prefix('=')) {
                Some(value) if used > 0 => {
                    found = Some(value.to_string());
                    j += used;
                }
                _ => {
                    kept.push(words[j]);
                    j += 1;
                }
            }
        }
        if kept.is_empty() {
            params.remove(i);
        } else {
            params[i].1 = kept.join(" ");
        }
    }
    found
}

/// Whether `value` is false as PostgreSQL's boolean settings read it (a
/// prefix of "false" or "no", "off", "0"; any case).
fn is_false(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    (!v.is_empty() && ("false".starts_with(&v) || "no".starts_with(&v))) || v == "off" || v == "of" || v == "0"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_false_as_postgresql_does() {
        for v in ["false", "f", "FAL", "no", "n", "off", "of", "0"] {
            assert!(is_false(v), "{v}");
        }
        for v in ["true", "database", "on", "1", "", "o"] {
            assert!(!is_false(v), "{v}");
        }
    }

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_node_option_is_taken_out_of_the_startup_packet() {
        let mut a = p(&[("user", "u"), ("options", "-c multimaster.node=2 -c work_mem=8MB")]);
        assert_eq!(take_node_option(&mut a).as_deref(), Some("2"));
        assert_eq!(a, p(&[("user", "u"), ("options", "-c work_mem=8MB")]));
        let mut b = p(&[("options", "-cmultimaster.node=node3")]);
        assert_eq!(take_node_option(&mut b).as_deref(), Some("node3"));
        assert!(b.is_empty());
        let mut c = p(&[("options", "--multimaster.node=1"), ("multimaster.node", "ignored-first")]);
        assert_eq!(take_node_option(&mut c).as_deref(), Some("1"));
        let mut d = p(&[("options", "-c multimaster.nodes=2")]);
        assert_eq!(take_node_option(&mut d), None);
        assert_eq!(d, p(&[("options", "-c multimaster.nodes=2")]));
        let mut e = p(&[("multimaster.node", "node1"), ("database", "postgres")]);
        assert_eq!(take_node_option(&mut e).as_deref(), Some("node1"));
        assert_eq!(e, p(&[("database", "postgres")]));
    }
}

/// Reads and drops what the client has already sent, without waiting for
/// more: PostgreSQL reads its whole first segment into its buffer before
/// it gives up on a bad startup packet, so its close is an orderly one
/// (FIN); closing with bytes unread would reset the connection instead.
async fn discard_what_arrived(client: &mut ClientStream) {
    use tokio::io::AsyncReadExt;
    let mut junk = [0u8; 8192];
    for _ in 0..8 {
        // A zero timeout still polls the read once: what is there is read.
        match tokio::time::timeout(std::time::Duration::ZERO, client.read(&mut junk)).await {
            Ok(Ok(n)) if n > 0 => continue,
            _ => return,
        }
    }
}
