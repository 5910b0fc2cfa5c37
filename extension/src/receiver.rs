//! A receiver: one dynamic background worker per peer. It streams the
//! peer's slot `mtm_slot_<me>` through libpqwalreceiver (the path the core
//! apply worker uses), from the position its replication origin
//! `mtm_node_<peer>` has durably reached, and hands each decoded message
//! to [`crate::apply`]. Feedback reports only what is committed here.
//!
//! Any error ends the worker (the launcher starts it again), so a
//! transaction that fails to apply is retried from the origin's position
//! and never skipped. Not built yet: the parallel apply pool, votes.

use crate::apply::Applier;
use mtm_protocol::Message;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::ffi::{c_char, CStr, CString};

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mtm_receiver_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let peer: i32 = BackgroundWorker::get_extra().parse().unwrap_or_else(|_| error!("receiver started without a peer id"));
    BackgroundWorker::connect_worker_to_spi(Some(crate::launcher::DATABASE), None);
    let (me, conninfo) = BackgroundWorker::transaction(|| {
        let me = Spi::get_one::<i32>("SELECT id FROM mtm.cluster_nodes WHERE is_self").ok().flatten();
        let conninfo = Spi::get_one::<String>(&format!("SELECT conninfo FROM mtm.cluster_nodes WHERE id = {peer}")).ok().flatten();
        (me, conninfo)
    });
    let (Some(me), Some(conninfo)) = (me, conninfo) else {
        error!("multimaster receiver: node {peer} is not in mtm.cluster_nodes");
    };
    // SAFETY: FFI to PostgreSQL from the worker's main thread; every call
    // below may ERROR, which unwinds to this worker's pg_guard and exits.
    unsafe { run(me, peer, &conninfo) }
}

unsafe fn run(me: i32, peer: i32, conninfo: &str) {
    // Applied rows must not fire user triggers a second time.
    pg_sys::SetConfigOption(
        c"session_replication_role".as_ptr(),
        c"replica".as_ptr(),
        pg_sys::GucContext::PGC_SUSET,
        pg_sys::GucSource::PGC_S_OVERRIDE,
    );
    // Commit asynchronously: the peer is told only what our WAL has
    // flushed (Applier::flush_lsn), so nothing acknowledged can be lost.
    pg_sys::SetConfigOption(
        c"synchronous_commit".as_ptr(),
        c"off".as_ptr(),
        pg_sys::GucContext::PGC_SUSET,
        pg_sys::GucSource::PGC_S_OVERRIDE,
    );
    // mtm.node_info finds this worker by its application_name.
    let appname = CString::new(format!("mtm_receiver_from_{peer}")).expect("no NUL");
    pg_sys::SetConfigOption(
        c"application_name".as_ptr(),
        appname.as_ptr(),
        pg_sys::GucContext::PGC_USERSET,
        pg_sys::GucSource::PGC_S_SESSION,
    );
    let origin_name = CString::new(format!("mtm_node_{peer}")).expect("no NUL");
    pg_sys::StartTransactionCommand();
    // A cross-node deadlock shows up here as a lock wait that never ends:
    // give up after deadlock_timeout (a no vote for a prepare).
    let deadlock_timeout = pg_sys::GetConfigOption(c"deadlock_timeout".as_ptr(), false, false);
    pg_sys::SetConfigOption(
        c"lock_timeout".as_ptr(),
        deadlock_timeout,
        pg_sys::GucContext::PGC_SUSET,
        pg_sys::GucSource::PGC_S_OVERRIDE,
    );
    let origin = pg_sys::replorigin_by_name(origin_name.as_ptr(), false);
    pg_sys::replorigin_session_setup(origin);
    pg_sys::replorigin_session_origin = origin;
    let start = pg_sys::replorigin_session_get_progress(false);
    pg_sys::CommitTransactionCommand();

    pg_sys::load_file(c"libpqwalreceiver".as_ptr(), false);
    let funcs = &*pg_sys::WalReceiverFunctions;
    let c_conninfo = CString::new(conninfo).unwrap_or_else(|_| error!("conninfo of node {peer} contains NUL"));
    let walsender_name = CString::new(format!("mtm_receiver_{me}_from_{peer}")).expect("no NUL");
    let mut err: *mut c_char = std::ptr::null_mut();
    let conn = (funcs.walrcv_connect.expect("walrcv_connect"))(c_conninfo.as_ptr(), true, walsender_name.as_ptr(), &mut err);
    if conn.is_null() {
        let msg = if err.is_null() { "unknown error".into() } else { CStr::from_ptr(err).to_string_lossy().into_owned() };
        error!("multimaster: cannot connect to node {peer}: {msg}");
    }
    let slot = CString::new(format!("mtm_slot_{me}")).expect("no NUL");
    let mut opts: pg_sys::WalRcvStreamOptions = std::mem::zeroed();
    opts.logical = true;
    opts.slotname = slot.as_ptr() as *mut c_char;
    opts.startpoint = start;
    opts.proto.logical.proto_version = 1;
    opts.proto.logical.twophase = true;
    if !(funcs.walrcv_startstreaming.expect("walrcv_startstreaming"))(conn, &opts) {
        error!("multimaster: node {peer} refused to stream slot mtm_slot_{me}");
    }
    log!("multimaster: receiving from node {peer} at {:X}/{:X}", start >> 32, start as u32);

    let mut applier = Applier::new(peer);
    let mut last_feedback = std::time::Instant::now();
    // The peer's WAL position we have seen (XLogData end, keepalive end).
    let mut received: u64 = start;
    loop {
        if BackgroundWorker::sigterm_received() {
            break;
        }
        let mut buf: *mut c_char = std::ptr::null_mut();
        let mut fd: pg_sys::pgsocket = pg_sys::PGINVALID_SOCKET;
        let len = (funcs.walrcv_receive.expect("walrcv_receive"))(conn, &mut buf, &mut fd);
        if len > 0 {
            let data = std::slice::from_raw_parts(buf as *const u8, len as usize);
            match data[0] {
                b'w' if data.len() >= 25 => {
                    received = received.max(u64::from_be_bytes(data[9..17].try_into().expect("8 bytes")));
                    let payload = &data[25..];
                    let msg = Message::decode(payload)
                        .unwrap_or_else(|e| error!("multimaster: undecodable message from node {peer}: {e}"));
                    applier.apply(msg);
                }
                b'k' if data.len() >= 18 => {
                    received = received.max(u64::from_be_bytes(data[1..9].try_into().expect("8 bytes")));
                    if data[17] != 0 {
                        send_feedback(funcs, conn, applier.flush_lsn(received));
                        last_feedback = std::time::Instant::now();
                    }
                }
                _ => {}
            }
            continue;
        }
        if len < 0 {
            log!("multimaster: node {peer} ended the stream");
            break;
        }
        if last_feedback.elapsed() >= std::time::Duration::from_secs(1) {
            send_feedback(funcs, conn, applier.flush_lsn(received));
            last_feedback = std::time::Instant::now();
        }
        applier.idle();
        let rc = pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            (pg_sys::WL_SOCKET_READABLE | pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            fd,
            1000,
            pg_sys::PG_WAIT_EXTENSION,
        );
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
    }
    if let Some(disconnect) = funcs.walrcv_disconnect {
        disconnect(conn);
    }
}

/// Standby status update: everything up to `lsn` is committed here.
unsafe fn send_feedback(funcs: &pg_sys::WalReceiverFunctionsType, conn: *mut pg_sys::WalReceiverConn, lsn: u64) {
    let mut msg = Vec::with_capacity(34);
    msg.push(b'r');
    for _ in 0..3 {
        msg.extend_from_slice(&lsn.to_be_bytes());
    }
    msg.extend_from_slice(&pg_sys::GetCurrentTimestamp().to_be_bytes());
    msg.push(0);
    if let Some(send) = funcs.walrcv_send {
        send(conn, msg.as_ptr() as *const c_char, msg.len() as i32);
    }
}
