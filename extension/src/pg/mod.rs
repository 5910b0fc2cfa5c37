//! The thin layer between the extension and PostgreSQL's C API.
//!
//! Every `unsafe` block, every raw pointer and every call into `pg_sys`
//! that can raise an ERROR lives under this module, in small wrappers
//! whose `// SAFETY:` comments say which PostgreSQL rule makes the call
//! sound (inside a transaction, under a lock, with a valid pointer for
//! the callback's duration, ...). The role modules above it (`receiver`,
//! `apply`, `ddl`, ...) are `#![deny(unsafe_code)]`: they hold the logic
//! and call these wrappers; pure logic that needs no PostgreSQL at all
//! lives in the safe crates (`mtm-protocol`, `mtm-schedule`, `mtm-state`,
//! `#![forbid(unsafe_code)]`) with unit tests.
//!
//! Rules for a wrapper:
//! - a PostgreSQL function that can `ereport(ERROR)` is called through
//!   pgrx's guarded bindings (`pg_sys::*`, which run inside
//!   `pg_guard_ffi_boundary`), never through a bare `extern` block or a raw
//!   function pointer without a boundary — the one exception being the
//!   executor and utility hooks' call of PostgreSQL's own work, which runs
//!   under [`keep::call`], a boundary that keeps the error whole (CONTEXT
//!   and fields) for the trampoline to raise again;
//! - a callback PostgreSQL calls (hooks, output-plugin callbacks,
//!   background-worker entry points, shared-memory callbacks) is a
//!   `#[pg_guard]` trampoline here (the executor and utility hooks:
//!   [`keep::hook`]) that turns its pointers into the safe views below and
//!   calls the role module's safe function;
//! - a view of a PostgreSQL struct borrows it for no longer than
//!   PostgreSQL keeps it alive (the callback, the memory context).
//!
//! One file per PostgreSQL subsystem:

#![allow(unsafe_code)]
pub mod bgworker;
pub mod catalog;
pub mod decoding;
pub mod dsm;
pub mod elog;
pub mod executor;
pub mod guc;
pub mod keep;
pub mod latch;
pub mod memcx;
pub mod nodes;
pub mod notify;
pub mod origin;
pub mod proc;
pub mod relation;
pub mod rmgr;
pub mod sequence;
pub mod shmem;
pub mod twophase;
pub mod utility;
pub mod walrcv;
pub mod xact;
