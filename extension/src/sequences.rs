//! Sequences that never hand out the same value on two nodes.
//!
//! A sequence's state is not replicated (PostgreSQL 15 does not decode
//! it), so every node draws from its own copy. Like the reference system,
//! a sequence created on a cluster node counts in steps of the number of
//! configured nodes, starting at the node's id: with 3 nodes, node 1 hands
//! out 1, 4, 7…, node 2 gets 2, 5, 8… This is done to the CREATE SEQUENCE
//! itself, on every node as it runs there (the origin and each peer's
//! replay), so it covers `serial`, `bigserial` and identity columns too.
//! A statement that sets its own INCREMENT is left as written; one that
//! sets only START (or MINVALUE) starts at that value plus the node's id
//! minus one. Temporary sequences are local and left alone.
//!
//! `mtm.alter_sequences()` does the same to existing sequences (made
//! before the cluster, or with an explicit INCREMENT BY 1), on every node.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

/// This node's id and the number of configured nodes; None outside a
/// cluster (the extension is not here, or the cluster is not set up).
fn node_and_count() -> Option<(i32, i64)> {
    // SAFETY: a syscache lookup inside a transaction.
    if unsafe { pg_sys::get_namespace_oid(c"mtm".as_ptr(), true) } == pg_sys::InvalidOid {
        return None;
    }
    crate::with_snapshot(|| {
        match Spi::get_two::<i32, i64>("SELECT id, (SELECT count(*) FROM mtm.cluster_nodes) FROM mtm.cluster_nodes WHERE is_self") {
            Ok((Some(id), Some(n))) => Some((id, n)),
            _ => None,
        }
    })
}

/// The names of the options a CREATE SEQUENCE gives, and START/MINVALUE.
struct Given {
    increment: bool,
    start: Option<i64>,
    minvalue: Option<i64>,
}

/// # Safety
/// `options` is a List of DefElem (or NIL).
unsafe fn given(options: *mut pg_sys::List) -> Given {
    let mut g = Given { increment: false, start: None, minvalue: None };
    for elem in pgrx::PgList::<pg_sys::DefElem>::from_pg(options).iter_ptr() {
        let name = CStr::from_ptr((*elem).defname).to_bytes();
        match name {
            b"increment" => g.increment = true,
            b"start" => g.start = Some(pg_sys::defGetInt64(elem)),
            b"minvalue" if !(*elem).arg.is_null() => g.minvalue = Some(pg_sys::defGetInt64(elem)),
            _ => {}
        }
    }
    g
}

/// A DefElem `name = value`.
unsafe fn int_option(name: &CStr, value: i64) -> *mut pg_sys::DefElem {
    let arg = match i32::try_from(value) {
        Ok(v) => pg_sys::makeInteger(v) as *mut pg_sys::Node,
        // Larger values are written as PostgreSQL's parser writes them.
        Err(_) => {
            let text = CString::new(value.to_string()).expect("digits");
            pg_sys::makeFloat(pg_sys::pstrdup(text.as_ptr())) as *mut pg_sys::Node
        }
    };
    pg_sys::makeDefElem(pg_sys::pstrdup(name.as_ptr()), arg, -1)
}

/// For a CREATE SEQUENCE on a cluster node, the statement with this node's
/// INCREMENT and START (copied first if the tree is read-only); any other
/// statement unchanged. Returns the statement and whether it is read-only.
///
/// # Safety
/// Called from the ProcessUtility hook with its arguments.
pub unsafe fn adjust(pstmt: *mut pg_sys::PlannedStmt, read_only_tree: bool) -> (*mut pg_sys::PlannedStmt, bool) {
    let node = (*pstmt).utilityStmt;
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_CreateSeqStmt {
        return (pstmt, read_only_tree);
    }
    let stmt = node as *mut pg_sys::CreateSeqStmt;
    let seq = (*stmt).sequence;
    if !seq.is_null() && (*seq).relpersistence as u8 == pg_sys::RELPERSISTENCE_TEMP {
        return (pstmt, read_only_tree);
    }
    let g = given((*stmt).options);
    if g.increment {
        return (pstmt, read_only_tree);
    }
    let Some((id, n)) = node_and_count() else { return (pstmt, read_only_tree) };
    if n < 2 {
        return (pstmt, read_only_tree);
    }
    let pstmt = if read_only_tree { pg_sys::copyObjectImpl(pstmt as *const std::ffi::c_void) as *mut pg_sys::PlannedStmt } else { pstmt };
    let stmt = (*pstmt).utilityStmt as *mut pg_sys::CreateSeqStmt;
    let mut options = (*stmt).options;
    let start = match (g.start, g.minvalue) {
        (Some(s), _) => s + id as i64 - 1,
        (None, Some(m)) => m + id as i64 - 1,
        (None, None) => id as i64,
    };
    // A START given twice is an error: replace the user's.
    options = remove_option(options, c"start");
    options = pg_sys::lappend(options, int_option(c"increment", n) as *mut std::ffi::c_void);
    options = pg_sys::lappend(options, int_option(c"start", start) as *mut std::ffi::c_void);
    (*stmt).options = options;
    (pstmt, false)
}

/// `options` without the DefElem called `name`.
unsafe fn remove_option(options: *mut pg_sys::List, name: &CStr) -> *mut pg_sys::List {
    let mut out: *mut pg_sys::List = std::ptr::null_mut();
    for elem in pgrx::PgList::<pg_sys::DefElem>::from_pg(options).iter_ptr() {
        if CStr::from_ptr((*elem).defname) != name {
            out = pg_sys::lappend(out, elem as *mut std::ffi::c_void);
        }
    }
    out
}

/// The next value at or after `from` that belongs to node `id` of `n`.
fn next_value_of_node(from: i64, id: i64, n: i64) -> i64 {
    from + (id - from).rem_euclid(n)
}

/// Gives every ascending sequence of this database this node's step
/// (INCREMENT BY the number of nodes, next value this node's own), here
/// and — through the DDL stream — on every other node, each with its own
/// id. Returns true.
#[pg_extern]
fn alter_sequences() -> bool {
    let Some((id, n)) = node_and_count() else {
        error!("mtm.alter_sequences: this node is not part of a cluster (mtm.cluster_nodes has no row for it)");
    };
    let rows: Vec<(String, i64, i64)> = Spi::connect(|client| {
        let table = client.select(
            "SELECT format('%I.%I', schemaname, sequencename), coalesce(last_value + 1, start_value), min_value \
             FROM pg_sequences WHERE increment_by > 0 AND schemaname !~ '^pg_temp' AND schemaname <> 'pg_catalog'",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in table {
            let name: Option<String> = row.get(1)?;
            let from: Option<i64> = row.get(2)?;
            let min: Option<i64> = row.get(3)?;
            if let (Some(name), Some(from), Some(min)) = (name, from, min) {
                out.push((name, from, min));
            }
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| error!("mtm.alter_sequences: {e}"));
    crate::ddl::while_capturing(|| {
        for (name, from, min) in &rows {
            let next = next_value_of_node((*from).max(*min), id as i64, n);
            Spi::run(&format!("ALTER SEQUENCE {name} INCREMENT BY {n} RESTART WITH {next}"))
                .unwrap_or_else(|e| error!("mtm.alter_sequences: {name}: {e}"));
        }
    });
    // The peers run this function too, each for its own id.
    crate::ddl::send_statement("SELECT mtm.alter_sequences()");
    true
}
