//! The relay: a session's forwarding loop, which understands every
//! message it passes on, so that it can put its own statements in and
//! answer for the node where the cluster's commit needs it.
//!
//! Two halves run side by side, so a full socket on one side never stalls
//! the other (a pipelining client and a node writing results cannot
//! deadlock):
//! - the **driver** (client → node) cuts the client's messages into units
//!   — a Query, a FunctionCall, or extended-protocol messages up to their
//!   Sync — and decides for each how it runs: as sent; wrapped in a
//!   transaction of the proxy's (an autocommit unit that may write); or,
//!   for a COMMIT of a transaction that wrote, replaced by the cluster's
//!   two-phase commit ([`crate::commit`]). Every unit and every statement
//!   of the proxy's own pushes an [`Expect`] entry;
//! - the **responder** (node → client) cuts the node's output into
//!   messages (a large one streams through, never held whole) and treats
//!   each according to the [`Expect`] at the head of the queue: forward,
//!   skip, hold the ReadyForQuery for the driver, or capture the answer to
//!   the proxy's own statement. It also swallows the node's report of
//!   `multimaster.xact_writes` (whether the open transaction wrote).
//!
//! Plain reads cost nothing extra: a unit that cannot write is forwarded
//! with one queue entry and no extra round trip; a read-only transaction
//! commits with the client's own COMMIT.
//!
//! Its parts: [`responder`] (node → client), [`driver`] (client → node:
//! units, batches, the extended protocol) and [`two_phase`] (where a COMMIT,
//! COMMIT AND CHAIN or PREPARE TRANSACTION of a transaction that wrote is
//! replaced by the cluster's two-phase commit, and how its end reaches
//! the client).

mod driver;
mod responder;
mod two_phase;

use driver::Driver;
use responder::Responder;
use crate::classify::{intent, Intent};
use crate::commit::{self, Reply, Votes};
use crate::net::frame::{parse_text, query_text, Batch, BodyReader, FrameIoError, FrameReader, FrameRef, Read};
use crate::net::messages::{self, PgError};
use crate::session::{count_error, End, PumpCtx};
use bytes::BytesMut;
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

/// Startup parameter the proxy sets on its node sessions (see the
/// extension's `xact` module).
pub const COORDINATED_COMMIT: &str = "multimaster.coordinated_commit";
/// The node's reported setting: the open transaction wrote to a
/// replicated table.
pub const XACT_WRITES: &str = "multimaster.xact_writes";

/// A message bigger than this streams through the responder in pieces.
const WHOLE_MESSAGE_LIMIT: usize = 256 * 1024;

/// The longest a session goes without looking at the configuration
/// again: how late a reloaded `client_idle_timeout` or `max_message_size`
/// can reach it. Chosen over waking sessions on reload, which would add a
/// waiter registration (a lock) to every read; its cost is one timer
/// wake-up per second per session.
const RECHECK: Duration = Duration::from_secs(1);

/// How the responder treats the node's answers to one request.
enum Expect {
    /// The proxy's own BEGIN in front of a client unit: swallow this many
    /// messages.
    Skip(usize),
    /// A client unit: forward everything through its ReadyForQuery.
    Forward,
    /// A client unit the proxy finishes itself: forward its answers but
    /// hand the ReadyForQuery to the driver — and with `hold_complete` its
    /// last CommandComplete too, which PostgreSQL sends only after a
    /// successful commit in the simple protocol.
    Hold { hold_complete: bool, tx: oneshot::Sender<Held> },
    /// The proxy's own statement: collect its answer for the driver.
    Capture(oneshot::Sender<Vec<Reply>>),
}

/// The held end of a unit.
#[derive(Debug, Default)]
struct Held {
    status: u8,
    complete: Option<BytesMut>,
    /// An ErrorResponse was among the unit's answers.
    error: bool,
}

/// What the two halves share.
struct Link<CW> {
    expect: Mutex<VecDeque<Expect>>,
    /// Signalled whenever an entry leaves the queue.
    progressed: Notify,
    /// Transaction status of the last ReadyForQuery from the node.
    status: AtomicU8,
    /// The node said the open transaction wrote to a replicated table.
    wrote: AtomicBool,
    /// The commit under way, from its PREPARE until its outcome is
    /// known: should the node's connection break meanwhile, the client is
    /// told the truth about it ([`Committing`]).
    committing: Mutex<Option<Committing>>,
    /// The node sent a FATAL error (passed on to the client, which then
    /// knows why the session ends — unless a commit was under way: then
    /// the client hears how the commit stands instead).
    node_fatal: AtomicBool,
    /// The node answered a COPY FROM STDIN with CopyInResponse, and the
    /// driver has not yet matched it to the client's COPY data.
    copy_in_response: AtomicBool,
    /// Answers of the node that came with nothing expected — those to the
    /// messages of a unit still short of its Sync — counted as
    /// [`Loose`] does: the driver can tell when the node has answered
    /// every message of a unit sent so far.
    loose: Mutex<Loose>,
    /// NotificationResponses that arrived while the proxy's own
    /// statements ran (its commit): PostgreSQL delivers them after the
    /// answer, just before ReadyForQuery, so they wait for the next
    /// ReadyForQuery the client gets.
    notifications: Mutex<BytesMut>,
    client: tokio::sync::Mutex<CW>,
}

/// Running counts of the node's loose answers: the messages that end
/// the answer to one extended-protocol message (ParseComplete,
/// BindComplete, CloseComplete, ParameterDescription, RowDescription,
/// NoData, CommandComplete, EmptyQueryResponse, PortalSuspended), and
/// the errors, after which the node skips the rest of the unit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Loose {
    answers: usize,
    errors: usize,
}

impl Loose {
    fn count(&mut self, tag: u8) -> bool {
        match tag {
            b'1' | b'2' | b'3' | b't' | b'T' | b'n' | b'C' | b'I' | b's' => self.answers += 1,
            b'E' => self.errors += 1,
            _ => return false,
        }
        true
    }
}

/// How many of the answers [`Loose`] counts the node owes to the
/// client's extended-protocol message `tag` (a Describe of a statement:
/// ParameterDescription and then RowDescription or NoData).
fn answers_owed(tag: u8, body: &[u8]) -> usize {
    match tag {
        b'P' | b'B' | b'C' | b'E' => 1,
        b'D' if body.first() == Some(&b'S') => 2,
        b'D' => 1,
        _ => 0,
    }
}

impl<CW: AsyncWrite + Unpin> Link<CW> {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Expect>> {
        self.expect.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn loose(&self) -> Loose {
        *self.loose.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold_notification(&self, raw: &[u8]) {
        self.notifications.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(raw);
    }

    /// The notifications held back, to go out before a ReadyForQuery.
    fn held_notifications(&self) -> Option<BytesMut> {
        let mut held = self.notifications.lock().unwrap_or_else(|e| e.into_inner());
        (!held.is_empty()).then(|| held.split())
    }

    /// From the PREPARE of the commit of `gid` (Some) until its outcome
    /// has reached the client (None); [`Committing::Committed`] once its
    /// COMMIT PREPARED has answered. The session's `committing` flag, which
    /// the cancel registry reads, follows it.
    fn set_committing(&self, info: &crate::state::SessionInfo, state: Option<Committing>) {
        info.committing.store(state.is_some(), Ordering::Relaxed);
        *self.committing.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// A commit is under way, or its outcome (committed, or not known)
    /// has not reached the client yet.
    fn committing(&self) -> bool {
        self.committing.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn set_status(&self, status: u8) {
        self.status.store(status, Ordering::Relaxed);
        if status == b'I' {
            self.wrote.store(false, Ordering::Relaxed);
        }
    }

    async fn to_client(&self, bytes: &[u8]) -> Result<(), End> {
        let mut c = self.client.lock().await;
        c.write_all(bytes).await.map_err(|_| End::ClientIo)
    }
}

/// Runs a session until either side ends it.
pub async fn pump<CR, CW, SR, SW>(cr: CR, cw: CW, sr: SR, sw: SW, ctx: &PumpCtx<'_>, initial_status: u8) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let link = Link {
        expect: Mutex::new(VecDeque::new()),
        progressed: Notify::new(),
        status: AtomicU8::new(initial_status),
        wrote: AtomicBool::new(false),
        committing: Mutex::new(None),
        node_fatal: AtomicBool::new(false),
        copy_in_response: AtomicBool::new(false),
        loose: Mutex::new(Loose::default()),
        notifications: Mutex::new(BytesMut::new()),
        client: tokio::sync::Mutex::new(cw),
    };
    let mut driver = Driver {
        sw,
        link: &link,
        ctx,
        reader: FrameReader::new(ctx.shared.live.load().config.limits.max_message_size),
        out: BytesMut::new(),
        statements: HashMap::default(),
        portals: HashMap::default(),
        writes: 0,
        looked_ahead_to: 0,
        last_tag: 0,
        copy_after_sync: false,
        bytewise: false,
        unit: None,
        pending: None,
        wake: Box::pin(tokio::time::sleep(RECHECK)),
    };
    let responder = Responder { link: &link, ctx, out: BytesMut::new(), held_complete: None, held_error: false, captured: Vec::new(), fire: Vec::new(), progressed: false };
    let driving = driver.run(cr);
    tokio::pin!(driving);
    let end = tokio::select! {
        biased;
        end = &mut driving => end,
        end = responder.run(sr) => {
            // The node's side ended with answers the responder already
            // handed to the driver, which has not read them yet: during
            // a commit one of them may be COMMIT PREPARED's, which
            // changes what the client must be told. Let the driver catch
            // up (it then waits for an answer that never comes).
            if matches!(end, End::ServerClosed | End::ServerIo | End::ServerProtocol(_)) && link.committing() {
                let _ = tokio::time::timeout(std::time::Duration::from_millis(100), &mut driving).await;
            }
            end
        }
    };
    let committing = link.committing.lock().unwrap_or_else(|e| e.into_inner()).take();
    session_end(end, committing, link.node_fatal.load(Ordering::Relaxed))
}

/// What the client is told when the session ends with `end`: while a
/// commit is under way or its outcome has not reached the client yet
/// (`committing`), a lost node means 40003 or "committed"; otherwise a
/// node that went away without a FATAL the client saw means 08006.
fn session_end(end: End, committing: Option<Committing>, node_fatal_seen: bool) -> End {
    match (end, committing) {
        (End::ServerClosed | End::ServerIo | End::ServerProtocol(_), Some(Committing::InDoubt(gid))) => End::CommitInDoubt(gid),
        (End::ServerClosed | End::ServerIo | End::ServerProtocol(_), Some(Committing::Committed(gid))) => End::CommittedThenLost(gid),
        (End::ServerClosed | End::ServerIo, None) if !node_fatal_seen => End::NodeLost,
        (end, _) => end,
    }
}

/// Where the commit of a session stands while the proxy runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Committing {
    /// Prepared, votes or the decision not yet known: a break now leaves
    /// its outcome to the cluster.
    InDoubt(String),
    /// COMMIT PREPARED answered on the home node: committed, whatever
    /// happens to the wait for the peers' commits after it.
    Committed(String),
}

/// A simple-protocol Query message of `sql` (a part of the client's
/// Query, read one char per byte when `bytewise`: see
/// [`crate::net::frame::sql_text`]).
fn own_query(sql: &str, bytewise: bool) -> BytesMut {
    let mut body = crate::net::frame::sql_bytes(sql, bytewise);
    body.push(0);
    crate::net::frame::frame(b'Q', &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_node_is_reported_as_the_commit_stands() {
        let ended = |end, committing, fatal_seen| format!("{:?}", session_end(end, committing, fatal_seen));
        let g = || "mtm-1-x".to_string();
        assert_eq!(ended(End::ServerClosed, Some(Committing::InDoubt(g())), true), "CommitInDoubt(\"mtm-1-x\")");
        // Committed, the answer not yet with the client: even if the node
        // sent its FATAL, the client hears that it committed.
        assert_eq!(ended(End::ServerIo, Some(Committing::Committed(g())), true), "CommittedThenLost(\"mtm-1-x\")");
        assert_eq!(ended(End::ServerClosed, None, false), "NodeLost", "no FATAL reached the client");
        assert_eq!(ended(End::ServerClosed, None, true), "ServerClosed", "the client read the node's FATAL");
        assert_eq!(ended(End::ClientClosed, Some(Committing::InDoubt(g())), false), "ClientClosed");
    }

    #[test]
    fn the_answers_a_unit_is_owed_match_what_the_node_counts_as_loose() {
        // Parse, Bind, Describe of a statement, Execute of a SELECT, Close:
        // ParseComplete, BindComplete, ParameterDescription and
        // RowDescription, rows and CommandComplete, CloseComplete.
        let owed: usize = [(b'P', &b"\0"[..]), (b'B', b"\0"), (b'D', b"Sname\0"), (b'E', b"\0"), (b'C', b"Sname\0"), (b'H', b"")]
            .iter()
            .map(|(tag, body)| answers_owed(*tag, body))
            .sum();
        let mut loose = Loose::default();
        for tag in *b"12tTDDCN3" {
            loose.count(tag);
        }
        assert_eq!(loose, Loose { answers: owed, errors: 0 }, "rows and notices are not answers");
        assert!(loose.count(b'E'));
        assert_eq!(loose.errors, 1);
        assert_eq!(answers_owed(b'D', b"P\0"), 1, "a portal's Describe: RowDescription or NoData");
    }
}
