//! The cluster's two-phase commit, as the proxy drives it on a session's
//! home node (the relay in [`crate::relay`] decides *when*; this module
//! says *what* is sent and how the answers read):
//!
//! 1. `PREPARE TRANSACTION 'mtm-…'` — the node writes the PREPARE; its
//!    walsenders decode it at once and every peer applies and prepares it;
//! 2. `SELECT … FROM mtm.await_votes('mtm-…', timeout)`, sent together
//!    with the PREPARE (no extra round trip) — each peer's yes or no comes
//!    back to the home node over the replication stream and is counted
//!    there (the extension's `votes` module);
//! 3. all yes: `COMMIT PREPARED`, which the peers decode and follow, then
//!    the client hears COMMIT; any no or a timeout: `ROLLBACK PREPARED`
//!    everywhere and SQLSTATE 40001, naming the node and its reason.
//!
//! The proxy's statements go out in the extended protocol under a
//! statement name of its own and the unnamed portal, each closed by its own
//! Sync: a client's unnamed prepared statement is left untouched, which a
//! simple Query would destroy.

use crate::net::frame::{frame, BodyReader};
use crate::net::messages::PgError;
use bytes::{BufMut, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the proxy's own prepared statement on every node session.
const OWN_STATEMENT: &str = "mtm_proxy_stmt";

/// One whole backend message, as the node sent it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub tag: u8,
    pub raw: BytesMut,
}

impl Reply {
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// The messages that run `sql` as the proxy's own statement:
/// CloseComplete, ParseComplete, BindComplete, the result (rows +
/// CommandComplete, or ErrorResponse), CloseComplete (its portal) and
/// CloseComplete come back. The statement is closed after it ran, so the client never sees it in
/// `pg_prepared_statements`; and before, in case the last one failed
/// (the node then skipped its Close).
pub fn own_statement(sql: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(sql.len() + 128);
    let mut close = BytesMut::new();
    close.put_u8(b'S');
    put_cstr(&mut close, OWN_STATEMENT);
    let close = frame(b'C', &close);
    out.extend_from_slice(&close);
    let mut parse = BytesMut::new();
    put_cstr(&mut parse, OWN_STATEMENT);
    put_cstr(&mut parse, sql);
    parse.put_i16(0);
    out.extend_from_slice(&frame(b'P', &parse));
    // A portal of its own too, closed after it ran: the unnamed one may
    // be a client's, suspended mid-result, to be read on after the
    // proxy's statement.
    let mut bind = BytesMut::new();
    put_cstr(&mut bind, OWN_STATEMENT);
    put_cstr(&mut bind, OWN_STATEMENT);
    bind.put_i16(0);
    bind.put_i16(0);
    bind.put_i16(0);
    out.extend_from_slice(&frame(b'B', &bind));
    let mut execute = BytesMut::new();
    put_cstr(&mut execute, OWN_STATEMENT);
    execute.put_i32(0);
    out.extend_from_slice(&frame(b'E', &execute));
    let mut close_portal = BytesMut::new();
    close_portal.put_u8(b'P');
    put_cstr(&mut close_portal, OWN_STATEMENT);
    out.extend_from_slice(&frame(b'C', &close_portal));
    out.extend_from_slice(&close);
    out
}

/// [`own_statement`] closed by a Sync: a unit of its own.
pub fn own_unit(sql: &str) -> BytesMut {
    let mut out = own_statement(sql);
    out.extend_from_slice(&frame(b'S', &[]));
    out
}

/// Messages that answer [`own_statement`] when it succeeds without rows
/// (Close, Parse, Bind, CommandComplete, Close, Close): what the relay
/// skips after the BEGIN it puts in front of an autocommit unit (a BEGIN,
/// with no transaction block open, does not fail).
pub const OWN_STATEMENT_REPLIES: usize = 6;

/// A Sync message.
pub fn sync() -> BytesMut {
    frame(b'S', &[])
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// A SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A gid unique in the cluster: the home node's id (its resolver finishes
/// the gid if the proxy goes away), the time, this proxy process, the
/// session and a per-process counter.
pub fn new_gid(node: usize, session: u64) -> String {
    static INSTANCE: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let instance = *INSTANCE.get_or_init(|| now.as_nanos() as u64 ^ ((std::process::id() as u64) << 40));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("mtm-{node}-{:x}-{:x}-{session}-{n}", now.as_micros(), instance & 0xffff_ffff_ffff)
}

/// The statement that waits for the peers' votes on `gid`.
/// The START TRANSACTION that continues a chain, from the ended
/// transaction's `transaction_isolation`, `transaction_read_only` and
/// `transaction_deferrable` settings.
pub fn chained_begin(isolation: &str, read_only: &str, deferrable: &str) -> String {
    let level = match isolation {
        "serializable" => "SERIALIZABLE",
        "repeatable read" => "REPEATABLE READ",
        "read uncommitted" => "READ UNCOMMITTED",
        _ => "READ COMMITTED",
    };
    let mut sql = format!("START TRANSACTION ISOLATION LEVEL {level}");
    sql.push_str(if read_only == "on" { ", READ ONLY" } else { ", READ WRITE" });
    if deferrable == "on" {
        sql.push_str(", DEFERRABLE");
    }
    sql
}

/// The wait for every peer to have committed `gid` (after its COMMIT
/// PREPARED here).
pub fn await_commits_sql(gid: &str, timeout: Duration) -> String {
    format!("SELECT mtm.await_commits({}, {})", literal(gid), timeout.as_millis().min(i32::MAX as u128))
}

pub fn await_votes_sql(gid: &str, timeout: Duration) -> String {
    format!("SELECT ok, node, sqlstate, message FROM mtm.await_votes({}, {})", literal(gid), timeout.as_millis().min(i32::MAX as u128))
}

/// The ErrorResponse among replies, if any.
pub fn error_of(replies: &[Reply]) -> Option<&Reply> {
    replies.iter().find(|r| r.tag == b'E')
}

/// The CommandComplete tag among replies, if any.
pub fn command_tag(replies: &[Reply]) -> Option<String> {
    let r = replies.iter().find(|r| r.tag == b'C')?;
    BodyReader::new(r.body()).cstr().ok().map(str::to_string)
}

/// The text columns of the first DataRow among replies.
pub fn first_row(replies: &[Reply]) -> Option<Vec<Option<String>>> {
    let r = replies.iter().find(|r| r.tag == b'D')?;
    let mut body = BodyReader::new(r.body());
    let n = u16::from_be_bytes(body.bytes(2).ok()?.try_into().ok()?);
    let mut cols = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = body.i32().ok()?;
        if len < 0 {
            cols.push(None);
        } else {
            cols.push(Some(String::from_utf8_lossy(body.bytes(len as usize).ok()?).into_owned()));
        }
    }
    Some(cols)
}

/// What the peers said, read from `mtm.await_votes`' row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Votes {
    AllYes,
    /// A peer said no or did not answer: the client gets this error.
    Refused(PgError),
    /// Every node voted yes but too few confirmed the decision in time:
    /// the gid stays prepared for the resolvers, and the client is told
    /// the outcome is unknown.
    Undecided(PgError),
}

/// Reads the answer to [`await_votes_sql`] for `gid`.
pub fn read_votes(gid: &str, replies: &[Reply]) -> Votes {
    if let Some(e) = error_of(replies) {
        // No schema `mtm`: a database without the extension, each node's
        // own. A transaction prepared there (read-only for the cluster:
        // the node reports no replicated write) has nobody to vote on it.
        if crate::net::scan::sqlstate(e.body()).as_deref() == Some("3F000") {
            return Votes::AllYes;
        }
        let msg = crate::net::scan::error_field(e.body(), b'M').unwrap_or_default();
        return Votes::Refused(
            PgError::error("40001", format!("could not serialize access: the votes on {gid} could not be collected: {msg}"))
                .with_hint("The transaction was rolled back on every node; retry it."),
        );
    }
    match first_row(replies).as_deref() {
        Some([Some(ok), ..]) if ok == "t" => Votes::AllYes,
        Some([_, _, Some(sqlstate), message]) if sqlstate == "40003" => Votes::Undecided(
            PgError::error("40003", format!("the outcome of the transaction is not known yet: {}", message.clone().unwrap_or_default()))
                .with_hint("A majority of the nodes decides it within seconds of being reachable; check the data before retrying."),
        ),
        // Until nodes can be voted out, a write needs every node.
        Some([_, Some(node), Some(sqlstate), message]) if sqlstate.starts_with("08") => Votes::Refused(
            PgError::error(
                "40001",
                format!("could not serialize access: the transaction was rolled back because node {node} cannot vote on it: {}", message.clone().unwrap_or_default()),
            )
            .with_hint(format!("Every node of the cluster must vote on a write; retry once node {node} is back (reads work meanwhile).")),
        ),
        Some([_, node, sqlstate, message]) => {
            let node = node.clone().unwrap_or_default();
            let sqlstate = sqlstate.clone().unwrap_or_default();
            let message = message.clone().unwrap_or_default();
            Votes::Refused(
                PgError::error(
                    "40001",
                    format!("could not serialize access: the transaction was rolled back because node {node} refused it: {message} ({sqlstate})"),
                )
                .with_hint("Another transaction on another node changed the same rows, or the node could not apply it; retry the transaction."),
            )
        }
        _ => Votes::Refused(PgError::error("40001", format!("could not serialize access: no answer about the votes on {gid}"))),
    }
}

/// The client's error when COMMIT PREPARED itself failed after every node
/// voted yes: the outcome is not known here.
pub fn commit_unknown(gid: &str, replies: &[Reply]) -> PgError {
    let msg = error_of(replies).and_then(|e| crate::net::scan::error_field(e.body(), b'M')).unwrap_or_default();
    PgError::error("40003", format!("the commit of {gid} failed on its node after every node agreed to it: {msg}"))
        .with_hint("The transaction is prepared on every node and will be finished by the cluster; check pg_prepared_xacts before retrying.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(raw: BytesMut) -> Reply {
        Reply { tag: raw[0], raw }
    }

    #[test]
    fn a_chain_keeps_the_transaction_characteristics() {
        assert_eq!(chained_begin("repeatable read", "off", "off"), "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE");
        assert_eq!(chained_begin("serializable", "on", "on"), "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE");
        assert_eq!(chained_begin("read committed", "off", "off"), "START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE");
    }

    #[test]
    fn own_statements_are_well_framed_extended_messages() {
        let m = own_unit("COMMIT PREPARED 'g'");
        let tags: Vec<u8> = {
            let mut v = Vec::new();
            let mut i = 0;
            while i < m.len() {
                v.push(m[i]);
                i += 1 + u32::from_be_bytes([m[i + 1], m[i + 2], m[i + 3], m[i + 4]]) as usize;
            }
            assert_eq!(i, m.len());
            v
        };
        assert_eq!(tags, b"CPBECCS", "closed before and after, its portal too: never left for the client to see");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn gids_are_unique_and_short() {
        let a = new_gid(2, 7);
        let b = new_gid(2, 7);
        assert_ne!(a, b);
        assert!(a.starts_with("mtm-2-") && a.len() < 200, "{a}");
    }

    #[test]
    fn votes_are_read_from_the_row() {
        let row = |cols: &[Option<&str>]| {
            let mut body = BytesMut::new();
            body.put_u16(cols.len() as u16);
            for c in cols {
                match c {
                    None => body.put_i32(-1),
                    Some(s) => {
                        body.put_i32(s.len() as i32);
                        body.put_slice(s.as_bytes());
                    }
                }
            }
            reply(frame(b'D', &body))
        };
        assert_eq!(read_votes("g", &[row(&[Some("t"), Some("1"), None, None])]), Votes::AllYes);
        let Votes::Refused(e) = read_votes("g", &[row(&[Some("f"), Some("2"), Some("55P03"), Some("lock timeout")])]) else {
            panic!()
        };
        assert_eq!(e.code, "40001");
        assert!(e.message.contains("node 2") && e.message.contains("lock timeout") && e.message.contains("55P03"), "{}", e.message);
        let err = reply(PgError::error("42883", "function mtm.await_votes does not exist").encode());
        assert!(matches!(read_votes("g", &[err]), Votes::Refused(e) if e.code == "40001"));
        let no_extension = reply(PgError::error("3F000", "schema \"mtm\" does not exist").encode());
        assert_eq!(read_votes("g", &[no_extension]), Votes::AllYes);
        assert!(matches!(read_votes("g", &[]), Votes::Refused(_)));
        let undecided = read_votes("g", &[row(&[Some("f"), Some("2"), Some("40003"), Some("a majority did not confirm")])]);
        assert!(matches!(undecided, Votes::Undecided(e) if e.code == "40003" && e.message.contains("a majority did not confirm")));
        let Votes::Refused(e) = read_votes("g", &[row(&[Some("f"), Some("3"), Some("08006"), Some("node 3 is unreachable")])]) else {
            panic!()
        };
        assert_eq!(e.code, "40001");
        assert!(e.message.contains("node 3 cannot vote") && e.hint.as_deref().is_some_and(|h| h.contains("once node 3 is back")), "{e:?}");
    }
}
