//! `mtm-proxy`: the PostgreSQL wire-protocol front door of a multimaster
//! cluster.
//!
//! Module map:
//! - [`config`]  — the TOML configuration (`conf/mtm-proxy.toml` documents every key);
//! - [`startup`] — the first packet a client sends: SSLRequest, GSSENCRequest,
//!   CancelRequest or a protocol 3.0 StartupMessage;
//! - [`server`]  — the listener: accepts clients and spawns one session each;
//! - [`session`] — one client session from startup to close.

pub mod config;
pub mod server;
pub mod session;
pub mod startup;
