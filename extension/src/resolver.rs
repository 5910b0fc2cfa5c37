//! The resolver: finishes the cluster's prepared transactions that their
//! coordinator left behind.
//!
//! The proxy prepares a transaction on its home node under a gid
//! `mtm-<home node id>-…`, asks for the peers' votes (`mtm.await_votes`,
//! which logs the gid PRECOMMIT in the decision log once every peer said
//! yes), then commits it there with COMMIT PREPARED: the home node's
//! COMMIT PREPARED is the commit point, and the peers follow it through
//! the stream. The home node finishes those of its gids whose
//! coordinating session is gone — the proxy was killed or lost its
//! connection, or the node itself restarted: a precommitted gid is
//! committed (every node holds it prepared and agreed), any other is
//! rolled back (nobody committed it or was told it committed). Either
//! reaches every peer like any other COMMIT/ROLLBACK PREPARED.
//!
//! A gid whose home node is down stays prepared on the peers until that
//! node is back (its WAL and decision log decide); deciding without it
//! needs the precommit recorded on a majority, which is not built yet.
//!
//! Which backend coordinates a gid is noted in shared memory when it runs
//! `PREPARE TRANSACTION 'mtm-…'` (the `xact` module's utility hook); the
//! launcher runs [`resolve_orphans`] once a second.
#![deny(unsafe_code)]
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use mtm_state::decisions::State;

const SLOTS: usize = 512;
const GID_MAX: usize = 200;
/// Leave a prepared gid alone this long after it was prepared: its
/// coordinator may still be about to be noted.
const GRACE_SECONDS: i32 = 1;

#[derive(Copy, Clone)]
struct Slot {
    pid: i32,
    gid_len: u8,
    gid: [u8; GID_MAX],
    /// The prepared transaction's id, and its prepare time (µs since
    /// 2000, as in `pg_prepared_xacts`; 0 until its coordinator reads it),
    /// for settling conflicts ([`crate::conflicts`]).
    xid: u32,
    prepared_at: i64,
}

#[derive(Copy, Clone)]
pub struct Coordinators {
    slots: [Slot; SLOTS],
}

impl Default for Coordinators {
    fn default() -> Self {
        Coordinators { slots: [Slot { pid: 0, gid_len: 0, gid: [0; GID_MAX], xid: 0, prepared_at: 0 }; SLOTS] }
    }
}


use crate::pg::shmem::COORDINATORS;

impl Coordinators {
    fn find(&self, gid: &[u8]) -> Option<usize> {
        self.slots.iter().position(|s| s.pid != 0 && &s.gid[..s.gid_len as usize] == gid)
    }
}

/// This backend prepares `gid` and will finish it.
pub fn note_prepare(gid: &str) {
    let g = gid.as_bytes();
    if !gid.starts_with("mtm-") || g.len() > GID_MAX {
        return;
    }
    let me = crate::pg::bgworker::my_pid();
    let mut t = COORDINATORS.exclusive();
    let i = t.find(g).or_else(|| t.slots.iter().position(|s| s.pid == 0 || !crate::pid_alive(s.pid)));
    // A full table only means the resolver may roll back a gid whose
    // coordinator is slow, which that coordinator then reports (40003).
    if let Some(i) = i {
        let s = &mut t.slots[i];
        s.pid = me;
        s.gid_len = g.len() as u8;
        s.gid[..g.len()].copy_from_slice(g);
        // The PREPARE has not run yet: this is the xid it will prepare.
        s.xid = crate::pg::twophase::top_xid_if_any().into_inner();
        s.prepared_at = 0;
    }
}

/// The coordinator of `gid` read its prepare time.
pub fn note_prepare_time(gid: &str, prepared_at: i64) {
    let mut t = COORDINATORS.exclusive();
    if let Some(i) = t.find(gid.as_bytes()) {
        t.slots[i].prepared_at = prepared_at;
    }
}

/// A transaction prepared here by a session of this node, found by its
/// transaction id: its gid and prepare time (None while not known yet).
pub fn prepared_here_by_xid(xid: u32) -> Option<(String, Option<i64>)> {
    let t = COORDINATORS.share();
    let s = t.slots.iter().find(|s| s.pid != 0 && s.xid == xid && xid != 0)?;
    let gid = String::from_utf8_lossy(&s.gid[..s.gid_len as usize]).into_owned();
    Some((gid, (s.prepared_at != 0).then_some(s.prepared_at)))
}

/// `gid` was committed or rolled back: nobody coordinates it any more.
pub fn note_finished(gid: &str) {
    let mut t = COORDINATORS.exclusive();
    if let Some(i) = t.find(gid.as_bytes()) {
        t.slots[i].pid = 0;
    }
}

fn coordinated(gid: &str) -> bool {
    let t = COORDINATORS.share();
    t.find(gid.as_bytes()).is_some_and(|i| crate::pid_alive(t.slots[i].pid))
}

/// Rolls back this node's own `mtm-` gids whose coordinator is gone.
/// Called by the launcher, outside a transaction.
pub fn resolve_orphans() {
    let orphans: Vec<String> = BackgroundWorker::transaction(|| {
        // Before CREATE EXTENSION there is nothing to resolve.
        let ready = Spi::get_one::<bool>("SELECT to_regclass('mtm.cluster_nodes') IS NOT NULL").ok().flatten().unwrap_or(false);
        if !ready {
            return Vec::new();
        }
        let me = Spi::get_one::<i32>("SELECT id FROM mtm.cluster_nodes WHERE is_self").ok().flatten();
        let Some(me) = me else { return Vec::new() };
        Spi::connect(|c| {
            c.select(
                "SELECT gid FROM pg_prepared_xacts
                  WHERE gid LIKE 'mtm-' || $1 || '-%' AND database = current_database()
                    AND prepared < now() - make_interval(secs => $2)",
                None,
                &[me.to_string().into(), GRACE_SECONDS.into()],
            )
            .map(|rows| rows.filter_map(|r| r.get::<String>(1).ok().flatten()).collect::<Vec<String>>())
            .unwrap_or_else(|e| {
                warning!("multimaster: resolver cannot list prepared transactions: {e}");
                Vec::new()
            })
        })
        .into_iter()
        .filter(|g| !coordinated(g))
        .collect()
    });
    for gid in orphans {
        // All peers voted yes and the decision was logged: commit it (its
        // client may not have heard, but nobody can have been told
        // otherwise). Also when its COMMIT PREPARED was logged but then
        // failed (cancelled, refused): the decision stands. Anything short
        // of that rolls back.
        let commit = matches!(crate::decisions::state(&gid), Some(State::Precommitted | State::Committed));
        let done = PgTryBuilder::new(|| {
            BackgroundWorker::transaction(|| {
                crate::decisions::log(&gid, if commit { State::Committed } else { State::Aborted });
                let c_gid = std::ffi::CString::new(gid.as_str()).expect("gid without NUL");
                // An ERROR (e.g. the coordinator finished it meanwhile)
                // unwinds to the catch below through our frames.
                crate::pg::twophase::finish_prepared(&c_gid, commit);
                if commit {
                    crate::notify::deliver(&gid);
                }
            });
            true
        })
        .catch_others(|e| {
            let (code, message) = crate::apply::describe(&e);
            let what = if commit { "commit" } else { "roll back" };
            warning!("multimaster: resolver could not {what} {gid}: {message} ({code})");
            false
        })
        .execute();
        if done {
            note_finished(&gid);
            if commit {
                log!("multimaster: resolver committed {gid}: its coordinator is gone after every node voted yes");
            } else {
                log!("multimaster: resolver rolled back {gid}: its coordinator is gone and it was not committed");
            }
        } else {
            // Clean up after the failed transaction, as a worker that
            // survives an ERROR must.
            crate::pg::twophase::abort_current_transaction();
        }
    }
}
