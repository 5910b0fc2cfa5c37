//! `mtm-proxy`: the PostgreSQL wire-protocol front door of a multimaster
//! cluster.
//!
//! Module map (one role each):
//! - [`config`]   — the TOML configuration (`conf/mtm-proxy.toml` documents every key);
//! - [`net`]      — frames, the backend-stream scanner, messages the proxy writes, client streams;
//! - [`startup`]  — the first packet: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage;
//! - [`tls`]      — rustls acceptor (clients) and connector (nodes);
//! - [`auth`]     — users file, SCRAM-SHA-256 and md5 at the proxy;
//! - [`backend`]  — opening a session on a node (startup, auth, key data);
//! - [`router`]   — node health state and the routing policy;
//! - [`health`]   — the background health checks;
//! - [`classify`] — statement classes (DDL, transaction, remote function, other) and
//!   what a statement means for the commit path (read, write, commit...);
//! - [`pause`]    — the gate that owners close to hold new transactions and commits;
//! - [`cancel`]   — proxy cancel keys → node backend keys;
//! - [`login`]    — startup, authentication and the choice of a home node;
//! - [`session`]  — one client session from login to close, transaction-boundary bookkeeping;
//! - [`relay`]    — the forwarding loop: units, the proxy's own statements, held replies;
//! - [`commit`]   — the cluster's two-phase commit: what is sent, how answers read;
//! - [`everywhere`] — statements that cannot run in a transaction (VACUUM, CREATE INDEX
//!   CONCURRENTLY…) run on every node in turn;
//! - [`admin`]    — the admin console (SHOW, PAUSE, RESUME, RELOAD);
//! - [`state`]    — what sessions share; reload;
//! - [`server`]   — listeners, metrics endpoint, signals;
//! - [`workers`]  — the threads sessions run on (one single-threaded runtime each).

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod classify;
pub mod commit;
pub mod config;
pub mod everywhere;
pub mod health;
pub mod login;
pub mod net;
pub mod pause;
pub mod router;
pub mod relay;
pub mod server;
pub mod session;
pub mod startup;
pub mod state;
pub mod tls;
pub mod workers;
