//! Background workers: the entry points PostgreSQL calls by name for the
//! launcher and the apply workers (trampolines into [`crate::launcher`]
//! and [`crate::worker`]), and this process's pid. (Registration and
//! signals go through pgrx's safe `pgrx::bgworkers` API; the PGPROC
//! number a pool member publishes is in `pg/proc.rs`, the
//! replication-origin session an apply worker holds in `pg/origin.rs`.)

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The launcher's entry point (`bgw_function_name` in launcher::register).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mtm_launcher_main(_arg: pg_sys::Datum) {
    crate::launcher::main();
}

/// An apply worker's entry point (`bgw_function_name` in
/// pool::Queues::start); its argument is the handle of the pool's segment.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mtm_apply_worker_main(arg: pg_sys::Datum) {
    crate::worker::main(arg.value() as pg_sys::dsm_handle);
}

/// This process's pid (`MyProcPid`).
pub fn my_pid() -> i32 {
    // SAFETY: set once when the process starts, before extension code
    // runs; a plain read of an int.
    unsafe { pg_sys::MyProcPid }
}
