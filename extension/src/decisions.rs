//! The durable 2PC decision log: the extension's own WAL resource manager
//! and the table it is redone into.
//!
//! Four record types, each carrying one `mtm-` gid (PROTOCOL.md, "WAL
//! records"): PRECOMMIT, logged by `mtm.await_votes` on the home node once
//! every peer voted yes, and on each peer as it is told so (the gid
//! commits once a majority logged it); PREABORT, a node's promise to a
//! resolver never to precommit the gid; COMMIT and ABORT, logged on every
//! node just before its COMMIT PREPARED / ROLLBACK PREPARED of the gid (by
//! the proxy's session, the apply worker or the resolver), so the commit
//! record's own flush makes them durable. The two promises are flushed
//! before anyone is told of them. The states live in a table in
//! shared memory (logic in the safe `mtm-state` crate): filled as records
//! are written, redone from the WAL after a crash, and copied by the
//! launcher to `pg_mtm/decisions` (at most a second after a change, and
//! when it stops) and by the checkpointer to `pg_mtm/decisions.checkpoint`
//! as each checkpoint starts, so what a checkpoint puts out of the redo's
//! reach is read back at start.
//! `mtm.get_logged_prepared_xact_state(gid)` answers from it;
//! `pg_walinspect` shows the records (`rm_identify`, `rm_desc`).
//!
//! Why the checkpointer writes the file, and how: a record older than a
//! checkpoint's redo point is not redone after a crash, so the file must
//! hold it before that checkpoint completes. PostgreSQL 15 calls no
//! extension code inside a checkpoint, but it logs "checkpoint starting"
//! (`log_checkpoints`, on by default and in `conf/node.conf`) right after
//! fixing the redo point and before writing anything out; an
//! `emit_log_hook` that sees that message in the checkpointer writes the
//! file then. A record and its table entry are made under the table's
//! lock, so every record before the redo point is in the table when the
//! hook reads it.

#![deny(unsafe_code)]

use crate::pg::elog::ReportedError;
use crate::pg::rmgr::Record;
use mtm_state::decisions::{Log, State};
use pgrx::prelude::*;
use std::ffi::CStr;

/// The resource manager's id, in PostgreSQL's range for custom ones
/// (128–255). Not RM_EXPERIMENTAL_ID (128), which any extension under
/// development may use.
pub const RMGR_ID: u8 = 201;
const RMGR_NAME: &CStr = c"multimaster";

/// Where the state files are, relative to the data directory.
const STATE_DIR: &str = "pg_mtm";

#[derive(Copy, Clone, Default)]
pub struct Decisions {
    log: Log,
    /// The state file has been read into `log` (once per server start).
    loaded: bool,
}


pub use crate::pg::shmem::DECISIONS;

/// `log.changes()` of the snapshot this process last put in place (each
/// file has one writer process; after a restart of it the file is simply
/// written again).
static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// Registers the resource manager (from `_PG_init`, while preloading).
pub fn init() {
    crate::pg::rmgr::register(RMGR_ID, RMGR_NAME);
}

/// Whether checkpoints announce their start, which is when the state file
/// is written for them (see the module's documentation).
pub fn checkpoints_logged() -> bool {
    crate::setting(c"log_checkpoints").as_deref() == Some("on")
}

/// Logs `state` for `gid` (an `mtm-` gid; others are not logged) and
/// returns the record's position. The record is not flushed here: COMMIT
/// and ABORT are flushed by the commit record that follows them, and a
/// PRECOMMIT lost in a crash is one whose COMMIT PREPARED never ran.
pub fn log(gid: &str, state: State) -> Option<u64> {
    if !mtm_state::decisions::loggable(gid) {
        return None;
    }
    ensure_loaded();
    // Record and entry under one lock: a checkpoint's hook that reads the
    // table after the redo point was fixed sees every record before it.
    let mut d = DECISIONS.exclusive();
    let lsn = crate::pg::rmgr::insert(RMGR_ID, state.info(), gid.as_bytes());
    d.log.note(gid, state, lsn);
    Some(lsn)
}

/// Promises `want` (precommitted or preaborted) for `gid`, unless this
/// node logged the opposite, which it then returns
/// ([`mtm_state::decisions::promise`]). The check and the record are made
/// under one lock, so two promises cannot cross. Returns the record's
/// position when one was written; it is not flushed here: the caller
/// flushes before it tells anyone.
pub fn promise(gid: &str, want: State) -> Result<Option<u64>, State> {
    if !mtm_state::decisions::loggable(gid) {
        return Ok(None);
    }
    ensure_loaded();
    let mut d = DECISIONS.exclusive();
    let Some(state) = mtm_state::decisions::promise(d.log.get(gid), want)? else {
        return Ok(None);
    };
    let lsn = crate::pg::rmgr::insert(RMGR_ID, state.info(), gid.as_bytes());
    d.log.note(gid, state, lsn);
    Ok(Some(lsn))
}

/// Whether `gid`, which the log does not hold, may have been finished
/// here and trimmed from it (`Log::may_have_forgotten`).
pub fn may_have_forgotten(gid: &str) -> bool {
    ensure_loaded();
    DECISIONS.share().log.may_have_forgotten(gid)
}

/// What this node logged about `gid`.
pub fn state(gid: &str) -> Option<State> {
    ensure_loaded();
    DECISIONS.share().log.get(gid)
}

/// Reads the state file into the table, once per server start (from the
/// redo's start, or at first use when there was nothing to redo).
fn ensure_loaded() {
    if DECISIONS.share().loaded {
        return;
    }
    let mut d = DECISIONS.exclusive();
    if d.loaded {
        return;
    }
    d.loaded = true;
    for file in [Writer::Launcher, Writer::Checkpointer].map(state_file) {
        match std::fs::read_to_string(file) {
            Ok(text) => match d.log.load(&text) {
                Ok(_) => {}
                Err(e) => warning!("multimaster: {file} is damaged ({e}); decisions before the last checkpoint may be missing"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warning!("multimaster: cannot read {file}: {e}"),
        }
    }
}

/// Writes the table to the state file if it changed since the last
/// write (the launcher calls this once a second and when it stops).
pub fn persist() {
    ensure_loaded();
    if let Err(e) = write_if_changed(Writer::Launcher) {
        warning!("multimaster: cannot write {}: {e}", state_file(Writer::Launcher));
    }
}

/// Who writes the state file; each has its own temporary file.
#[derive(Copy, Clone, Debug, PartialEq)]
enum Writer {
    Launcher,
    Checkpointer,
}

/// Writes the table to `writer`'s state file if it changed since that
/// file was last written (by this process: each file has one writer).
/// Raises no PostgreSQL error (the checkpointer calls it from a log hook).
/// The snapshot is written and flushed to a temporary file, renamed into
/// place and the directory flushed, so a crash leaves the old or the new
/// file, never a partial one.
fn write_if_changed(writer: Writer) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let (changes, text) = {
        let d = DECISIONS.share();
        let changes = d.log.changes();
        (changes, (changes != WRITTEN.load(Relaxed)).then(|| d.log.snapshot()))
    };
    let Some(text) = text else { return Ok(()) };
    let tmp = temporary_file(writer);
    write_flushed(&tmp, &text)?;
    std::fs::rename(&tmp, state_file(writer))?;
    sync_dir()?;
    WRITTEN.store(changes, Relaxed);
    Ok(())
}

/// Where `writer` keeps its snapshot, relative to the data directory.
/// Each writer (one launcher, one checkpointer) has a file of its own, so
/// they share no lock: a launcher frozen in the middle of its write
/// (kill -STOP) can hold up no checkpoint, whose writer must put every
/// record before its redo point on disk before the checkpoint goes on.
/// Both are read at start, and a gid's newest record wins
/// ([`Log::load`](mtm_state::decisions::Log::load)).
fn state_file(writer: Writer) -> &'static str {
    match writer {
        Writer::Launcher => "pg_mtm/decisions",
        Writer::Checkpointer => "pg_mtm/decisions.checkpoint",
    }
}

/// PostgreSQL's (untranslated) message for the start of a checkpoint,
/// logged once its redo point is fixed (`LogCheckpointStart`).
const CHECKPOINT_STARTING: &[u8] = b"checkpoint starting:";

/// Every message any process logs passes here: the checkpointer's
/// "checkpoint starting" writes the state file before the checkpoint
/// writes anything out. This runs inside PostgreSQL's error reporting and,
/// in the checkpointer, in a critical section: it must neither raise nor
/// panic, so a failure goes to stderr (the server log) and the launcher
/// tries again within a second. (From `pg/elog.rs`'s `emit_log_hook`,
/// after the previous hook; the checkpointer test comes first, as every
/// other process's every message takes this path.)
pub(crate) fn log_emitted(message: &ReportedError<'_>) {
    if !crate::pg::proc::am_checkpointer() {
        return;
    }
    let Some(message_id) = message.message_id() else { return };
    if !message_id.to_bytes().starts_with(CHECKPOINT_STARTING) {
        return;
    }
    // Not loaded: nothing was logged or redone since the server started,
    // the file is as it was.
    if !DECISIONS.share().loaded {
        return;
    }
    if let Err(e) = write_if_changed(Writer::Checkpointer) {
        eprintln!("multimaster: WARNING: cannot write {} at a checkpoint's start: {e}; decisions logged just before it are lost if the server crashes before the launcher writes them", state_file(Writer::Checkpointer));
    }
}

/// Where `writer` puts its snapshot before renaming it into place.
fn temporary_file(writer: Writer) -> String {
    match writer {
        Writer::Launcher => format!("{STATE_DIR}/decisions.launcher.tmp"),
        Writer::Checkpointer => format!("{STATE_DIR}/decisions.checkpointer.tmp"),
    }
}

/// Writes `text` to `path` and flushes it, so that a rename of it leaves
/// the old or the new state file after a crash, never a partial one.
fn write_flushed(path: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(STATE_DIR)?;
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Flushes the state directory, which makes a rename in it durable. No
/// directory yet: nothing was ever renamed there.
fn sync_dir() -> std::io::Result<()> {
    match std::fs::File::open(STATE_DIR) {
        Ok(dir) => dir.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The gid and state of a record of this manager.
fn read(record: &Record<'_>) -> (Option<State>, String, u64) {
    (State::from_info(record.info()), String::from_utf8_lossy(record.data()).into_owned(), record.lsn())
}

/// Redoes a record: its gid's state goes into the table.
pub(crate) fn redo(record: &Record<'_>) {
    let (state, gid, lsn) = read(record);
    match state {
        Some(state) => {
            DECISIONS.exclusive().log.note(&gid, state, lsn);
        }
        None => warning!("multimaster: unknown decision record at {lsn:X} skipped"),
    }
}

/// The redo's start.
pub(crate) fn startup() {
    // Before any record is redone: the file holds what the redo may not.
    ensure_loaded();
}

/// A record's description (`rm_desc`, for pg_waldump and pg_walinspect).
pub(crate) fn desc(record: &Record<'_>) -> String {
    let (_, gid, _) = read(record);
    format!("gid {gid}")
}

/// A record type's name (`rm_identify`).
pub(crate) fn identify(info: u8) -> Option<&'static CStr> {
    match State::from_info(info) {
        Some(State::Precommitted) => Some(c"PRECOMMIT"),
        Some(State::Committed) => Some(c"COMMIT"),
        Some(State::Aborted) => Some(c"ABORT"),
        Some(State::Preaborted) => Some(c"PREABORT"),
        None => None,
    }
}

/// What this node's decision log says about `gid`: `committed`,
/// `aborted`, or `notfound` (as the reference defines it; a gid that is
/// only promised, precommitted or preaborted, is `notfound` until it is
/// finished).
#[pg_extern]
fn get_logged_prepared_xact_state(gid: &str) -> &'static str {
    match state(gid) {
        Some(State::Committed) => "committed",
        Some(State::Aborted) => "aborted",
        Some(State::Precommitted | State::Preaborted) | None => "notfound",
    }
}

/// The states a gid is in on this node, for operators and clients told
/// 40003:
/// `prepared` (and not yet promised), `precommitted`, `preaborted`,
/// `committed`, `aborted` or `notfound`.
#[pg_extern]
fn xact_state(gid: &str) -> &'static str {
    match state(gid) {
        Some(s) => s.as_str(),
        None if crate::prepared_here(gid) => "prepared",
        // Finished and trimmed from the log, its outcome still known.
        None => DECISIONS.share().log.archived(gid).map_or("notfound", State::as_str),
    }
}
