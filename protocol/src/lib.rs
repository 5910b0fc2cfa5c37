//! The wire format of the `multimaster` output plugin, documented in
//! `extension/PROTOCOL.md`. Safe Rust with no PostgreSQL dependency: the
//! extension's decoder encodes with it, receivers and tests decode with it.
//!
//! Every message starts with a one-byte type and is written by the plugin
//! as one chunk (one row of `pg_logical_slot_get_binary_changes`, one
//! CopyData of a walsender stream) or, to a walsender, within a [`Batch`]
//! of one transaction's messages. Integers are big-endian; strings are a
//! u32 byte length then UTF-8 bytes.

#![forbid(unsafe_code)]

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `prepared`: the transaction ends in Prepare (not Commit).
    Begin { xid: u32, final_lsn: u64, commit_time: i64, prepared: bool },
    /// Follows Begin when the transaction came from another node.
    Origin { origin_lsn: u64, name: String },
    Relation { relid: u32, namespace: String, name: String, replica_identity: u8, columns: Vec<Column> },
    Insert { relid: u32, new: Tuple },
    Update { relid: u32, old: Option<OldTuple>, new: Tuple },
    Delete { relid: u32, old: Option<OldTuple> },
    Truncate { cascade: bool, restart_identity: bool, relids: Vec<u32> },
    Prepare { prepare_lsn: u64, end_lsn: u64, prepare_time: i64, xid: u32, gid: String },
    CommitPrepared { commit_lsn: u64, end_lsn: u64, commit_time: i64, xid: u32, gid: String },
    RollbackPrepared { prepare_end_lsn: u64, rollback_end_lsn: u64, prepare_time: i64, rollback_time: i64, xid: u32, gid: String },
    Commit { commit_lsn: u64, end_lsn: u64, commit_time: i64 },
    Message { transactional: bool, lsn: u64, prefix: String, content: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch; the receiver keeps its own.
    UnchangedToast,
    /// The type's binary send format (built-in types).
    Binary(Vec<u8>),
    /// The type's text output (other types).
    Text(Vec<u8>),
}

pub type Tuple = Vec<Value>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity columns are meaningful (others Null).
    Key(Tuple),
    /// REPLICA IDENTITY FULL: the whole old row.
    Full(Tuple),
}

pub mod tag {
    pub const BEGIN: u8 = b'B';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const PREPARE: u8 = b'P';
    pub const COMMIT_PREPARED: u8 = b'K';
    pub const ROLLBACK_PREPARED: u8 = b'r';
    pub const COMMIT: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
    /// Not a message of its own: several messages of one transaction in
    /// one chunk ([`Batch`]).
    pub const BATCH: u8 = b'X';
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message ends early")]
    Short,
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("unknown {what} marker {marker:#04x}")]
    BadMarker { what: &'static str, marker: u8 },
    #[error("invalid UTF-8 in a string")]
    Utf8,
    #[error("{0} bytes left after the message")]
    Trailing(usize),
}

// ---- encoding ----

pub fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}
pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

pub fn put_tuple(out: &mut Vec<u8>, t: &[Value]) {
    put_u16(out, t.len() as u16);
    for v in t {
        match v {
            Value::Null => put_u8(out, b'n'),
            Value::UnchangedToast => put_u8(out, b'u'),
            Value::Binary(b) => {
                put_u8(out, b'b');
                put_bytes(out, b);
            }
            Value::Text(b) => {
                put_u8(out, b't');
                put_bytes(out, b);
            }
        }
    }
}

fn put_old(out: &mut Vec<u8>, old: &Option<OldTuple>) {
    match old {
        None => put_u8(out, b'-'),
        Some(OldTuple::Key(t)) => {
            put_u8(out, b'K');
            put_tuple(out, t);
        }
        Some(OldTuple::Full(t)) => {
            put_u8(out, b'O');
            put_tuple(out, t);
        }
    }
}

impl Message {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Begin { xid, final_lsn, commit_time, prepared } => {
                put_u8(out, tag::BEGIN);
                put_u32(out, *xid);
                put_u64(out, *final_lsn);
                put_i64(out, *commit_time);
                put_u8(out, u8::from(*prepared));
            }
            Message::Origin { origin_lsn, name } => {
                put_u8(out, tag::ORIGIN);
                put_u64(out, *origin_lsn);
                put_str(out, name);
            }
            Message::Relation { relid, namespace, name, replica_identity, columns } => {
                put_u8(out, tag::RELATION);
                put_u32(out, *relid);
                put_str(out, namespace);
                put_str(out, name);
                put_u8(out, *replica_identity);
                put_u16(out, columns.len() as u16);
                for c in columns {
                    put_u8(out, c.key as u8);
                    put_str(out, &c.name);
                    put_u32(out, c.type_oid);
                    put_i32(out, c.typmod);
                }
            }
            Message::Insert { relid, new } => {
                put_u8(out, tag::INSERT);
                put_u32(out, *relid);
                put_tuple(out, new);
            }
            Message::Update { relid, old, new } => {
                put_u8(out, tag::UPDATE);
                put_u32(out, *relid);
                put_old(out, old);
                put_tuple(out, new);
            }
            Message::Delete { relid, old } => {
                put_u8(out, tag::DELETE);
                put_u32(out, *relid);
                put_old(out, old);
            }
            Message::Truncate { cascade, restart_identity, relids } => {
                put_u8(out, tag::TRUNCATE);
                put_u8(out, (*cascade as u8) | ((*restart_identity as u8) << 1));
                put_u32(out, relids.len() as u32);
                for r in relids {
                    put_u32(out, *r);
                }
            }
            Message::Prepare { prepare_lsn, end_lsn, prepare_time, xid, gid } => {
                put_u8(out, tag::PREPARE);
                put_u64(out, *prepare_lsn);
                put_u64(out, *end_lsn);
                put_i64(out, *prepare_time);
                put_u32(out, *xid);
                put_str(out, gid);
            }
            Message::CommitPrepared { commit_lsn, end_lsn, commit_time, xid, gid } => {
                put_u8(out, tag::COMMIT_PREPARED);
                put_u64(out, *commit_lsn);
                put_u64(out, *end_lsn);
                put_i64(out, *commit_time);
                put_u32(out, *xid);
                put_str(out, gid);
            }
            Message::RollbackPrepared { prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid, gid } => {
                put_u8(out, tag::ROLLBACK_PREPARED);
                put_u64(out, *prepare_end_lsn);
                put_u64(out, *rollback_end_lsn);
                put_i64(out, *prepare_time);
                put_i64(out, *rollback_time);
                put_u32(out, *xid);
                put_str(out, gid);
            }
            Message::Commit { commit_lsn, end_lsn, commit_time } => {
                put_u8(out, tag::COMMIT);
                put_u64(out, *commit_lsn);
                put_u64(out, *end_lsn);
                put_i64(out, *commit_time);
            }
            Message::Message { transactional, lsn, prefix, content } => {
                put_u8(out, tag::MESSAGE);
                put_u8(out, *transactional as u8);
                put_u64(out, *lsn);
                put_str(out, prefix);
                put_bytes(out, content);
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// The relation a Relation message describes, read without decoding
    /// the rest; None for any other message.
    pub fn relation_id(buf: &[u8]) -> Option<u32> {
        match buf {
            [tag::RELATION, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    /// Decodes exactly one message occupying all of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        let (m, rest) = Message::decode_prefix(buf)?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len()));
        }
        Ok(m)
    }

    /// Decodes the message at the start of `buf`; also returns what
    /// follows it.
    pub fn decode_prefix(buf: &[u8]) -> Result<(Message, &[u8]), DecodeError> {
        let mut r = Reader(buf);
        let m = match r.u8()? {
            tag::BEGIN => Message::Begin { xid: r.u32()?, final_lsn: r.u64()?, commit_time: r.i64()?, prepared: r.u8()? != 0 },
            tag::ORIGIN => Message::Origin { origin_lsn: r.u64()?, name: r.string()? },
            tag::RELATION => {
                let relid = r.u32()?;
                let namespace = r.string()?;
                let name = r.string()?;
                let replica_identity = r.u8()?;
                let n = r.u16()?;
                let mut columns = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    columns.push(Column { key: r.u8()? != 0, name: r.string()?, type_oid: r.u32()?, typmod: r.i32()? });
                }
                Message::Relation { relid, namespace, name, replica_identity, columns }
            }
            tag::INSERT => Message::Insert { relid: r.u32()?, new: r.tuple()? },
            tag::UPDATE => Message::Update { relid: r.u32()?, old: r.old()?, new: r.tuple()? },
            tag::DELETE => Message::Delete { relid: r.u32()?, old: r.old()? },
            tag::TRUNCATE => {
                let flags = r.u8()?;
                let n = r.u32()?;
                let mut relids = Vec::new();
                for _ in 0..n {
                    relids.push(r.u32()?);
                }
                Message::Truncate { cascade: flags & 1 != 0, restart_identity: flags & 2 != 0, relids }
            }
            tag::PREPARE => Message::Prepare {
                prepare_lsn: r.u64()?,
                end_lsn: r.u64()?,
                prepare_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            },
            tag::COMMIT_PREPARED => Message::CommitPrepared {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            },
            tag::ROLLBACK_PREPARED => Message::RollbackPrepared {
                prepare_end_lsn: r.u64()?,
                rollback_end_lsn: r.u64()?,
                prepare_time: r.i64()?,
                rollback_time: r.i64()?,
                xid: r.u32()?,
                gid: r.string()?,
            },
            tag::COMMIT => Message::Commit { commit_lsn: r.u64()?, end_lsn: r.u64()?, commit_time: r.i64()? },
            tag::MESSAGE => Message::Message {
                transactional: r.u8()? != 0,
                lsn: r.u64()?,
                prefix: r.string()?,
                content: r.bytes()?.to_vec(),
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        Ok((m, r.0))
    }
}

/// Messages of one transaction gathered into one chunk, so that a walsender
/// sends a small transaction with one write instead of one per message,
/// and its receiver wakes once. Layout: tag `X`, then per message a u32
/// byte length and the message. A batch of one is sent as the message
/// itself, so a reader that never sees more than one message per
/// transaction part sees no `X` at all.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// Messages gathered.
    count: usize,
}

impl Batch {
    /// Adds `msg` at the end.
    pub fn push(&mut self, msg: &Message) {
        if self.buf.is_empty() {
            self.buf.push(tag::BATCH);
        }
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        msg.encode(&mut self.buf);
        let len = (self.buf.len() - len_at - 4) as u32;
        self.buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        self.count += 1;
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The chunk to write (the message itself if there is only one) and
    /// an empty batch; None if nothing was gathered.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        let count = std::mem::take(&mut self.count);
        let mut buf = std::mem::take(&mut self.buf);
        match count {
            0 => None,
            1 => Some(buf.split_off(5)),
            _ => Some(buf),
        }
    }
}

/// The messages of one chunk: those of a [`Batch`], or the chunk itself.
pub fn unbatch(chunk: &[u8]) -> Unbatch<'_> {
    match chunk.first() {
        Some(&tag::BATCH) => Unbatch { rest: &chunk[1..], whole: None },
        _ => Unbatch { rest: &[], whole: Some(chunk) },
    }
}

/// Iterator of [`unbatch`]: each message's bytes, or where the framing is
/// broken.
pub struct Unbatch<'a> {
    rest: &'a [u8],
    whole: Option<&'a [u8]>,
}

impl<'a> Iterator for Unbatch<'a> {
    type Item = Result<&'a [u8], DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(whole) = self.whole.take() {
            return Some(Ok(whole));
        }
        if self.rest.is_empty() {
            return None;
        }
        let mut r = Reader(self.rest);
        let item = r.bytes();
        self.rest = if item.is_ok() { r.0 } else { &[] };
        Some(item)
    }
}

/// Prefix of the non-transactional logical message that carries a node's
/// 2PC vote on a gid back to the gid's coordinator (its home node), over
/// the ordinary replication stream.
pub const VOTE_PREFIX: &str = "mtm_vote";

/// A node's vote on a prepared transaction of another node (the content
/// of a [`VOTE_PREFIX`] message; layout in `extension/PROTOCOL.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteMessage {
    /// The node the gid was prepared on, which counts the votes.
    pub coordinator: i32,
    /// The node that voted.
    pub voter: i32,
    pub gid: String,
    /// None: yes (prepared and flushed on the voter). Some: no, with the
    /// SQLSTATE and message of the failed apply.
    pub refusal: Option<(String, String)>,
}

impl VoteMessage {
    /// The coordinator a vote's content is addressed to, read without
    /// decoding the rest (a walsender sends each vote only to it).
    pub fn coordinator_of(content: &[u8]) -> Option<i32> {
        Reader(content).i32().ok()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.gid.len());
        put_i32(&mut out, self.coordinator);
        put_i32(&mut out, self.voter);
        put_str(&mut out, &self.gid);
        match &self.refusal {
            None => put_u8(&mut out, b'Y'),
            Some((sqlstate, message)) => {
                put_u8(&mut out, b'N');
                put_str(&mut out, sqlstate);
                put_str(&mut out, message);
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<VoteMessage, DecodeError> {
        let mut r = Reader(buf);
        let coordinator = r.i32()?;
        let voter = r.i32()?;
        let gid = r.string()?;
        let refusal = match r.u8()? {
            b'Y' => None,
            b'N' => Some((r.string()?, r.string()?)),
            marker => return Err(DecodeError::BadMarker { what: "vote", marker }),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::Trailing(r.0.len()));
        }
        Ok(VoteMessage { coordinator, voter, gid, refusal })
    }
}

/// Prefix of the non-transactional logical message with which a gid's
/// home node tells its peers that every node voted yes: each peer then
/// promises to commit it (logs PRECOMMIT, unless it promised a resolver the
/// opposite) and answers with an `mtm_vote` on `<gid>#precommitted`.
pub const PRECOMMIT_PREFIX: &str = "mtm_precommit";

/// The content of a [`PRECOMMIT_PREFIX`] message: the gid (the sender is
/// the stream's node, the gid's home).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecommitMessage {
    pub gid: String,
    /// The home node's promise (logged before this message) and the
    /// receiving peer's make a majority of the cluster (3 nodes or
    /// fewer): the peer may commit the gid as soon as it has promised,
    /// without waiting for the home node's COMMIT PREPARED.
    pub commit_on_promise: bool,
}

impl PrecommitMessage {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.gid.len());
        put_str(&mut out, &self.gid);
        out.push(self.commit_on_promise as u8);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<PrecommitMessage, DecodeError> {
        let mut r = Reader(buf);
        let gid = r.string()?;
        let commit_on_promise = r.u8()? != 0;
        if !r.0.is_empty() {
            return Err(DecodeError::Trailing(r.0.len()));
        }
        Ok(PrecommitMessage { gid, commit_on_promise })
    }
}

/// Prefix of the transactional message that opens a captured DDL
/// statement. Empty: the changes decoded until its [`DDL_PREFIX`] message
/// are the statement's own (an extension script's inserts) and are not
/// sent: the peer's replay of the statement produces them. With a
/// [`DdlMessage`]: a CREATE TABLE AS (or SELECT INTO) whose rows are sent
/// like any others: the peer runs the statement at once without its
/// data, and the rows that follow fill the table.
pub const DDL_BEGIN_PREFIX: &str = "mtm_ddl_begin";

/// Prefix of the transactional message that closes a captured DDL
/// statement and carries it ([`DdlMessage`]); empty content: the
/// statement touched only this session's temporary objects and stays here.
pub const DDL_PREFIX: &str = "mtm_ddl";

/// A DDL statement as it ran on its origin node, to run on every peer at
/// the same point of the same transaction (layout in `extension/PROTOCOL.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlMessage {
    /// The role it ran as (`current_user`), which owns what it creates.
    pub role: String,
    /// The `search_path` it ran with, which resolves its unqualified names.
    pub search_path: String,
    /// The statement's text, exactly one statement.
    pub sql: String,
    /// Settings that change how the statement is parsed or what it
    /// computes (DateStyle, TimeZone, standard_conforming_strings...),
    /// (name, value) as they were: a default of '01/02/2020' is a date of
    /// the origin's DateStyle on every node.
    pub settings: Vec<(String, String)>,
}

impl DdlMessage {
    /// One statement of a query string, as PostgreSQL locates it
    /// (`stmt_location`, `stmt_len`: -1 / 0 mean the whole string / the
    /// rest of it), without surrounding blanks and its final semicolon.
    pub fn statement_text(query: &[u8], location: i32, len: i32) -> String {
        Self::trimmed(&query[statement_range(query.len(), location, len)])
    }

    /// A statement's text without surrounding blanks and final semicolon.
    fn trimmed(text: &[u8]) -> String {
        String::from_utf8_lossy(text).trim().trim_end_matches(';').trim_end().to_string()
    }

    /// [`statement_text`](Self::statement_text) with each parameter
    /// reference replaced by its value: `values` holds, per reference, its
    /// byte offset in `query` and the SQL literal to put there. A reference
    /// is what PostgreSQL's parser turned into a parameter: `$n`, or a
    /// function's variable by name (`v`, `"V"`, `rec.field`, `fn.v`) — a
    /// peer replaying the statement has none of them. References outside
    /// the statement are ignored, one offset is replaced once.
    pub fn statement_text_with_values(query: &[u8], location: i32, len: i32, values: &[(usize, String)]) -> String {
        let std::ops::Range { start, end } = statement_range(query.len(), location, len);
        let mut refs: Vec<&(usize, String)> = values.iter().filter(|(at, _)| (start..end).contains(at)).collect();
        refs.sort_by_key(|(at, _)| *at);
        let mut text = Vec::with_capacity(end - start);
        let mut at = start;
        for (offset, literal) in refs {
            if *offset < at {
                continue;
            }
            text.extend_from_slice(&query[at..*offset]);
            text.extend_from_slice(literal.as_bytes());
            at = offset + reference_len(&query[*offset..end]);
        }
        text.extend_from_slice(&query[at..end]);
        Self::trimmed(&text)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.role.len() + self.search_path.len() + self.sql.len());
        put_str(&mut out, &self.role);
        put_str(&mut out, &self.search_path);
        put_str(&mut out, &self.sql);
        put_u32(&mut out, self.settings.len() as u32);
        for (name, value) in &self.settings {
            put_str(&mut out, name);
            put_str(&mut out, value);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<DdlMessage, DecodeError> {
        let mut r = Reader(buf);
        let mut m = DdlMessage { role: r.string()?, search_path: r.string()?, sql: r.string()?, settings: Vec::new() };
        // A message of a build before the settings ends here.
        if !r.0.is_empty() {
            for _ in 0..r.u32()? {
                m.settings.push((r.string()?, r.string()?));
            }
        }
        if !r.0.is_empty() {
            return Err(DecodeError::Trailing(r.0.len()));
        }
        Ok(m)
    }
}

/// Where one statement lies in a query string of `total` bytes, as
/// PostgreSQL locates it (`location` -1: the whole string; `len` 0: the
/// rest of it), clamped to the string.
fn statement_range(total: usize, location: i32, len: i32) -> std::ops::Range<usize> {
    let start = (location.max(0) as usize).min(total);
    let end = if location < 0 || len <= 0 { total } else { (start + len as usize).min(total) };
    start..end
}

/// Length of the parameter reference at the start of `sql`: `$` and
/// digits, or a dotted chain of identifiers (plain or double-quoted).
fn reference_len(sql: &[u8]) -> usize {
    if sql.first() == Some(&b'$') {
        return 1 + sql[1..].iter().take_while(|b| b.is_ascii_digit()).count();
    }
    let mut i = 0;
    loop {
        if sql.get(i) == Some(&b'"') {
            i += 1;
            while i < sql.len() {
                if sql[i] == b'"' {
                    if sql.get(i + 1) == Some(&b'"') {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
        } else {
            i += sql[i..].iter().take_while(|&&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80).count();
        }
        if sql.get(i) == Some(&b'.') && sql.get(i + 1).is_some_and(|&b| b == b'"' || b.is_ascii_alphabetic() || b == b'_' || b >= 0x80) {
            i += 1;
            continue;
        }
        return i;
    }
}

/// Prefix of the transactional message a client's NOTIFY becomes in a
/// session of the proxy ([`NotifyMessage`]): each node delivers it when
/// the transaction commits there.
pub const NOTIFY_PREFIX: &str = "mtm_notify";

/// A NOTIFY, to be delivered on every node at the transaction's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyMessage {
    pub channel: String,
    pub payload: String,
}

impl NotifyMessage {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.channel.len() + self.payload.len());
        put_str(&mut out, &self.channel);
        put_str(&mut out, &self.payload);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<NotifyMessage, DecodeError> {
        let mut r = Reader(buf);
        let m = NotifyMessage { channel: r.string()?, payload: r.string()? };
        if !r.0.is_empty() {
            return Err(DecodeError::Trailing(r.0.len()));
        }
        Ok(m)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Short);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        std::str::from_utf8(self.bytes()?).map(str::to_owned).map_err(|_| DecodeError::Utf8)
    }
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16()?;
        let mut t = Vec::with_capacity(n as usize);
        for _ in 0..n {
            t.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b'b' => Value::Binary(self.bytes()?.to_vec()),
                b't' => Value::Text(self.bytes()?.to_vec()),
                marker => return Err(DecodeError::BadMarker { what: "value", marker }),
            });
        }
        Ok(t)
    }
    fn old(&mut self) -> Result<Option<OldTuple>, DecodeError> {
        match self.u8()? {
            b'-' => Ok(None),
            b'K' => Ok(Some(OldTuple::Key(self.tuple()?))),
            b'O' => Ok(Some(OldTuple::Full(self.tuple()?))),
            marker => Err(DecodeError::BadMarker { what: "old tuple", marker }),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_batch_frames_its_messages_and_a_batch_of_one_is_the_message_itself() {
        let begin = Message::Begin { xid: 7, final_lsn: 100, commit_time: 5, prepared: true };
        let insert = Message::Insert { relid: 16384, new: vec![Value::Binary(vec![0, 0, 0, 1]), Value::Null] };
        let prepare = Message::Prepare { prepare_lsn: 100, end_lsn: 120, prepare_time: 5, xid: 7, gid: "mtm-1-9".into() };
        let mut batch = Batch::default();
        assert!(batch.take().is_none());
        batch.push(&begin);
        let lone = batch.take().expect("one message");
        assert_eq!(lone, begin.to_bytes());
        assert_eq!(unbatch(&lone).collect::<Vec<_>>(), vec![Ok(&lone[..])]);
        assert!(batch.is_empty() && batch.len() == 0);

        for m in [&begin, &insert, &prepare] {
            batch.push(m);
        }
        let chunk = batch.take().expect("three messages");
        assert_eq!(chunk[0], tag::BATCH);
        let decoded: Vec<Message> = unbatch(&chunk).map(|m| Message::decode(m.expect("framed")).expect("decodes")).collect();
        assert_eq!(decoded, vec![begin, insert, prepare]);
    }

    #[test]
    fn a_broken_batch_ends_with_an_error() {
        let mut batch = Batch::default();
        batch.push(&Message::Commit { commit_lsn: 1, end_lsn: 2, commit_time: 3 });
        batch.push(&Message::Commit { commit_lsn: 4, end_lsn: 5, commit_time: 6 });
        let chunk = batch.take().expect("two");
        let cut = &chunk[..chunk.len() - 3];
        let items: Vec<_> = unbatch(cut).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert_eq!(items[1], Err(DecodeError::Short));
    }

    #[test]
    fn a_votes_coordinator_is_read_without_decoding_it() {
        let v = VoteMessage { coordinator: 3, voter: 1, gid: "mtm-3-1".into(), refusal: None };
        assert_eq!(VoteMessage::coordinator_of(&v.to_bytes()), Some(3));
        assert_eq!(VoteMessage::coordinator_of(&[0, 1]), None);
    }

    use super::*;

    #[test]
    fn relation_id_reads_only_relation_messages() {
        for m in all() {
            let expected = match &m {
                Message::Relation { relid, .. } => Some(*relid),
                _ => None,
            };
            assert_eq!(Message::relation_id(&m.to_bytes()), expected, "{m:?}");
        }
        assert_eq!(Message::relation_id(&[tag::RELATION, 0, 0]), None);
    }

    fn all() -> Vec<Message> {
        let t = vec![Value::Binary(vec![0, 0, 0, 7]), Value::Null, Value::UnchangedToast, Value::Text(b"(1,2)".to_vec())];
        vec![
            Message::Begin { xid: 7, final_lsn: 0x1_0000_0010, commit_time: -5, prepared: false },
            Message::Origin { origin_lsn: 99, name: "mtm_node_2".into() },
            Message::Relation {
                relid: 16384,
                namespace: "public".into(),
                name: "t ü".into(),
                replica_identity: b'd',
                columns: vec![
                    Column { key: true, name: "id".into(), type_oid: 23, typmod: -1 },
                    Column { key: false, name: "v".into(), type_oid: 1043, typmod: 14 },
                ],
            },
            Message::Insert { relid: 1, new: t.clone() },
            Message::Update { relid: 1, old: None, new: t.clone() },
            Message::Update { relid: 1, old: Some(OldTuple::Key(vec![Value::Null])), new: t.clone() },
            Message::Delete { relid: 1, old: Some(OldTuple::Full(t.clone())) },
            Message::Truncate { cascade: true, restart_identity: false, relids: vec![1, 2] },
            Message::Prepare { prepare_lsn: 1, end_lsn: 2, prepare_time: 3, xid: 4, gid: "mtm-1".into() },
            Message::CommitPrepared { commit_lsn: 1, end_lsn: 2, commit_time: 3, xid: 4, gid: "mtm-1".into() },
            Message::RollbackPrepared { prepare_end_lsn: 1, rollback_end_lsn: 2, prepare_time: 3, rollback_time: 4, xid: 5, gid: "g".into() },
            Message::Commit { commit_lsn: 1, end_lsn: 2, commit_time: 3 },
            Message::Message { transactional: true, lsn: 8, prefix: "mtm".into(), content: vec![1, 2, 3] },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            assert_eq!(Message::decode(&m.to_bytes()).unwrap(), m);
        }
    }

    #[test]
    fn truncated_and_trailing_input_are_errors() {
        for m in all() {
            let b = m.to_bytes();
            for cut in 0..b.len() {
                assert!(Message::decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert_eq!(Message::decode(&longer), Err(DecodeError::Trailing(1)));
        }
        assert_eq!(Message::decode(b"Z"), Err(DecodeError::UnknownType(b'Z')));
    }

    #[test]
    fn layout_is_big_endian_and_length_prefixed() {
        let b = Message::Origin { origin_lsn: 1, name: "ab".into() }.to_bytes();
        assert_eq!(b, vec![b'O', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn precommit_messages_round_trip() {
        for commit_on_promise in [false, true] {
            let m = PrecommitMessage { gid: "mtm-2-17".into(), commit_on_promise };
            assert_eq!(PrecommitMessage::decode(&m.to_bytes()), Ok(m.clone()));
        }
        let m = PrecommitMessage { gid: "mtm-2-17".into(), commit_on_promise: true };
        let mut long = m.to_bytes();
        long.push(0);
        assert!(PrecommitMessage::decode(&long).is_err());
        assert!(PrecommitMessage::decode(&[0, 0]).is_err());
    }

    #[test]
    fn vote_messages_round_trip() {
        for v in [
            VoteMessage { coordinator: 1, voter: 3, gid: "mtm-1-2".into(), refusal: None },
            VoteMessage { coordinator: 2, voter: 1, gid: "x".into(), refusal: Some(("55P03".into(), "lock timeout".into())) },
        ] {
            assert_eq!(VoteMessage::decode(&v.to_bytes()), Ok(v.clone()));
        }
        assert!(VoteMessage::decode(&[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, b'?']).is_err());
    }

    #[test]
    fn statement_text_cuts_one_statement_out_of_a_query_string() {
        let q = b"create table a(x int); create table b(y int);";
        assert_eq!(DdlMessage::statement_text(q, 0, 21), "create table a(x int)");
        let n = NotifyMessage { channel: "orders".into(), payload: "id=7 é".into() };
        assert_eq!(NotifyMessage::decode(&n.to_bytes()), Ok(n.clone()));
        assert!(NotifyMessage::decode(&n.to_bytes()[..5]).is_err());
        assert_eq!(DdlMessage::statement_text(q, 22, 0), "create table b(y int)");
        assert_eq!(DdlMessage::statement_text(q, -1, 0), "create table a(x int); create table b(y int)");
        assert_eq!(DdlMessage::statement_text(q, 400, 5), "", "a location past the end is empty, not a panic");
    }

    #[test]
    fn parameter_references_become_their_values() {
        let q = b"select 1; create table t as select v_n as n, $2 as k, rec.name, \"My Var\" from s where id = v_n;";
        let text = std::str::from_utf8(q).unwrap();
        let at = |pat: &str, nth: usize| text.match_indices(pat).nth(nth).unwrap().0;
        let values = vec![
            (at("v_n", 0), "'7'::integer".to_string()),
            (at("$2", 0), "NULL::text".to_string()),
            (at("rec.name", 0), "'it''s'::text".to_string()),
            (at("\"My Var\"", 0), "'x'::text".to_string()),
            (at("v_n", 1), "'7'::integer".to_string()),
            (3, "'outside the statement'".to_string()),
        ];
        assert_eq!(
            DdlMessage::statement_text_with_values(q, 10, q.len() as i32 - 10, &values),
            "create table t as select '7'::integer as n, NULL::text as k, 'it''s'::text, 'x'::text from s where id = '7'::integer"
        );
        assert_eq!(DdlMessage::statement_text_with_values(b"create table a as select $12", 0, 0, &[(25, "1".into())]), "create table a as select 1");
        assert_eq!(reference_len(b"f.v + 1"), 3, "a function-qualified variable");
        assert_eq!(reference_len(b"v.\"Odd \"\" one\" x"), 14, "quoted parts, doubled quotes");
        assert_eq!(reference_len(b"v. 1"), 1, "a dot not followed by a name ends it");
    }

    #[test]
    fn ddl_message_round_trips_and_rejects_trailing_bytes() {
        let settings = vec![("DateStyle".to_string(), "ISO, DMY".to_string()), ("TimeZone".to_string(), "Asia/Tokyo".to_string())];
        let m = DdlMessage { role: "app owner".into(), search_path: "\"$user\", public".into(), sql: "create table t(id int)".into(), settings };
        let bytes = m.to_bytes();
        assert_eq!(DdlMessage::decode(&bytes), Ok(m.clone()));
        let mut without = DdlMessage { settings: Vec::new(), ..m.clone() }.to_bytes();
        without.truncate(without.len() - 4);
        assert_eq!(DdlMessage::decode(&without), Ok(DdlMessage { settings: Vec::new(), ..m }), "a message without settings");
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(DdlMessage::decode(&longer), Err(DecodeError::Trailing(1)));
        assert_eq!(DdlMessage::decode(&bytes[..bytes.len() - 1]), Err(DecodeError::Short));
    }
}
