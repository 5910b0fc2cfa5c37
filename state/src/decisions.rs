//! The 2PC decision log: what this node logged about each `mtm-` gid.
//!
//! A gid is *precommitted* on its home node once every peer voted yes,
//! and on each peer that the home node (or a resolver) then tells so; it
//! commits only once a majority of the nodes is precommitted. A node that
//! a resolver asks to help roll back a gid whose home node is gone logs it
//! *preaborted*: a promise never to precommit it, so a majority of such
//! promises rules the commit out. Both promises are made by [`promise`],
//! which no node breaks. A gid is *committed* or *aborted* on every node
//! just before its COMMIT PREPARED / ROLLBACK PREPARED runs there (so the
//! state is flushed by that statement's own commit record: a finished gid
//! is never missing from the log).
//!
//! Each entry is first a record of the extension's WAL resource manager
//! ([`State::info`] says which, the record's data is the gid), redone into
//! this table after a crash; the table is also written to a state file
//! ([`Log::snapshot`] / [`Log::load`]) so what a checkpoint takes out of
//! the WAL's reach survives a restart. The table is fixed-size, to live in
//! shared memory: when it is full the oldest finished entry makes room
//! (old entries are trimmed), an undecided one (precommitted or
//! preaborted) is kept while any finished one can go.

/// Gids longer than this are refused by PostgreSQL too (GIDSIZE 200).
pub const GID_MAX: usize = 200;
/// Entries kept; the oldest finished ones are trimmed beyond this.
pub const CAPACITY: usize = 4096;
/// Trimmed finished gids whose outcome is still known ([`Log::archived`]).
pub const ARCHIVE: usize = 1 << 16;

/// What the log says about a gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Precommitted,
    Committed,
    Aborted,
    Preaborted,
}

const ALL: [State; 4] = [State::Precommitted, State::Committed, State::Aborted, State::Preaborted];

impl State {
    /// The record type, in the rmgr's bits of a WAL record's `xl_info`.
    pub fn info(self) -> u8 {
        match self {
            State::Precommitted => 0x10,
            State::Committed => 0x20,
            State::Aborted => 0x30,
            State::Preaborted => 0x40,
        }
    }

    /// The state a record of type `info` logs (the low four bits, which
    /// belong to the WAL itself, are ignored).
    pub fn from_info(info: u8) -> Option<State> {
        match info & 0xF0 {
            0x10 => Some(State::Precommitted),
            0x20 => Some(State::Committed),
            0x30 => Some(State::Aborted),
            0x40 => Some(State::Preaborted),
            _ => None,
        }
    }

    /// The record type's name, as `pg_walinspect` shows it.
    pub fn record_name(self) -> &'static str {
        match self {
            State::Precommitted => "PRECOMMIT",
            State::Committed => "COMMIT",
            State::Aborted => "ABORT",
            State::Preaborted => "PREABORT",
        }
    }

    /// The state's name, as `mtm.get_logged_prepared_xact_state` and the
    /// state file spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Precommitted => "precommitted",
            State::Committed => "committed",
            State::Aborted => "aborted",
            State::Preaborted => "preaborted",
        }
    }

    fn parse(s: &str) -> Option<State> {
        ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The gid was committed or rolled back here.
    pub fn finished(self) -> bool {
        matches!(self, State::Committed | State::Aborted)
    }

    fn code(self) -> u8 {
        self.info() >> 4
    }

    fn from_code(code: u8) -> Option<State> {
        State::from_info(code << 4)
    }
}

/// A node asked to promise `want` (precommitted or preaborted) for a gid
/// it logged `current` for: `Ok(Some(state))` to log, `Ok(None)` when the
/// log already says so (or more: committed for a precommit, aborted for a
/// preabort), `Err(current)` when it promised or did the opposite, which
/// it never takes back.
pub fn promise(current: Option<State>, want: State) -> Result<Option<State>, State> {
    use State::*;
    match (current, want) {
        (None, Precommitted | Preaborted) => Ok(Some(want)),
        (Some(Precommitted | Committed), Precommitted) | (Some(Preaborted | Aborted), Preaborted) => Ok(None),
        (Some(c), Precommitted | Preaborted) => Err(c),
        (_, Committed | Aborted) => Ok(Some(want)),
    }
}

/// How many of `nodes` nodes are a majority.
pub fn majority(nodes: usize) -> usize {
    nodes / 2 + 1
}

/// What a resolver's round does next, after asking every node it can
/// reach about a gid (`answers`: each node's state, `busy` for a home
/// node whose coordinator is at work, `prepared`, `notfound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Not for the resolver to decide now.
    Wait,
    /// A node finished it: commit (true) or roll back (false) likewise.
    Finish(bool),
    /// Ask every node to promise this (precommitted or preaborted).
    Promise(State),
}

/// The resolver's step after asking ([`Next`]), `majority` nodes being
/// a majority of the cluster. A node that finished the gid decides, and
/// so does a majority of one promise (the round that gathered it may have
/// died before it finished anything); if any node precommitted it, every
/// node voted yes, so the others may be asked to promise to commit it
/// too; otherwise nobody can have committed it, and they are asked to
/// promise to roll it back.
pub fn after_asking(answers: &[impl AsRef<str>], majority: usize) -> Next {
    let any = |state: &str| answers.iter().any(|a| a.as_ref() == state);
    if any("busy") {
        Next::Wait
    } else if any(State::Committed.as_str()) {
        Next::Finish(true)
    } else if any(State::Aborted.as_str()) {
        Next::Finish(false)
    } else if let Some(commit) = after_promising(answers, State::Precommitted, majority).or(after_promising(answers, State::Preaborted, majority)) {
        Next::Finish(commit)
    } else if any(State::Precommitted.as_str()) {
        Next::Promise(State::Precommitted)
    } else {
        Next::Promise(State::Preaborted)
    }
}

/// Whether the answers to a request to promise `want` decide the gid:
/// Some(commit) once `majority` nodes made that promise (or finished it
/// that way).
pub fn after_promising(answers: &[impl AsRef<str>], want: State, majority: usize) -> Option<bool> {
    let done = if want == State::Precommitted { State::Committed } else { State::Aborted };
    let kept = answers.iter().filter(|a| [want.as_str(), done.as_str()].contains(&a.as_ref())).count();
    (kept >= majority).then_some(want == State::Precommitted)
}

/// Whether `gid` can be logged: an `mtm-` gid PostgreSQL accepts, with no
/// whitespace or control characters (so the state file stays one line per
/// entry).
pub fn loggable(gid: &str) -> bool {
    gid.starts_with("mtm-") && gid.len() <= GID_MAX && !gid.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[derive(Clone, Copy)]
struct Entry {
    /// [`State::code`], 0 for an empty entry.
    state: u8,
    gid_len: u8,
    gid: [u8; GID_MAX],
    /// Where the entry's record is in the WAL: a record older than the
    /// entry (redone after the state file was loaded) changes nothing.
    lsn: u64,
}

/// FNV-1a of a gid (the same in every process, unlike std's hasher), with
/// the low bit set so that 0 can mark an empty entry in [`Log::hashes`].
pub fn gid_hash(gid: &[u8]) -> u64 {
    gid.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)) | 1
}

impl Entry {
    const EMPTY: Entry = Entry { state: 0, gid_len: 0, gid: [0; GID_MAX], lsn: 0 };

    fn gid(&self) -> &[u8] {
        &self.gid[..self.gid_len as usize]
    }

    fn state(&self) -> Option<State> {
        State::from_code(self.state)
    }
}

/// The log's table (fixed-size, `Copy`: it lives in shared memory).
#[derive(Clone, Copy)]
pub struct Log {
    entries: [Entry; CAPACITY],
    /// [`gid_hash`] of each entry's gid, 0 for an empty entry. Kept apart
    /// from the entries because every commit looks up its gid on every
    /// node under the table's lock: scanning 32 KB of hashes instead of
    /// striding through ~1 MB of entries was 4 % of an apply worker's CPU.
    hashes: [u64; CAPACITY],
    /// The next entry to reuse (entries are taken in a ring, so this is
    /// also the oldest).
    next: usize,
    /// Bumped by every change: the state file is rewritten when it moved.
    changes: u64,
    /// Per home node id (index 0: gids of no known form), the newest gid
    /// time among the entries trimmed so far (see [`gid_time`]): a gid
    /// no older than that may have been finished here and forgotten, so
    /// this node cannot tell a resolver it never saw it.
    trimmed_upto: [u64; MAX_HOME + 1],
    /// The outcome of trimmed finished entries, newest at `archive_next -
    /// 1` ([`archive_key`]): a client told that its commit's outcome is
    /// unknown (40003) asks `mtm.xact_state` later, often after the entry
    /// made room for 4096 others (seconds under load). Only a hash per gid
    /// (512 KB for 65 536 gids, minutes of a busy node); not in the state
    /// file, so empty after a restart, and never used to decide anything.
    archive: [u64; ARCHIVE],
    archive_next: usize,
}

/// A trimmed entry in [`Log::archive`]: its gid's hash with the low bit
/// saying committed (the hash's own low bit is always 1, [`gid_hash`]).
fn archive_key(hash: u64, committed: bool) -> u64 {
    (hash & !1) | u64::from(committed)
}

/// Home node ids tracked by [`Log::may_have_forgotten`] (larger ones count
/// as gids of no known form).
pub const MAX_HOME: usize = 64;

/// The home node and the time in a proxy's gid,
/// `mtm-<home>-<hex µs since 1970>-…`; None for any other form.
fn gid_time(gid: &[u8]) -> Option<(usize, u64)> {
    let mut parts = std::str::from_utf8(gid).ok()?.split('-');
    (parts.next()? == "mtm").then_some(())?;
    let home: usize = parts.next()?.parse().ok().filter(|h| (1..=MAX_HOME).contains(h))?;
    let time = u64::from_str_radix(parts.next()?, 16).ok()?;
    Some((home, time))
}

impl Default for Log {
    fn default() -> Self {
        Log {
            entries: [Entry::EMPTY; CAPACITY],
            hashes: [0; CAPACITY],
            next: 0,
            changes: 0,
            trimmed_upto: [0; MAX_HOME + 1],
            archive: [0; ARCHIVE],
            archive_next: 0,
        }
    }
}

/// Why a state file could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct BadSnapshot {
    pub line: usize,
    pub reason: &'static str,
}

impl std::fmt::Display for BadSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

const SNAPSHOT_HEADER: &str = "multimaster decision log 1";

impl Log {
    fn find(&self, gid: &[u8]) -> Option<usize> {
        let hash = gid_hash(gid);
        (0..CAPACITY).find(|&i| self.hashes[i] == hash && self.entries[i].state != 0 && self.entries[i].gid() == gid)
    }

    /// What the log says about `gid`.
    pub fn get(&self, gid: &str) -> Option<State> {
        self.find(gid.as_bytes()).and_then(|i| self.entries[i].state())
    }

    /// Notes that `state` was logged for `gid` at `lsn`. A record older
    /// than what the table holds for the gid is ignored (the state file
    /// may be newer than the WAL being redone). Returns false when the gid
    /// cannot be logged ([`loggable`]).
    pub fn note(&mut self, gid: &str, state: State, lsn: u64) -> bool {
        if !loggable(gid) {
            return false;
        }
        let i = match self.find(gid.as_bytes()) {
            Some(i) if self.entries[i].lsn > lsn => return true,
            Some(i) => i,
            None => self.make_room(),
        };
        let e = &mut self.entries[i];
        e.state = state.code();
        e.gid_len = gid.len() as u8;
        e.gid[..gid.len()].copy_from_slice(gid.as_bytes());
        e.lsn = lsn;
        self.hashes[i] = gid_hash(gid.as_bytes());
        self.changes += 1;
        true
    }

    /// The entry a new gid takes: the oldest that is empty or finished,
    /// or, when every entry is undecided, the oldest.
    fn make_room(&mut self) -> usize {
        let start = self.next;
        let taken = (0..CAPACITY)
            .map(|k| (start + k) % CAPACITY)
            .find(|&i| self.entries[i].state().is_none_or(State::finished))
            .unwrap_or(start);
        self.next = (taken + 1) % CAPACITY;
        if self.entries[taken].state != 0 {
            self.forget(taken);
        }
        taken
    }

    /// How a finished gid that the table no longer holds ended, while the
    /// archive remembers it (None: never finished here, or too long ago).
    pub fn archived(&self, gid: &str) -> Option<State> {
        let hash = gid_hash(gid.as_bytes());
        // Newest first: a gid is archived once, but its hash may also be
        // an older gid's.
        (1..=ARCHIVE).map(|k| self.archive[(self.archive_next + ARCHIVE - k) % ARCHIVE]).find_map(|key| {
            if key == archive_key(hash, true) {
                Some(State::Committed)
            } else if key == archive_key(hash, false) {
                Some(State::Aborted)
            } else {
                None
            }
        })
    }

    /// Entry `i` is about to be reused: remember that its gid's time is
    /// forgotten, and how it ended if it did.
    fn forget(&mut self, i: usize) {
        if let Some(s @ (State::Committed | State::Aborted)) = self.entries[i].state() {
            self.archive[self.archive_next] = archive_key(self.hashes[i], s == State::Committed);
            self.archive_next = (self.archive_next + 1) % ARCHIVE;
        }
        match gid_time(self.entries[i].gid()) {
            Some((home, time)) => self.trimmed_upto[home] = self.trimmed_upto[home].max(time),
            None => self.trimmed_upto[0] = u64::MAX,
        }
    }

    /// Whether `gid`, which the log does not hold, may have been in it and
    /// been trimmed (so finished here), as far as this node can tell.
    pub fn may_have_forgotten(&self, gid: &str) -> bool {
        match gid_time(gid.as_bytes()) {
            Some((home, time)) => time <= self.trimmed_upto[home],
            None => self.trimmed_upto[0] != 0,
        }
    }

    /// Counts changes, so a writer can tell whether the file is stale.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The state file's text: a header line, a `trimmed <home> <time>`
    /// line per home node whose gids were trimmed, then one `lsn state
    /// gid` line per entry, oldest first.
    pub fn snapshot(&self) -> String {
        let mut out = String::with_capacity(64 + CAPACITY * 32);
        out.push_str(SNAPSHOT_HEADER);
        out.push('\n');
        for (home, &time) in self.trimmed_upto.iter().enumerate().filter(|(_, &t)| t != 0) {
            out.push_str(&format!("trimmed {home} {time:X}\n"));
        }
        for k in 0..CAPACITY {
            let e = &self.entries[(self.next + k) % CAPACITY];
            if let (Some(state), Ok(gid)) = (e.state(), std::str::from_utf8(e.gid())) {
                out.push_str(&format!("{:X} {} {gid}\n", e.lsn, state.as_str()));
            }
        }
        out
    }

    /// Adds a state file's entries (oldest first, as written) to the
    /// table. Returns how many were read.
    pub fn load(&mut self, text: &str) -> Result<usize, BadSnapshot> {
        let mut lines = text.lines();
        if lines.next() != Some(SNAPSHOT_HEADER) {
            return Err(BadSnapshot { line: 1, reason: "not a multimaster decision log" });
        }
        let mut read = 0;
        for (n, line) in lines.enumerate() {
            let bad = |reason| BadSnapshot { line: n + 2, reason };
            if let Some(rest) = line.strip_prefix("trimmed ") {
                let (home, time) = rest.split_once(' ').ok_or(bad("bad trimmed line"))?;
                let home: usize = home.parse().ok().filter(|&h| h <= MAX_HOME).ok_or(bad("bad home node"))?;
                let time = u64::from_str_radix(time, 16).map_err(|_| bad("bad time"))?;
                self.trimmed_upto[home] = self.trimmed_upto[home].max(time);
                continue;
            }
            let mut parts = line.splitn(3, ' ');
            let lsn = parts.next().and_then(|s| u64::from_str_radix(s, 16).ok()).ok_or(bad("bad position"))?;
            let state = parts.next().and_then(State::parse).ok_or(bad("bad state"))?;
            let gid = parts.next().ok_or(bad("no gid"))?;
            if !self.note(gid, state, lsn) {
                return Err(bad("bad gid"));
            }
            read += 1;
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed() -> Box<Log> {
        Box::default()
    }

    #[test]
    fn record_types_round_trip() {
        for s in ALL {
            assert_eq!(State::from_info(s.info()), Some(s));
            assert_eq!(State::from_info(s.info() | 0x0B), Some(s), "low bits belong to the WAL");
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::from_info(0x50), None);
        assert_eq!(State::from_info(0x00), None);
    }

    #[test]
    fn a_gid_goes_from_precommitted_to_committed() {
        let mut log = boxed();
        assert_eq!(log.get("mtm-1-7"), None);
        assert!(log.note("mtm-1-7", State::Precommitted, 100));
        assert_eq!(log.get("mtm-1-7"), Some(State::Precommitted));
        assert!(log.note("mtm-1-7", State::Committed, 200));
        assert_eq!(log.get("mtm-1-7"), Some(State::Committed));
        assert_eq!(log.get("mtm-1-8"), None);
    }

    #[test]
    fn an_older_record_does_not_undo_a_newer_entry() {
        let mut log = boxed();
        log.note("mtm-1-7", State::Committed, 200);
        // Redo after the state file was loaded replays the precommit.
        log.note("mtm-1-7", State::Precommitted, 100);
        assert_eq!(log.get("mtm-1-7"), Some(State::Committed));
    }

    #[test]
    fn a_promise_is_never_broken() {
        use State::*;
        assert_eq!(promise(None, Precommitted), Ok(Some(Precommitted)));
        assert_eq!(promise(None, Preaborted), Ok(Some(Preaborted)));
        assert_eq!(promise(Some(Precommitted), Precommitted), Ok(None));
        assert_eq!(promise(Some(Committed), Precommitted), Ok(None));
        assert_eq!(promise(Some(Preaborted), Preaborted), Ok(None));
        assert_eq!(promise(Some(Aborted), Preaborted), Ok(None));
        assert_eq!(promise(Some(Preaborted), Precommitted), Err(Preaborted));
        assert_eq!(promise(Some(Aborted), Precommitted), Err(Aborted));
        assert_eq!(promise(Some(Precommitted), Preaborted), Err(Precommitted));
        assert_eq!(promise(Some(Committed), Preaborted), Err(Committed));
        // Finishing follows the decision, whatever was promised before.
        assert_eq!(promise(Some(Preaborted), Committed), Ok(Some(Committed)));
    }

    #[test]
    fn a_resolver_decides_only_on_a_majority_of_one_promise() {
        use State::*;
        assert_eq!(after_asking(&["prepared", "busy", "precommitted"], 2), Next::Wait, "the coordinator is at work");
        assert_eq!(after_asking(&["prepared", "committed"], 2), Next::Finish(true));
        assert_eq!(after_asking(&["aborted", "preaborted"], 2), Next::Finish(false));
        assert_eq!(after_asking(&["prepared", "precommitted"], 2), Next::Promise(Precommitted));
        assert_eq!(after_asking(&["prepared", "notfound"], 2), Next::Promise(Preaborted));
        assert_eq!(after_asking(&["prepared"], 2), Next::Promise(Preaborted));
        // A round that gathered a majority died before it finished: the
        // promises alone decide, though another node precommitted.
        assert_eq!(after_asking(&["precommitted", "preaborted", "preaborted"], 2), Next::Finish(false));
        assert_eq!(after_asking(&["precommitted", "precommitted", "preaborted"], 2), Next::Finish(true));
        // Three nodes, the home node gone: both others must promise.
        assert_eq!(after_promising(&["precommitted", "precommitted"], Precommitted, 2), Some(true));
        assert_eq!(after_promising(&["precommitted", "preaborted"], Precommitted, 2), None);
        assert_eq!(after_promising(&["preaborted", "aborted"], Preaborted, 2), Some(false));
        assert_eq!(after_promising(&["preaborted"], Preaborted, 2), None, "a minority decides nothing");
        assert_eq!(after_promising(&["committed", "precommitted", "prepared"], Precommitted, 2), Some(true));
    }

    #[test]
    fn refuses_what_is_not_an_mtm_gid() {
        let mut log = boxed();
        assert!(!log.note("client-xa-1", State::Committed, 1));
        assert!(!log.note("mtm-1 2", State::Committed, 1));
        assert!(!log.note("mtm-1\n2", State::Committed, 1));
        assert!(!log.note(&format!("mtm-{}", "x".repeat(GID_MAX)), State::Committed, 1));
        assert_eq!(log.changes(), 0);
    }

    #[test]
    fn trims_the_oldest_finished_entries_and_keeps_precommitted_ones() {
        let mut log = boxed();
        log.note("mtm-1-pending", State::Precommitted, 1);
        log.note("mtm-1-promised", State::Preaborted, 2);
        for i in 0..(CAPACITY as u64 * 2) {
            log.note(&format!("mtm-2-{i}"), State::Committed, 10 + i);
        }
        assert_eq!(log.get("mtm-1-pending"), Some(State::Precommitted));
        assert_eq!(log.get("mtm-1-promised"), Some(State::Preaborted));
        assert_eq!(log.get("mtm-2-0"), None, "trimmed");
        assert_eq!(log.get(&format!("mtm-2-{}", CAPACITY * 2 - 1)), Some(State::Committed));
        assert_eq!(log.get(&format!("mtm-2-{}", CAPACITY * 2 - (CAPACITY - 2))), Some(State::Committed));
    }

    #[test]
    fn trimmed_finished_gids_keep_their_outcome_in_the_archive() {
        let mut log = boxed();
        log.note("mtm-1-yes", State::Committed, 1);
        log.note("mtm-1-no", State::Aborted, 2);
        log.note("mtm-1-open", State::Precommitted, 3);
        for i in 0..(CAPACITY as u64 * 2) {
            log.note(&format!("mtm-2-{i}"), State::Committed, 10 + i);
        }
        assert_eq!(log.get("mtm-1-yes"), None, "trimmed");
        assert_eq!(log.archived("mtm-1-yes"), Some(State::Committed));
        assert_eq!(log.archived("mtm-1-no"), Some(State::Aborted));
        assert_eq!(log.archived("mtm-1-open"), None, "an undecided entry is kept, not archived");
        assert_eq!(log.get("mtm-1-open"), Some(State::Precommitted));
        assert_eq!(log.archived("mtm-9-never"), None);
        // A gid still in the table is not in the archive.
        assert_eq!(log.archived(&format!("mtm-2-{}", CAPACITY * 2 - 1)), None);
    }

    #[test]
    fn a_trimmed_gid_is_known_to_be_forgotten_and_the_file_keeps_it() {
        let mut log = boxed();
        let gid = |home: u32, time: u64| format!("mtm-{home}-{time:x}-a1-7-1");
        assert!(!log.may_have_forgotten(&gid(2, 5)));
        for t in 0..(CAPACITY as u64 + 10) {
            log.note(&gid(2, 100 + t), State::Committed, 1 + t);
        }
        assert_eq!(log.get(&gid(2, 100)), None, "trimmed");
        assert!(log.may_have_forgotten(&gid(2, 100)), "it was finished here");
        assert!(log.may_have_forgotten(&gid(2, 50)), "older than a trimmed one");
        assert!(!log.may_have_forgotten(&gid(2, 100 + CAPACITY as u64 + 10)), "newer than anything trimmed");
        assert!(!log.may_have_forgotten(&gid(3, 100)), "another home node's gids were not trimmed");
        assert!(!log.may_have_forgotten("mtm-client-own"), "no gid of an unknown form was trimmed");
        let mut back = boxed();
        back.load(&log.snapshot()).unwrap();
        assert!(back.may_have_forgotten(&gid(2, 100)), "the state file keeps what was trimmed");
        assert!(!back.may_have_forgotten(&gid(2, 100 + CAPACITY as u64 + 10)));
    }

    #[test]
    fn a_full_table_of_precommitted_entries_still_takes_a_new_one() {
        let mut log = boxed();
        for i in 0..CAPACITY as u64 {
            log.note(&format!("mtm-1-{i}"), State::Precommitted, i + 1);
        }
        assert!(log.note("mtm-1-new", State::Precommitted, 1_000_000));
        assert_eq!(log.get("mtm-1-new"), Some(State::Precommitted));
        assert_eq!(log.get("mtm-1-0"), None, "the oldest made room");
    }

    #[test]
    fn snapshot_round_trips_in_age_order() {
        let mut log = boxed();
        log.note("mtm-1-a", State::Committed, 0x10);
        log.note("mtm-1-b", State::Aborted, 0x20);
        log.note("mtm-1-c", State::Precommitted, 0x30);
        let text = log.snapshot();
        assert_eq!(text, "multimaster decision log 1\n10 committed mtm-1-a\n20 aborted mtm-1-b\n30 precommitted mtm-1-c\n");
        let mut back = boxed();
        assert_eq!(back.load(&text), Ok(3));
        assert_eq!(back.snapshot(), text);
        // Redo then moves it on.
        back.note("mtm-1-c", State::Committed, 0x40);
        assert_eq!(back.get("mtm-1-c"), Some(State::Committed));
    }

    #[test]
    fn two_writers_snapshots_merge_whatever_the_order_they_are_read_in() {
        // The checkpointer's file, older, and the launcher's, newer (or
        // the other way round): each gid ends in its newest state, and
        // what either trimmed counts as trimmed.
        let old = "multimaster decision log 1\ntrimmed 2 5\n10 precommitted mtm-1-a\n20 precommitted mtm-1-b\n";
        let new = "multimaster decision log 1\n30 committed mtm-1-a\n40 precommitted mtm-1-c\n";
        for files in [[old, new], [new, old]] {
            let mut log = boxed();
            for f in files {
                log.load(f).unwrap();
            }
            assert_eq!(log.get("mtm-1-a"), Some(State::Committed));
            assert_eq!(log.get("mtm-1-b"), Some(State::Precommitted));
            assert_eq!(log.get("mtm-1-c"), Some(State::Precommitted));
            assert!(log.may_have_forgotten("mtm-2-5-a1-7-1"));
        }
    }

    #[test]
    fn a_damaged_snapshot_is_refused_with_its_line() {
        let mut log = boxed();
        assert_eq!(log.load("hello\n").unwrap_err().line, 1);
        let e = log.load("multimaster decision log 1\n10 committed mtm-1-a\n20 maybe mtm-1-b\n").unwrap_err();
        assert_eq!(e, BadSnapshot { line: 3, reason: "bad state" });
        assert_eq!(log.load("multimaster decision log 1\nzz committed mtm-1-a\n").unwrap_err().reason, "bad position");
    }
}
