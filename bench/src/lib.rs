//! What the benchmark programs share: running pgbench and reading its
//! summary and per-transaction logs ([`pgbench`]), the hops measured next
//! to mtm-proxy ([`hops`]: PgBouncer, HAProxy, and the CPU time a process
//! has used), and stock PostgreSQL servers as baselines ([`plain`]: one
//! node alone, or a primary with synchronous standbys).

pub mod hops;
pub mod pgbench;
pub mod plain;
