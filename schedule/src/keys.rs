//! The rows a transaction touches, as 64-bit hashes of (relation,
//! replica-identity key values). A collision only makes two independent
//! transactions look dependent, which costs parallelism, never
//! correctness. A table without a key hashes to one value: its updates
//! and deletes (which find rows by their whole content) are ordered after
//! everything before them on that table, while its inserts, which cannot
//! conflict with each other, only [`TxnKeys::touches`] it (pgbench_history
//! is such a table). TRUNCATE and DDL make the transaction a barrier.

use mtm_protocol::{Column, Message, OldTuple, Value};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// Key columns of each relation the peer has described (by its relid).
#[derive(Default)]
pub struct KeyTracker {
    relations: HashMap<u32, Vec<usize>>,
}

/// What one transaction touches.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct TxnKeys {
    /// Rows it changes: it runs after earlier transactions on them.
    pub keys: Vec<u64>,
    /// What later transactions on these keys must wait for, without this
    /// one waiting for earlier ones (inserts into a table without a key).
    pub touches: Vec<u64>,
    /// Must run alone: everything before it committed, everything after
    /// it waits for it (TRUNCATE, or too big to look at as a whole).
    pub barrier: bool,
}

impl TxnKeys {
    pub fn clear(&mut self) {
        self.keys.clear();
        self.touches.clear();
        self.barrier = false;
    }
}

impl KeyTracker {
    /// A Relation message: remember which columns form its key.
    pub fn relation(&mut self, relid: u32, columns: &[Column]) {
        let key: Vec<usize> = columns.iter().enumerate().filter(|(_, c)| c.key).map(|(i, _)| i).collect();
        self.relations.insert(relid, key);
    }

    /// Adds what `msg` touches to `txn`.
    pub fn add(&self, msg: &Message, txn: &mut TxnKeys) {
        match msg {
            Message::Insert { relid, new } => match self.row_key(*relid, new) {
                Key::Row(k) => txn.keys.push(k),
                Key::Table(k) => txn.touches.push(k),
            },
            Message::Update { relid, old, new } => {
                if let Some(OldTuple::Key(old) | OldTuple::Full(old)) = old {
                    txn.keys.push(self.row_key(*relid, old).hash());
                }
                txn.keys.push(self.row_key(*relid, new).hash());
            }
            Message::Delete { relid, old } => match old {
                Some(OldTuple::Key(old) | OldTuple::Full(old)) => txn.keys.push(self.row_key(*relid, old).hash()),
                None => txn.keys.push(table_key(*relid)),
            },
            Message::Truncate { .. } => txn.barrier = true,
            // A schema change: nothing may run beside it on either side.
            Message::Message { transactional: true, prefix, .. } if prefix == mtm_protocol::DDL_PREFIX || prefix == mtm_protocol::DDL_BEGIN_PREFIX => {
                txn.barrier = true
            }
            _ => {}
        }
    }

    fn row_key(&self, relid: u32, tuple: &[Value]) -> Key {
        let Some(cols) = self.relations.get(&relid).filter(|c| !c.is_empty()) else {
            return Key::Table(table_key(relid));
        };
        let mut h = DefaultHasher::new();
        relid.hash(&mut h);
        for &i in cols {
            match tuple.get(i) {
                Some(Value::Binary(b)) => (1u8, b).hash(&mut h),
                Some(Value::Text(b)) => (2u8, b).hash(&mut h),
                Some(Value::Null) | None => 3u8.hash(&mut h),
                // A key value the change did not carry: order by table.
                Some(Value::UnchangedToast) => return Key::Table(table_key(relid)),
            }
        }
        Key::Row(h.finish())
    }
}

enum Key {
    Row(u64),
    /// The table has no key (or the change did not carry it).
    Table(u64),
}

impl Key {
    fn hash(&self) -> u64 {
        match self {
            Key::Row(k) | Key::Table(k) => *k,
        }
    }
}

fn table_key(relid: u32) -> u64 {
    let mut h = DefaultHasher::new();
    (relid, "whole table").hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, key: bool) -> Column {
        Column { key, name: name.into(), type_oid: 23, typmod: -1 }
    }
    fn int(v: i32) -> Value {
        Value::Binary(v.to_be_bytes().to_vec())
    }
    fn keys_of(t: &KeyTracker, msgs: &[Message]) -> TxnKeys {
        let mut k = TxnKeys::default();
        msgs.iter().for_each(|m| t.add(m, &mut k));
        k
    }

    #[test]
    fn same_key_same_hash_other_columns_ignored() {
        let mut t = KeyTracker::default();
        t.relation(1, &[col("id", true), col("v", false)]);
        let a = keys_of(&t, &[Message::Insert { relid: 1, new: vec![int(7), int(1)] }]);
        let b = keys_of(&t, &[Message::Update { relid: 1, old: None, new: vec![int(7), int(2)] }]);
        let c = keys_of(&t, &[Message::Insert { relid: 1, new: vec![int(8), int(1)] }]);
        assert_eq!(a.keys, b.keys);
        assert_ne!(a.keys, c.keys);
    }

    #[test]
    fn same_key_in_another_table_differs() {
        let mut t = KeyTracker::default();
        t.relation(1, &[col("id", true)]);
        t.relation(2, &[col("id", true)]);
        let a = keys_of(&t, &[Message::Insert { relid: 1, new: vec![int(7)] }]);
        let b = keys_of(&t, &[Message::Insert { relid: 2, new: vec![int(7)] }]);
        assert_ne!(a.keys, b.keys);
    }

    #[test]
    fn key_change_touches_old_and_new_key() {
        let mut t = KeyTracker::default();
        t.relation(1, &[col("id", true), col("v", false)]);
        let upd = keys_of(
            &t,
            &[Message::Update { relid: 1, old: Some(OldTuple::Key(vec![int(1), Value::Null])), new: vec![int(2), int(0)] }],
        );
        let one = keys_of(&t, &[Message::Delete { relid: 1, old: Some(OldTuple::Key(vec![int(1), Value::Null])) }]);
        let two = keys_of(&t, &[Message::Insert { relid: 1, new: vec![int(2), int(5)] }]);
        assert_eq!(upd.keys, vec![one.keys[0], two.keys[0]]);
    }

    #[test]
    fn keyless_table_inserts_touch_deletes_order_truncate_is_a_barrier() {
        let mut t = KeyTracker::default();
        t.relation(3, &[col("a", false)]);
        let a = keys_of(&t, &[Message::Insert { relid: 3, new: vec![int(1)] }]);
        let b = keys_of(&t, &[Message::Insert { relid: 3, new: vec![int(2)] }]);
        assert!(a.keys.is_empty() && b.keys.is_empty(), "inserts do not wait for each other");
        assert_eq!(a.touches, b.touches);
        let d = keys_of(&t, &[Message::Delete { relid: 3, old: Some(OldTuple::Full(vec![int(1)])) }]);
        assert_eq!(d.keys, a.touches, "a delete waits for the inserts before it");
        assert!(!a.barrier);
        let tr = keys_of(&t, &[Message::Truncate { cascade: false, restart_identity: false, relids: vec![3] }]);
        assert!(tr.barrier);
    }

    #[test]
    fn a_ddl_message_makes_a_barrier_other_messages_do_not() {
        let t = KeyTracker::default();
        let msg = |prefix: &str, transactional| Message::Message { transactional, lsn: 0, prefix: prefix.into(), content: vec![] };
        assert!(keys_of(&t, &[msg(mtm_protocol::DDL_PREFIX, true)]).barrier);
        assert!(keys_of(&t, &[msg(mtm_protocol::DDL_BEGIN_PREFIX, true)]).barrier, "a CREATE TABLE AS whose rows follow");
        assert!(!keys_of(&t, &[msg("mtm_prepare", true)]).barrier);
        assert!(!keys_of(&t, &[msg(mtm_protocol::DDL_PREFIX, false)]).barrier);
    }
}
