//! One client session from accept to close: login ([`crate::login`]),
//! the hello the client gets from its node, the relay
//! ([`crate::relay`]) until either side ends, and the bookkeeping around
//! it — the session's transaction boundaries for the pause gate, the admin
//! console and metrics ([`Tracker`]).

use crate::config::AuthMethod;
use crate::login::{login, refuse, Established, Login};
use crate::net::frame::{FrameError, BodyReader};
use crate::net::messages::{self, PgError};
use crate::net::stream::{ClientStream, ServerStream};
use crate::relay::{pump, XACT_WRITES};
use crate::state::{session_state, Reloadable, SessionInfo, Shared, SocketAddrOrUnix};
use bytes::BytesMut;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

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
pub fn count_error(sqlstate: &str) {
    metrics::counter!("mtm_proxy_errors_total", "sqlstate_class" => sqlstate.get(..2).unwrap_or("XX").to_string()).increment(1);
}

/// Sends the client what completes its login, then forwards until the end.
async fn forward(est: Established, peer: &SocketAddrOrUnix, shared: &Arc<Shared>, live: &Reloadable) {
    let Established { mut client, mut server, lease, user, database, side } = est;
    let node_name = lease.node.config.name.clone();
    let info = shared.register_session(peer.clone(), &user, &database, &node_name);
    let key = shared.cancels.register(crate::cancel::CancelTarget {
        addr: lease.node.config.addr(),
        pid: server.pid,
        secret: server.secret,
        session: info.clone(),
    });
    let mut hello = BytesMut::new();
    // The login's snapshot, not the current one: the method that
    // authenticated the client decides whether the proxy owes it AuthOk.
    if live.config.auth.method != AuthMethod::Passthrough {
        hello.extend_from_slice(&messages::auth_ok());
    }
    hello.extend_from_slice(&without_parameter(&server.startup_messages, XACT_WRITES));
    hello.extend_from_slice(&messages::backend_key_data(key.0, key.1));
    hello.extend_from_slice(&messages::ready_for_query(server.status));
    let server_conns = metrics::gauge!("mtm_proxy_server_connections", "node" => node_name.clone());
    server_conns.increment(1.0);
    shared.totals.sessions.fetch_add(1, Ordering::Relaxed);

    let end = if client.write_all(&hello).await.is_ok() {
        let ctx = PumpCtx::new(shared, &info, &node_name, server.status, side);
        let end = match (&mut client, &mut server.stream) {
            // The common case without TLS: zero-cost borrowed halves.
            (ClientStream::Tcp(c), ServerStream::Tcp(s)) => {
                let (cr, cw) = c.split();
                let (sr, sw) = s.split();
                pump(cr, cw, sr, sw, &ctx, server.status).await
            }
            (ClientStream::Tcp(c), ServerStream::Unix(s)) => {
                let (cr, cw) = c.split();
                let (sr, sw) = s.split();
                pump(cr, cw, sr, sw, &ctx, server.status).await
            }
            (c, s) => {
                let (cr, cw) = tokio::io::split(c);
                let (sr, sw) = tokio::io::split(s);
                pump(cr, cw, sr, sw, &ctx, server.status).await
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
        End::NodeLost => {
            let e = PgError::fatal("08006", format!("lost the connection to node {node_name}"))
                .with_hint("The session has ended; a transaction open in it was rolled back. Connect again to go on (on a node that is up).");
            refuse(&mut client, peer, &e).await;
        }
        End::CommitInDoubt(gid) => {
            tracing::warn!(%peer, node = %node_name, gid, "lost the connection to the node during a commit; its outcome is left to the cluster");
            metrics::counter!("mtm_proxy_commits_total", "outcome" => "unknown").increment(1);
            let e = PgError::fatal(
                "40003",
                format!("lost the connection to node {node_name} while transaction {gid} was being committed, so whether it committed is not known"),
            )
            .with_hint(format!(
                "The cluster finishes it within seconds: committed if every node voted yes, rolled back otherwise. Before retrying, check whether its changes are there (SELECT mtm.xact_state('{gid}') tells how it ended, on any node that stayed up meanwhile)."
            ));
            refuse(&mut client, peer, &e).await;
        }
        End::CommittedThenLost(gid) => {
            tracing::warn!(%peer, node = %node_name, gid, "lost the connection to the node after a commit, while waiting for the peers to confirm theirs");
            metrics::counter!("mtm_proxy_commits_total", "outcome" => "committed").increment(1);
            let e = PgError::fatal("08006", format!("lost the connection to node {node_name} after transaction {gid} committed"))
                .with_hint("The transaction is committed: every node voted for it, and the nodes that have not applied it yet will. The session has ended; connect again to go on.");
            refuse(&mut client, peer, &e).await;
        }
        _ => {}
    }
    // A connection the node closed (NodeLost, or a break during or after
    // a commit: closed or broken) has no backend left to tell.
    if !matches!(end, End::ServerClosed | End::NodeLost | End::CommitInDoubt(_) | End::CommittedThenLost(_) | End::ClientTerminated) {
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

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    ClientClosed,
    ClientTerminated,
    ClientIo,
    ClientProtocol(FrameError),
    IdleTimeout,
    ServerClosed,
    ServerIo,
    ServerProtocol(String),
    /// The node's connection broke (or closed without a FATAL of its own)
    /// outside a commit: the client gets 08006.
    NodeLost,
    /// It broke during the commit of this gid, whose outcome the proxy
    /// cannot know: the client gets 40003.
    CommitInDoubt(String),
    /// It broke after this gid committed on the home node, while the
    /// proxy waited for the peers to confirm their commits: the client
    /// gets 08006 saying the transaction committed.
    CommittedThenLost(String),
}

/// Per-session handles so the hot path does no metric lookups. No
/// configuration is kept here: the relay reads `shared.live` where it uses
/// a setting, so that a reload reaches sessions already open.
pub struct PumpCtx<'a> {
    /// The home node's id in the cluster (its place in `[[nodes]]`, which
    /// lists them in id order): the prefix of the gids the proxy makes.
    pub node_id: usize,
    /// Extra sessions as the client's user, for statements run on every node.
    pub side: crate::everywhere::SideLogin,
    pub shared: &'a Shared,
    pub tracker: Tracker<'a>,
    pub queries_by_class: [metrics::Counter; 4],
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
}

impl<'a> PumpCtx<'a> {
    fn new(shared: &'a Shared, info: &'a Arc<SessionInfo>, node: &str, status: u8, side: crate::everywhere::SideLogin) -> Self {
        let q = |c: crate::classify::StatementClass| {
            metrics::counter!("mtm_proxy_queries_total", "node" => node.to_string(), "class" => c.as_str())
        };
        use crate::classify::StatementClass::*;
        PumpCtx {
            node_id: shared.live.load().config.nodes.iter().position(|n| n.name == node).map_or(0, |i| i + 1),
            side,
            shared,
            tracker: Tracker {
                gate: &shared.pause,
                info,
                // Idle from the login's ReadyForQuery on, so that a client
                // that never sends a query is timed out too.
                state: Mutex::new(TrackState {
                    idle_since: (status == b'I').then(Instant::now),
                    ..TrackState::default()
                }),
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
    /// When the session last became idle (no transaction, nothing pending).
    idle_since: Option<Instant>,
    /// Between the first message sent while idle and ReadyForQuery 'I'.
    in_flight: bool,
    /// Sync/Query/FunctionCall sent whose ReadyForQuery has not come back.
    pending: u64,
    busy_since: Option<Instant>,
}

/// Follows the session's transaction boundaries for the pause gate,
/// metrics and the admin console.
pub struct Tracker<'a> {
    gate: &'a crate::pause::PauseGate,
    pub info: &'a SessionInfo,
    state: Mutex<TrackState>,
    transactions: metrics::Counter,
    latency: metrics::Histogram,
    totals: &'a crate::state::Totals,
}

impl Tracker<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Since when the session is idle (None: a transaction or a request
    /// is under way).
    pub fn idle_since(&self) -> Option<Instant> {
        self.lock().idle_since
    }

    /// Before forwarding a batch with `syncs` Sync/Query/FunctionCall
    /// messages. Waits at the pause gate if this starts a transaction.
    pub async fn before_send(&self, syncs: u64) {
        {
            let mut s = self.lock();
            s.idle_since = None;
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

    /// Before the cluster commit of the open transaction: waits at the
    /// gate while it is held. The commit counts as in progress (a pause
    /// waits for it) until the pass is dropped.
    pub async fn before_commit(&self) -> crate::pause::CommitPass {
        if self.gate.is_paused() {
            self.info.state.store(session_state::WAITING, Ordering::Relaxed);
        }
        let pass = self.gate.commit().await;
        self.info.state.store(session_state::ACTIVE, Ordering::Relaxed);
        pass
    }

    pub fn on_ready(&self, status: u8) {
        let mut s = self.lock();
        s.pending = s.pending.saturating_sub(1);
        if s.pending > 0 {
            return;
        }
        if let Some(t) = s.busy_since.take() {
            self.latency.record(t.elapsed().as_secs_f64());
        }
        if status == b'I' {
            s.idle_since = Some(Instant::now());
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
    pub fn finish(&self) {
        let mut s = self.lock();
        if s.in_flight {
            s.in_flight = false;
            drop(s);
            self.gate.exit();
        }
    }
}

/// `messages` (whole backend messages) without the ParameterStatus of
/// `name`: the node reports `multimaster.xact_writes` to the proxy only.
fn without_parameter(messages: &[u8], name: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(messages.len());
    let mut rest = messages;
    while rest.len() >= 5 {
        let len = 1 + u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let (msg, tail) = rest.split_at(len.min(rest.len()));
        let ours = msg[0] == b'S' && BodyReader::new(&msg[5..]).cstr().is_ok_and(|n| n == name);
        if !ours {
            out.extend_from_slice(msg);
        }
        rest = tail;
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_xact_writes_report_is_not_passed_on() {
        let mut m = crate::net::messages::parameter_status("TimeZone", "UTC");
        m.extend_from_slice(&crate::net::messages::parameter_status(crate::relay::XACT_WRITES, "off"));
        m.extend_from_slice(&crate::net::messages::parameter_status("DateStyle", "ISO"));
        let kept = super::without_parameter(&m, crate::relay::XACT_WRITES);
        let mut expected = crate::net::messages::parameter_status("TimeZone", "UTC");
        expected.extend_from_slice(&crate::net::messages::parameter_status("DateStyle", "ISO"));
        assert_eq!(kept, expected);
    }
}
