//! What the benchmark programs share: running pgbench and reading its
//! summary and per-transaction logs ([`pgbench`]), and the hops measured
//! next to mtm-proxy ([`hops`]: PgBouncer, HAProxy, and the CPU time a
//! process has used).

pub mod hops;
pub mod pgbench;
