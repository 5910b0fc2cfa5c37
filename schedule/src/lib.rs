//! How a receiver hands a peer's transactions to its apply pool.
//!
//! A peer's stream is a sequence of transactions in its commit order. The
//! pool applies them on several workers at once but commits them in that
//! same order (so the replication origin only ever moves forward over
//! transactions that are all committed here). Two transactions that
//! touch the same row must also *apply* in order, or the later one would
//! wait for the earlier one's row lock while the earlier one waits for
//! its turn to commit: [`keys`] finds the rows, [`scheduler`] keeps such
//! transactions on one worker (whose queue is first in, first out) or
//! holds the later one back until the earlier ones have committed.
//! [`flush`] decides how much of the peer's stream the receiver may
//! confirm: only what is committed here and flushed.
//!
//! [`tally`] counts the peers' 2PC votes on this node's prepared
//! transactions (the coordinator side of the commit path); [`conflict`]
//! says which of two conflicting transactions gives way; [`retry`] which
//! failures under parallel apply are tried again, alone, before a no vote.
//!
//! Safe Rust only: the extension keeps its `unsafe` calls into PostgreSQL
//! out of this logic so that it can be tested as plain Rust.

#![forbid(unsafe_code)]

pub mod conflict;
pub mod flush;
pub mod keys;
pub mod retry;
pub mod scheduler;
pub mod tally;

pub use flush::{CommitSource, FlushTracker};
pub use keys::{KeyTracker, TxnKeys};
pub use scheduler::{Finish, Plan, Scheduler};
