//! The local cluster launcher: creates, starts, stops and reports on N
//! PostgreSQL nodes and an `mtm-proxy` on one machine, with no Docker. It is
//! both the `mtmctl` command and the harness every integration test uses.
//!
//! Module map:
//! - [`layout`]  — where a cluster lives on disk and which ports it uses
//!   (`cluster.toml` in the data directory);
//! - [`host`]    — facts about this machine: PostgreSQL binaries, the
//!   `postgres` system user, free ports;
//! - [`node`]    — one PostgreSQL node: initdb, configure, start, stop, query;
//! - [`proxy`]   — the `mtm-proxy` process of a cluster;
//! - [`cluster`] — `up`, `down`, `status` over all of them;
//! - [`testing`] — a throw-away cluster for tests, stopped on drop;
//! - [`error`]   — the one-line errors the CLI prints.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod error;
pub mod host;
pub mod layout;
pub mod node;
pub mod proxy;
pub mod testing;

pub use cluster::Cluster;
pub use error::{Error, Result};
pub use layout::Layout;
