//! Sequences that never hand out the same value on two nodes.
//!
//! A sequence's state is not replicated (PostgreSQL 15 does not decode
//! it), so every node draws from its own copy. Like the reference system,
//! a sequence created on a cluster node counts in steps of the number of
//! configured nodes, starting at the node's id: with 3 nodes, node 1 hands
//! out 1, 4, 7…, node 2 gets 2, 5, 8… This is done to the CREATE SEQUENCE
//! itself, on every node as it runs there (the origin and each peer's
//! replay), so it covers `serial`, `bigserial` and identity columns too.
//! A statement that sets its own INCREMENT (other than 1, which pg_dump
//! writes for every sequence) is left as written; one that sets only
//! START (or MINVALUE) starts at that value plus the node's id minus one.
//! Temporary sequences are local and left alone. `setval` in a session of
//! the proxy moves the sequence on every node, each to its own next value
//! ([`setval_everywhere`]), and so does `ALTER SEQUENCE ... RESTART WITH`
//! ([`node_restart`]).
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
            // INCREMENT BY 1 is what pg_dump writes for every sequence:
            // taken as unset, since on two nodes it could only collide.
            b"increment" => g.increment = !elem.has_arg() || elem.int64() != 1,
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

/// For an ALTER SEQUENCE ... RESTART WITH v of a sequence that counts in
/// this cluster's steps, the value this node restarts at instead: its own
/// next value at or after v (each node runs the statement, the origin and
/// each peer's replay, and moves to its own). None: the statement runs as
/// written (no value given, its own INCREMENT, a sequence of no step).
pub fn node_restart(alter: crate::pg::nodes::AlterSequence<'_>) -> Option<i64> {
    let mut restart = None;
    for elem in alter.options() {
        match elem.name().to_bytes() {
            b"restart" if elem.has_arg() => restart = Some(elem.int64()),
            b"increment" => return None,
            _ => {}
        }
    }
    let value = restart?;
    let seq = crate::pg::catalog::range_var_relid(alter.sequence()?)?;
    let (id, n) = node_step_of(seq)?;
    let next = next_value_of_node(value, id, n);
    // Past MAXVALUE the statement would fail here (and in each peer's
    // replay): then it runs as written.
    let max = crate::with_snapshot(|| Spi::get_one_with_args::<i64>("SELECT seqmax FROM pg_catalog.pg_sequence WHERE seqrelid = $1", &[seq.into()]));
    matches!(max, Ok(Some(m)) if next <= m).then_some(next)
}

/// The next value at or after `from` that belongs to node `id` of `n`.
fn next_value_of_node(from: i64, id: i64, n: i64) -> i64 {
    from + (id - from).rem_euclid(n)
}

/// `setval(seq, value[, is_called])` as the proxy's sessions run it:
/// parse analysis points their calls of PostgreSQL's `setval` here
/// ([`setval_replacements`]), and a peer replays the call as sent. The
/// sequence moves on every node, past `value`, each node to its own next
/// value: after a restore (`pg_dump` ends with a `setval` per sequence)
/// no node hands out a value the restored rows have, nor one another
/// node hands out. Returns `value`, as `setval` does.
fn setval_everywhere(seq: pg_sys::Oid, value: i64, is_called: bool) -> i64 {
    let (target, called) = match node_step_of(seq) {
        Some((id, n)) => (next_value_of_node(if is_called { value.saturating_add(1) } else { value }, id, n), false),
        None => (value, is_called),
    };
    crate::pg::sequence::setval(seq, target, called);
    let name = crate::with_snapshot(|| {
        Spi::get_one_with_args::<String>(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[seq.into()],
        )
    });
    if let Ok(Some(name)) = name {
        crate::ddl::send_statement(&format!("SELECT mtm.setval({}::regclass, {value}, {is_called})", crate::quote_literal(&name)));
    }
    value
}

#[pg_extern(name = "setval")]
fn setval_called(seq: pg_sys::Oid, value: i64) -> i64 {
    setval_everywhere(seq, value, true)
}

#[pg_extern(name = "setval")]
fn setval_with(seq: pg_sys::Oid, value: i64, is_called: bool) -> i64 {
    setval_everywhere(seq, value, is_called)
}

/// (this node's id, the number of nodes) if `seq` counts in this
/// cluster's steps (INCREMENT BY the number of nodes, two or more).
fn node_step_of(seq: pg_sys::Oid) -> Option<(i64, i64)> {
    let (id, n) = node_and_count()?;
    let increment = crate::with_snapshot(|| {
        Spi::get_one_with_args::<i64>("SELECT seqincrement FROM pg_catalog.pg_sequence WHERE seqrelid = $1", &[seq.into()])
    });
    (n >= 2 && increment == Ok(Some(n))).then_some((id as i64, n))
}

thread_local! {
    /// Oids of `mtm.setval(oid, int8)` and `mtm.setval(oid, int8, bool)`
    /// in this database, once found.
    static OUR_SETVAL: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
    static OUR_SETVAL_WITH: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// What the parse-analysis hook points a query's calls of PostgreSQL's
/// two `setval` functions at: ours in a session of the proxy, None (left
/// alone) elsewhere or where the text cannot call it.
pub(crate) fn setval_replacements(source: &[u8]) -> Option<[(pg_sys::Oid, pg_sys::Oid); 2]> {
    if !crate::notify::mentions(source, b"setval") || !crate::notify::cluster_wide() {
        return None;
    }
    let called = crate::notify::function_oid(&OUR_SETVAL, "mtm.setval(oid,bigint)")?;
    let with = crate::notify::function_oid(&OUR_SETVAL_WITH, "mtm.setval(oid,bigint,boolean)")?;
    Some([(pg_sys::F_SETVAL_REGCLASS_INT8.into(), called), (pg_sys::F_SETVAL_REGCLASS_INT8_BOOL.into(), with)])
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
