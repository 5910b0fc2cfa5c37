//! `pg_cancel_backend()` and `pg_terminate_backend()` across the nodes.
//!
//! A client of the proxy is given its backend's pid on its home node
//! (BackendKeyData, `pg_backend_pid()`), and another client — whose
//! session the proxy put on another node — may pass that pid to these
//! functions, as drivers' own test suites and job runners do. In the
//! proxy's sessions the node points their calls here (the parse-analysis
//! hook of `pg/notify.rs`): a pid of a backend of this node is signalled
//! by PostgreSQL's own function, as before; any other pid is offered to
//! the other nodes, over replication connections like the resolver's, and
//! the node that has it signals it with PostgreSQL's own function run as
//! the caller's role (same permission checks, same errors). A pid no
//! node has gets PostgreSQL's own answer here (a warning, false). Only
//! client sessions are signalled elsewhere: nodes on separate hosts (or
//! containers) each have their own pids, so a pid that just ended here
//! may name an unrelated process there, which must never be one of the
//! node's own workers.

use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    static OUR_CANCEL: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
    static OUR_TERMINATE: Cell<Option<pg_sys::Oid>> = const { Cell::new(None) };
}

/// What the parse-analysis hook points a query's calls of PostgreSQL's
/// `pg_cancel_backend` / `pg_terminate_backend` at, given its source
/// text: ours in a session of the proxy, nothing elsewhere.
pub(crate) fn replacements(source: &[u8]) -> Vec<(pg_sys::Oid, pg_sys::Oid)> {
    use crate::notify::{function_oid, mentions};
    let mut calls = Vec::new();
    // Cheap tests first: most queries name neither.
    if !(mentions(source, b"pg_cancel_backend") || mentions(source, b"pg_terminate_backend")) || !crate::notify::cluster_wide() {
        return calls;
    }
    if let Some(ours) = function_oid(&OUR_CANCEL, "mtm.pg_cancel_backend(integer)") {
        calls.push((pg_sys::F_PG_CANCEL_BACKEND.into(), ours));
    }
    if let Some(ours) = function_oid(&OUR_TERMINATE, "mtm.pg_terminate_backend(integer,bigint)") {
        calls.push((pg_sys::F_PG_TERMINATE_BACKEND.into(), ours));
    }
    calls
}

#[derive(Clone, Copy)]
enum Signal {
    Cancel,
    /// With PostgreSQL's `timeout` (ms to wait for the backend to exit).
    Terminate(i64),
}

/// `pg_cancel_backend(pid)` for a pid of any node.
#[pg_extern(name = "pg_cancel_backend")]
fn cancel_backend(pid: i32) -> bool {
    signal(pid, Signal::Cancel)
}

/// `pg_terminate_backend(pid, timeout)` for a pid of any node. Its
/// default is PostgreSQL's: the planner fills in a call's missing
/// arguments from the function the call points at by then, this one.
#[pg_extern(name = "pg_terminate_backend")]
fn terminate_backend(pid: i32, timeout: default!(i64, 0)) -> bool {
    signal(pid, Signal::Terminate(timeout))
}

fn signal(pid: i32, how: Signal) -> bool {
    if !crate::pg::proc::is_backend(pid) {
        if let Some(signalled) = ask_other_nodes(pid, how) {
            return signalled;
        }
    }
    postgres_own(pid, how)
}

/// PostgreSQL's own function, called by its oid (not by name: that would
/// come back here).
fn postgres_own(pid: i32, how: Signal) -> bool {
    match how {
        Signal::Cancel => crate::pg::proc::call_builtin(pg_sys::F_PG_CANCEL_BACKEND.into(), &[pid.into_datum().expect("int")]),
        Signal::Terminate(timeout) => crate::pg::proc::call_builtin(
            pg_sys::F_PG_TERMINATE_BACKEND.into(),
            &[pid.into_datum().expect("int"), timeout.into_datum().expect("bigint")],
        ),
    }
}

/// The answer of [`signal_local`] on another node.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// No backend of that pid there.
    Absent,
    /// PostgreSQL's function returned this.
    Signalled(bool),
    /// It raised this error (SQLSTATE, message).
    Refused(String, String),
}

impl Answer {
    fn to_text(&self) -> String {
        match self {
            Answer::Absent => "absent".into(),
            Answer::Signalled(b) => if *b { "t" } else { "f" }.into(),
            Answer::Refused(code, message) => format!("E{code}{message}"),
        }
    }

    fn parse(text: &str) -> Option<Answer> {
        match text {
            "absent" => Some(Answer::Absent),
            "t" => Some(Answer::Signalled(true)),
            "f" => Some(Answer::Signalled(false)),
            _ => {
                let rest = text.strip_prefix('E')?;
                let code = rest.get(..5)?;
                Some(Answer::Refused(code.to_string(), rest[5..].to_string()))
            }
        }
    }
}

/// Offers `pid` to every other node heard from lately; the answer of the
/// first that has it (None: none has it). A node's own error (the caller
/// may not signal that backend) is raised here as it was raised there.
fn ask_other_nodes(pid: i32, how: Signal) -> Option<bool> {
    let (terminate, timeout) = match how {
        Signal::Cancel => (false, 0),
        Signal::Terminate(t) => (true, t),
    };
    let sql = format!(
        "SELECT mtm.signal_local({pid}, {}, {terminate}, {timeout})",
        crate::quote_literal(&crate::pg::catalog::current_user_name())
    );
    let sql = std::ffi::CString::new(sql).ok()?;
    let nodes: Vec<(i32, String)> = crate::pg::catalog::as_superuser(|| {
        Spi::connect(|c| {
            c.select("SELECT id, conninfo FROM mtm.cluster_nodes WHERE NOT is_self ORDER BY id", None, &[])
                .map(|rows| rows.filter_map(|r| Some((r.get::<i32>(1).ok().flatten()?, r.get::<String>(2).ok().flatten()?))).collect())
                .unwrap_or_default()
        })
    });
    // Connecting and asking have no timeout of their own (a frozen node);
    // a terminate's own wait is added to the deadline.
    let deadline = ASK_TIMEOUT_MS.saturating_add(i32::try_from(timeout).unwrap_or(i32::MAX));
    for (id, conninfo) in nodes.iter().filter(|(id, _)| crate::pool::heard_within(*id, crate::pool::REACHABLE_WITHIN_MS)) {
        let Ok(conninfo) = std::ffi::CString::new(conninfo.as_str()) else { continue };
        let answer = crate::pg::proc::with_deadline(deadline, || {
            let conn = crate::pg::walrcv::load().connect(&conninfo, c"mtm-signal")?;
            let rows = conn.exec(&sql, 1);
            conn.disconnect();
            rows
        });
        let text = match answer {
            Ok(rows) => rows.into_iter().next().and_then(|r| r.into_iter().next().flatten()).unwrap_or_default(),
            Err(e) => {
                debug1!("multimaster: cannot offer pid {pid} to node {id}: {e}");
                continue;
            }
        };
        match Answer::parse(&text) {
            Some(Answer::Absent) | None => continue,
            Some(Answer::Signalled(b)) => return Some(b),
            Some(Answer::Refused(code, message)) => {
                pgrx::pg_sys::panic::ErrorReport::new(crate::votes::sqlstate_code(&code).into(), message, "pg_signal_backend")
                    .report(PgLogLevel::ERROR);
            }
        }
    }
    None
}

const ASK_TIMEOUT_MS: i32 = 3000;

/// Another node's offer of `pid`: if a backend of this node has it,
/// PostgreSQL's `pg_cancel_backend` (or `pg_terminate_backend` with
/// `timeout`) run as `role`, which must exist here; its error, if it
/// raises one, comes back as the answer. Run by superusers only (over a
/// replication connection), never granted.
#[pg_extern]
fn signal_local(pid: i32, role: &str, terminate: bool, timeout: i64) -> String {
    // Only a client's session: the caller means one it was told of, and a
    // pid that ended on its own node may be reused here by anything (the
    // nodes' pids are apart only on one host) — never by a worker of ours.
    if !crate::pg::proc::is_backend(pid) || !is_client_backend(pid) {
        return Answer::Absent.to_text();
    }
    let how = if terminate { Signal::Terminate(timeout) } else { Signal::Cancel };
    let role = std::ffi::CString::new(role).unwrap_or_default();
    let answer = PgTryBuilder::new(|| Answer::Signalled(crate::pg::catalog::as_existing_role(&role, || postgres_own(pid, how))))
        .catch_others(|e| {
            let (code, message) = crate::apply::describe(&e);
            Answer::Refused(code, message)
        })
        .execute();
    answer.to_text()
}

/// Whether `pid` is a client's session on this node (not a background
/// worker, a walsender, or any other process of the server).
fn is_client_backend(pid: i32) -> bool {
    Spi::get_one_with_args::<bool>("SELECT backend_type = 'client backend' FROM pg_catalog.pg_stat_activity WHERE pid = $1", &[pid.into()])
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::Answer;

    #[test]
    fn answers_read_back_as_written() {
        for a in [Answer::Absent, Answer::Signalled(true), Answer::Signalled(false), Answer::Refused("42501".into(), "permission denied to cancel query".into())] {
            assert_eq!(Answer::parse(&a.to_text()), Some(a));
        }
        assert_eq!(Answer::parse("E42"), None);
        assert_eq!(Answer::parse(""), None);
    }
}
