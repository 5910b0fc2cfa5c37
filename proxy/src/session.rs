//! One client session: startup (TLS, cancel, limits), authentication, the
//! choice of a home node, then the forwarding loop until either side
//! closes.
//!
//! The loop runs two halves concurrently — client→node and node→client —
//! so a full socket buffer on one side never stalls the other (a pipelined
//! client and a node writing results cannot deadlock). Client messages are
//! cut into frames and forwarded as read; node messages are forwarded as
//! read while a scanner notes each ReadyForQuery. A transaction boundary is
//! where the pause gate is entered (first message sent while idle) and
//! exited (ReadyForQuery 'I' with nothing pending): the place where the
//! 2PC commit path and generation switches hook in.

use crate::auth;
use crate::backend::{self, ConnectError, NodeAuth, ServerConn};
use crate::config::{AuthMethod, ClientTlsMode};
use crate::net::frame::{parse_text, query_text, FrameError, FrameIoError, FrameReader};
use crate::net::messages::{self, PgError};
use crate::net::scan::{BackendScanner, Events};
use crate::net::stream::{ClientStream, ServerStream};
use crate::router::NodeLease;
use crate::startup::{read_startup, StartupError, StartupPacket};
use crate::state::{session_state, Reloadable, SessionInfo, Shared, SocketAddrOrUnix};
use bytes::BytesMut;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What login produced.
enum Login {
    /// Nothing more to do (a cancel request, or an error already sent).
    Done,
    Session(Box<Established>),
    Admin(ClientStream, String),
}

struct Established {
    client: ClientStream,
    server: ServerConn,
    lease: NodeLease,
    user: String,
    database: String,
}

/// Entry point for an accepted connection.
pub async fn run(client: ClientStream, peer: SocketAddrOrUnix, shared: Arc<Shared>) {
    let live = shared.live.load_full();
    let login_timeout = live.config.limits.client_login_timeout;
    let outcome = match tokio::time::timeout(login_timeout, login(client, &peer, &shared, &live)).await {
        Ok(o) => o,
        Err(_) => {
            // The stream was inside the timed-out future; it is closed on drop.
            tracing::info!(%peer, "login timed out after {login_timeout:?}");
            return;
        }
    };
    match outcome {
        Login::Done => {}
        Login::Admin(client, user) => crate::admin::run(client, &user, &shared).await,
        Login::Session(est) => forward(*est, &peer, &shared, &live).await,
    }
}

/// Counts an error sent to a client under its SQLSTATE class.
fn count_error(sqlstate: &str) {
    metrics::counter!("mtm_proxy_errors_total", "sqlstate_class" => sqlstate.get(..2).unwrap_or("XX").to_string()).increment(1);
}

/// Sends a FATAL error to the client and logs it.
async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, peer: &SocketAddrOrUnix, err: &PgError) {
    tracing::info!(%peer, code = err.code, "{}", err.message);
    count_error(err.code);
    let _ = client.write_all(&err.encode()).await;
    let _ = client.flush().await;
}

async fn login(mut client: ClientStream, peer: &SocketAddrOrUnix, shared: &Arc<Shared>, live: &Reloadable) -> Login {
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
            Ok(StartupPacket::Startup { params, .. }) => break params,
            Err(StartupError::Closed) => return Login::Done,
            Err(StartupError::Io(e)) => {
                tracing::debug!(%peer, "startup read failed: {e}");
                return Login::Done;
            }
            Err(e @ StartupError::UnsupportedProtocol { .. }) => {
                refuse(&mut client, peer, &PgError::fatal("0A000", e.to_string())).await;
                return Login::Done;
            }
            Err(e) => {
                let msg = match e {
                    StartupError::BadLength(_) => "invalid length of startup packet".to_string(),
                    other => other.to_string(),
                };
                refuse(&mut client, peer, &PgError::fatal("08P01", msg)).await;
                return Login::Done;
            }
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user = get("user").unwrap_or_default();
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());

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
            return match connect_any(shared, &p, NodeAuth::Relay(&mut client)).await {
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
    let connected = if method == AuthMethod::Passthrough {
        connect_any(shared, &params, NodeAuth::Relay(&mut client)).await
    } else {
        connect_any::<ClientStream>(shared, &params, NodeAuth::Password { user: &user, password: password.as_deref() }).await
    };
    let (server, lease) = match connected {
        Ok(x) => x,
        Err(e) => {
            report_connect_error(&mut client, peer, e).await;
            return Login::Done;
        }
    };
    Login::Session(Box::new(Established { client, server, lease, user, database }))
}

async fn report_connect_error<S: AsyncWrite + Unpin>(client: &mut S, peer: &SocketAddrOrUnix, e: ConnectError) {
    match e {
        ConnectError::Refused { raw, code, message } => {
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

/// Opens the session on a healthy node chosen by the router, trying the
/// others if one turns out to be unreachable.
async fn connect_any<C: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    params: &[(String, String)],
    mut auth: NodeAuth<'_, C>,
) -> Result<(ServerConn, NodeLease), ConnectError> {
    let mut tried = Vec::new();
    let mut last = ConnectError::Unreachable("every node is marked down".into());
    while let Some((idx, lease)) = shared.router.pick(&tried) {
        tried.push(idx);
        let node = &lease.node.config;
        let attempt = match &mut auth {
            NodeAuth::Relay(c) => NodeAuth::Relay(&mut **c),
            NodeAuth::Password { user, password } => NodeAuth::Password { user, password: *password },
        };
        match backend::connect(&node.addr(), &node.host, &shared.backend, params, attempt).await {
            Ok(conn) => return Ok((conn, lease)),
            Err(ConnectError::Unreachable(msg)) => {
                lease.node.mark_down(&msg);
                last = ConnectError::Unreachable(msg);
            }
            Err(other) => return Err(other),
        }
    }
    Err(last)
}

/// Sends the client what completes its login, then forwards until the end.
async fn forward(est: Established, peer: &SocketAddrOrUnix, shared: &Arc<Shared>, live: &Reloadable) {
    let Established { mut client, mut server, lease, user, database } = est;
    let node_name = lease.node.config.name.clone();
    let key = shared.cancels.register(crate::cancel::CancelTarget {
        addr: lease.node.config.addr(),
        pid: server.pid,
        secret: server.secret,
    });
    let mut hello = BytesMut::new();
    if live.config.auth.method != AuthMethod::Passthrough {
        hello.extend_from_slice(&messages::auth_ok());
    }
    hello.extend_from_slice(&server.startup_messages);
    hello.extend_from_slice(&messages::backend_key_data(key.0, key.1));
    hello.extend_from_slice(&messages::ready_for_query(server.status));
    let info = shared.register_session(peer.clone(), &user, &database, &node_name);
    let server_conns = metrics::gauge!("mtm_proxy_server_connections", "node" => node_name.clone());
    server_conns.increment(1.0);
    shared.totals.sessions.fetch_add(1, Ordering::Relaxed);

    let end = if client.write_all(&hello).await.is_ok() {
        let ctx = PumpCtx::new(shared, live, &info, &node_name);
        let end = match (&mut client, &mut server.stream) {
            // The common case without TLS: zero-cost borrowed halves.
            (ClientStream::Tcp(c), ServerStream::Tcp(s)) => {
                let (cr, cw) = c.split();
                let (sr, sw) = s.split();
                pump(cr, cw, sr, sw, &ctx).await
            }
            (c, s) => {
                let (cr, cw) = tokio::io::split(c);
                let (sr, sw) = tokio::io::split(s);
                pump(cr, cw, sr, sw, &ctx).await
            }
        };
        ctx.tracker.finish();
        end
    } else {
        End::ClientIo
    };

    match &end {
        End::ClientProtocol(e) => {
            refuse(&mut client, peer, &PgError::fatal("08P01", e.to_string())).await;
        }
        End::IdleTimeout => {
            refuse(&mut client, peer, &PgError::fatal("57P05", "terminating connection due to idle-session timeout")).await;
        }
        End::ServerProtocol(e) => tracing::warn!(%peer, node = %node_name, "node stream broken: {e}"),
        _ => {}
    }
    if !matches!(end, End::ServerClosed | End::ClientTerminated) {
        // Tell the node we are leaving so its backend ends at once.
        let _ = server.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
    let _ = server.stream.shutdown().await;
    shared.cancels.remove(key);
    shared.sessions.remove(&info.id);
    server_conns.decrement(1.0);
    drop(lease);
    tracing::debug!(%peer, node = %node_name, ?end, "session ended");
}

#[derive(Debug)]
enum End {
    ClientClosed,
    ClientTerminated,
    ClientIo,
    ClientProtocol(FrameError),
    IdleTimeout,
    ServerClosed,
    ServerIo,
    ServerProtocol(String),
}

/// Per-session handles so the hot path does no metric lookups.
struct PumpCtx<'a> {
    shared: &'a Shared,
    live: &'a Reloadable,
    tracker: Tracker<'a>,
    queries_by_class: [metrics::Counter; 4],
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
}

impl<'a> PumpCtx<'a> {
    fn new(shared: &'a Shared, live: &'a Reloadable, info: &'a Arc<SessionInfo>, node: &str) -> Self {
        let q = |c: crate::classify::StatementClass| {
            metrics::counter!("mtm_proxy_queries_total", "node" => node.to_string(), "class" => c.as_str())
        };
        use crate::classify::StatementClass::*;
        PumpCtx {
            shared,
            live,
            tracker: Tracker {
                gate: &shared.pause,
                info,
                state: Mutex::new(TrackState::default()),
                transactions: metrics::counter!("mtm_proxy_transactions_total", "node" => node.to_string()),
                latency: metrics::histogram!("mtm_proxy_query_duration_seconds", "node" => node.to_string()),
                totals: &shared.totals,
            },
            queries_by_class: [q(Other), q(Transaction), q(RemoteFunction), q(Ddl)],
            bytes_in: metrics::counter!("mtm_proxy_client_bytes_received_total"),
            bytes_out: metrics::counter!("mtm_proxy_client_bytes_sent_total"),
        }
    }
}

#[derive(Debug, Default)]
struct TrackState {
    /// Between the first message sent while idle and ReadyForQuery 'I'.
    in_flight: bool,
    /// Sync/Query/FunctionCall sent whose ReadyForQuery has not come back.
    pending: u64,
    busy_since: Option<Instant>,
}

/// Follows the session's transaction boundaries for the pause gate,
/// metrics and the admin console.
struct Tracker<'a> {
    gate: &'a crate::pause::PauseGate,
    info: &'a SessionInfo,
    state: Mutex<TrackState>,
    transactions: metrics::Counter,
    latency: metrics::Histogram,
    totals: &'a crate::state::Totals,
}

impl Tracker<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn in_flight(&self) -> bool {
        self.lock().in_flight
    }

    /// Before forwarding a batch with `syncs` Sync/Query/FunctionCall
    /// messages. Waits at the pause gate if this starts a transaction.
    async fn before_send(&self, syncs: u64) {
        {
            let mut s = self.lock();
            if s.in_flight {
                s.pending += syncs;
                if s.pending > 0 && s.busy_since.is_none() {
                    s.busy_since = Some(Instant::now());
                }
                return;
            }
        }
        if self.gate.is_paused() {
            self.info.state.store(session_state::WAITING, Ordering::Relaxed);
        }
        self.gate.enter().await;
        self.info.state.store(session_state::ACTIVE, Ordering::Relaxed);
        let mut s = self.lock();
        s.in_flight = true;
        s.pending += syncs;
        if s.pending > 0 {
            s.busy_since = Some(Instant::now());
        }
    }

    fn on_ready(&self, status: u8) {
        let mut s = self.lock();
        s.pending = s.pending.saturating_sub(1);
        if s.pending > 0 {
            return;
        }
        if let Some(t) = s.busy_since.take() {
            self.latency.record(t.elapsed().as_secs_f64());
        }
        if status == b'I' && s.in_flight {
            s.in_flight = false;
            drop(s);
            self.gate.exit();
            self.transactions.increment(1);
            self.totals.transactions.fetch_add(1, Ordering::Relaxed);
            self.info.transactions.fetch_add(1, Ordering::Relaxed);
            self.info.state.store(session_state::IDLE, Ordering::Relaxed);
        }
    }

    /// The session ended: release the gate if a transaction was open.
    fn finish(&self) {
        let mut s = self.lock();
        if s.in_flight {
            s.in_flight = false;
            drop(s);
            self.gate.exit();
        }
    }
}

async fn pump<CR, CW, SR, SW>(mut cr: CR, mut cw: CW, mut sr: SR, mut sw: SW, ctx: &PumpCtx<'_>) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let client_to_server = async {
        let limits = &ctx.live.config.limits;
        let mut reader = FrameReader::new(limits.max_message_size);
        loop {
            let next = reader.next_batch(&mut cr);
            let batch = if limits.client_idle_timeout > Duration::ZERO && !ctx.tracker.in_flight() {
                match tokio::time::timeout(limits.client_idle_timeout, next).await {
                    Ok(r) => r,
                    Err(_) => return End::IdleTimeout,
                }
            } else {
                next.await
            };
            let batch = match batch {
                Ok(Some(b)) => b,
                Ok(None) => return End::ClientClosed,
                Err(FrameIoError::Frame(e)) => return End::ClientProtocol(e),
                Err(FrameIoError::Io(_)) => return End::ClientIo,
            };
            let mut syncs = 0;
            let mut terminate = false;
            for f in &batch.frames {
                match f.tag {
                    b'Q' | b'P' => {
                        let body = batch.body(f);
                        let text = if f.tag == b'Q' { query_text(body) } else { parse_text(body) };
                        let class = match text {
                            Ok(sql) => ctx.live.classifier.classify(sql),
                            Err(e) => return End::ClientProtocol(e),
                        };
                        ctx.queries_by_class[class as usize].increment(1);
                        ctx.shared.totals.by_class[class as usize].fetch_add(1, Ordering::Relaxed);
                        if f.tag == b'Q' {
                            syncs += 1;
                            ctx.tracker.info.queries.fetch_add(1, Ordering::Relaxed);
                            ctx.shared.totals.queries.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    b'E' => {
                        ctx.tracker.info.queries.fetch_add(1, Ordering::Relaxed);
                        ctx.shared.totals.queries.fetch_add(1, Ordering::Relaxed);
                    }
                    b'S' | b'F' => syncs += 1,
                    b'X' => terminate = true,
                    _ => {}
                }
            }
            ctx.bytes_in.increment(batch.bytes.len() as u64);
            ctx.shared.totals.bytes_in.fetch_add(batch.bytes.len() as u64, Ordering::Relaxed);
            if !terminate {
                ctx.tracker.before_send(syncs).await;
            }
            if sw.write_all(&batch.bytes).await.is_err() {
                return End::ServerIo;
            }
            if terminate {
                return End::ClientTerminated;
            }
        }
    };
    let server_to_client = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut scanner = BackendScanner::default();
        let mut ev = Events::default();
        loop {
            buf.clear();
            buf.reserve(64 * 1024);
            match sr.read_buf(&mut buf).await {
                Ok(0) => return End::ServerClosed,
                Ok(_) => {}
                Err(_) => return End::ServerIo,
            }
            if let Err(e) = scanner.feed(&buf, &mut ev) {
                return End::ServerProtocol(e.to_string());
            }
            if cw.write_all(&buf).await.is_err() {
                return End::ClientIo;
            }
            ctx.bytes_out.increment(buf.len() as u64);
            ctx.shared.totals.bytes_out.fetch_add(buf.len() as u64, Ordering::Relaxed);
            for status in ev.ready.drain(..) {
                ctx.tracker.on_ready(status);
            }
            for code in ev.errors.drain(..) {
                ctx.shared.totals.errors.fetch_add(1, Ordering::Relaxed);
                count_error(&code);
            }
        }
    };
    tokio::select! {
        end = client_to_server => end,
        end = server_to_client => end,
    }
}
