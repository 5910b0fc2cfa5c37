//! A node's durable cluster state, as plain safe Rust: what the extension
//! keeps in shared memory, writes to its WAL resource manager and to its
//! state file, with no PostgreSQL dependency so it can be unit-tested.
//!
//! - [`decisions`] — the 2PC decision log: what this node decided or
//!   learned about each `mtm-` gid (precommitted, committed, aborted).
#![forbid(unsafe_code)]

pub mod decisions;
