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

#![deny(unsafe_code)]

use crate::pg::nodes::CreateSequence;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// This node's id and the number of configured nodes; None outside a
/// cluster (the extension is not here, or the cluster is not set up).
fn node_and_count() -> Option<(i32, i64)> {
    if crate::pg::catalog::namespace_oid(c"mtm") == pg_sys::InvalidOid {
        return None;
    }
    crate::with_snapshot(|| {
        let row = crate::pg::catalog::as_superuser(|| {
            Spi::get_two::<i32, i64>("SELECT id, (SELECT count(*) FROM mtm.cluster_nodes) FROM mtm.cluster_nodes WHERE is_self")
        });
        match row {
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

fn given(seq: CreateSequence<'_>) -> Given {
    let mut g = Given { increment: false, start: None, minvalue: None };
    for elem in seq.options() {
        match elem.name().to_bytes() {
            b"increment" => g.increment = true,
            b"start" => g.start = Some(elem.int64()),
            b"minvalue" if elem.has_arg() => g.minvalue = Some(elem.int64()),
            _ => {}
        }
    }
    g
}

/// For a CREATE SEQUENCE on a cluster node, the INCREMENT (the number of
/// nodes) and START (this node's first value) it gets instead of the
/// user's START ([`adjust`] rewrites the statement); None: the statement
/// runs as written.
pub fn node_step(seq: CreateSequence<'_>) -> Option<(i64, i64)> {
    if seq.sequence().is_some_and(|s| s.persistence() == pg_sys::RELPERSISTENCE_TEMP) {
        return None;
    }
    let g = given(seq);
    if g.increment {
        return None;
    }
    let (id, n) = node_and_count()?;
    if n < 2 {
        return None;
    }
    let start = match (g.start, g.minvalue) {
        (Some(s), _) => s + id as i64 - 1,
        (None, Some(m)) => m + id as i64 - 1,
        (None, None) => id as i64,
    };
    Some((n, start))
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
