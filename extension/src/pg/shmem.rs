//! Shared memory: every structure the extension keeps there, by name.
//!
//! The types are defined (and documented) in their role modules; this file
//! only declares the statics, which pgrx allocates at server start, and
//! asserts for each type that it may live in shared memory.

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::AtomicI32;

// SAFETY: atomics only.
unsafe impl PGRXSharedMemory for crate::conflicts::Doomed {}
// SAFETY: the only shared memory with this name.
pub static DOOMED: PgAtomic<crate::conflicts::Doomed> = unsafe { PgAtomic::new(c"multimaster doomed transactions") };

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for crate::decisions::Decisions {}
// SAFETY: the only shared memory with this name.
pub static DECISIONS: PgLwLock<crate::decisions::Decisions> = unsafe { PgLwLock::new(c"multimaster decisions") };

// SAFETY: atomics only; the latch addresses point into PGPROC, which is
// in shared memory at the same address in every backend.
unsafe impl PGRXSharedMemory for crate::pool::PoolTable {}
// SAFETY: the only shared memory with this name.
pub static POOLS: PgAtomic<crate::pool::PoolTable> = unsafe { PgAtomic::new(c"multimaster apply pools") };

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for crate::resolver::Coordinators {}
// SAFETY: the only shared memory with this name.
pub static COORDINATORS: PgLwLock<crate::resolver::Coordinators> = unsafe { PgLwLock::new(c"multimaster coordinators") };

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for crate::status::ApplyErrors {}
// SAFETY: the only shared memory with this name.
pub static APPLY_ERRORS: PgLwLock<crate::status::ApplyErrors> = unsafe { PgLwLock::new(c"multimaster apply errors") };

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for crate::votes::VoteTable {}
// SAFETY: the only shared memory with this name.
pub static VOTES: PgLwLock<crate::votes::VoteTable> = unsafe { PgLwLock::new(c"multimaster votes") };

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for crate::votes::PeerVotes {}
// SAFETY: the only shared memory with this name.
pub static PEER_VOTES: PgLwLock<crate::votes::PeerVotes> = unsafe { PgLwLock::new(c"multimaster peer votes") };

/// This node's id, set by its receivers when they start (0: not yet), so
/// apply workers can sign their votes without a catalog lookup.
// SAFETY: the only shared memory with this name.
pub static MY_NODE: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"multimaster node id") };

/// Asks pgrx to allocate every static above (from `_PG_init`, while the
/// library is preloaded).
pub fn init() {
    pgrx::pg_shmem_init!(VOTES);
    pgrx::pg_shmem_init!(PEER_VOTES);
    pgrx::pg_shmem_init!(MY_NODE);
    pgrx::pg_shmem_init!(COORDINATORS);
    pgrx::pg_shmem_init!(DECISIONS);
    pgrx::pg_shmem_init!(POOLS);
    pgrx::pg_shmem_init!(APPLY_ERRORS);
    pgrx::pg_shmem_init!(DOOMED);
}
