//! The apply side's relation cache, as PostgreSQL's own apply worker keeps
//! one (`logicalrep_rel_open`): for each of a peer's relations, the local
//! table's OID and, for each local column, where its value is in the
//! peer's rows and the functions that read it — looked up once per
//! relation instead of once per row (name, namespace and type lookups,
//! and the function manager's lookup of each receive function).
//!
//! An entry is dropped when the peer describes its relation again (its
//! schema changed there), and every entry when PostgreSQL invalidates any
//! relation of this database here (a DDL statement, also one this worker
//! replays; VACUUM and ANALYZE updating statistics): the next change looks
//! the table up afresh, by name. An invalidation that arrives while a
//! cached table is being locked is seen before the entry is used, as in
//! `logicalrep_rel_open`.
#![deny(unsafe_code)]

use crate::pg::memcx::MemCx;
use crate::pg::relation::{self, Rel, TypeFunction};
use mtm_protocol::Column;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the relcache callback; the cache empties itself before its next
/// use. (One per process: workers are single-threaded.)
static STALE: AtomicBool = AtomicBool::new(false);

/// Where a local column's value comes from.
pub enum LocalColumn {
    /// Dropped or generated here: never written from a peer's row.
    Ignored,
    /// The peer does not have it (its schema differs): a new row gets the
    /// column's default, an updated row keeps its value.
    NotSent,
    /// At `remote` in the peer's row.
    Sent(SentColumn),
}

pub struct SentColumn {
    pub remote: usize,
    /// The peer's type is this column's type (binary values need it).
    pub same_type: bool,
    pub remote_type: u32,
    /// Receive (binary) and input (text) functions, in the cache's memory.
    pub recv: TypeFunction,
    pub input: TypeFunction,
    pub typmod: i32,
}

/// A peer's relation as it maps onto a table here.
pub struct LocalRelation {
    pub oid: pg_sys::Oid,
    /// By local attribute number - 1.
    pub columns: Vec<LocalColumn>,
}

pub struct RelationCache {
    entries: HashMap<u32, LocalRelation>,
    /// Holds the FmgrInfos; reset when the cache empties.
    cx: MemCx,
}

/// PostgreSQL invalidated a relation of this database
/// ([`relation::register_relcache_callback`]).
pub fn invalidated(_relid: pg_sys::Oid) {
    STALE.store(true, Ordering::Relaxed);
}

impl RelationCache {
    pub fn new() -> Self {
        relation::register_relcache_callback();
        // The context lives as long as the process (a worker has one cache).
        let cx = MemCx::for_process(c"multimaster relation cache");
        RelationCache { entries: HashMap::new(), cx }
    }

    /// The peer described `relid` again.
    pub fn forget(&mut self, relid: u32) {
        self.entries.remove(&relid);
    }

    fn clear(&mut self) {
        self.entries.clear();
        // Nothing refers to the FmgrInfos once the entries are gone.
        self.cx.reset();
    }

    /// Opens (RowExclusiveLock) the table here of the peer's relation
    /// `relid` (`namespace`.`name` with `columns` on the peer). Raises an
    /// ERROR when there is no such table here. Inside a transaction.
    pub fn open(
        &mut self,
        relid: u32,
        namespace: &str,
        name: &str,
        columns: &[Column],
        peer: i32,
    ) -> (Rel, &LocalRelation) {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        if STALE.swap(false, Ordering::Relaxed) {
            self.clear();
        }
        if let Some(oid) = self.entries.get(&relid).map(|e| e.oid) {
            // Locking processes pending invalidations: one may be for it.
            match Rel::try_open(oid, lock) {
                Some(rel) if !STALE.load(Ordering::Relaxed) => return (rel, &self.entries[&relid]),
                Some(rel) => rel.relation_close(lock),
                None => {}
            }
            STALE.store(false, Ordering::Relaxed);
            self.clear();
        }
        let nsp = CString::new(namespace).expect("no NUL");
        let rel_name = CString::new(name).expect("no NUL");
        let Some(rel) = Rel::open_by_name(&nsp, &rel_name, lock, true) else {
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("multimaster: table {namespace}.{name} from node {peer} does not exist here"),
                "It was created with multimaster.replicate_ddl off or dropped here by hand: create it on this node; the transaction is retried until it applies."
            );
            unreachable!("ereport(ERROR) does not return");
        };
        let entry = self.map(&rel, columns);
        self.entries.insert(relid, entry);
        (rel, &self.entries[&relid])
    }

    /// Maps the open table `rel`'s columns onto the peer's `columns`.
    fn map(&self, rel: &Rel, columns: &[Column]) -> LocalRelation {
        let attrs = rel.attributes();
        let mapped = attrs
            .iter()
            .map(|a| {
                if a.attisdropped || a.attgenerated != 0 {
                    return LocalColumn::Ignored;
                }
                let local_name = relation::attribute_name(a);
                let Some(remote) = columns.iter().position(|c| c.name == local_name) else {
                    return LocalColumn::NotSent;
                };
                let recv = relation::type_binary_input_info(a.atttypid);
                let input = relation::type_input_info(a.atttypid);
                LocalColumn::Sent(SentColumn {
                    remote,
                    same_type: columns[remote].type_oid == a.atttypid.to_u32(),
                    remote_type: columns[remote].type_oid,
                    recv: recv.lookup_in(&self.cx),
                    input: input.lookup_in(&self.cx),
                    typmod: a.atttypmod,
                })
            })
            .collect();
        LocalRelation { oid: rel.oid(), columns: mapped }
    }
}

impl Default for RelationCache {
    fn default() -> Self {
        Self::new()
    }
}
