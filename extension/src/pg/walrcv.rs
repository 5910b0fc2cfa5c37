//! libpqwalreceiver, the client side of the replication protocol that the
//! core apply worker uses: loading it, then connecting, starting a logical
//! stream, receiving and sending through its function table. Those are
//! raw function pointers, which pgrx does not guard, so every call goes
//! through `pg_guard_ffi_boundary`: an ERROR inside (a peer that
//! disconnects in `walrcv_receive`) becomes a Rust panic that unwinds
//! through our frames, dropping the receiver's state properly, instead of
//! a longjmp over Rust destructors.
//!
//! Also here: the WAL position a receiver's feedback reports, and its
//! background-worker entry point. (It waits on the connection's socket
//! through `pg::latch::SocketWait`.)

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// The receiver's background-worker entry point: the launcher registers
/// it by this exported name.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mtm_receiver_main(_arg: pg_sys::Datum) {
    crate::receiver::main()
}

/// Runs a call through a raw libpqwalreceiver function pointer behind
/// pgrx's boundary.
///
/// # Safety
/// From the process's main thread (the boundary panics otherwise), with
/// arguments the called function accepts; `f` holds only that call.
unsafe fn guarded<T>(f: impl FnOnce() -> T) -> T {
    pg_sys::submodules::ffi::pg_guard_ffi_boundary(f)
}

/// libpqwalreceiver's function table, loaded into this process.
#[derive(Clone, Copy)]
pub struct WalReceiver(&'static pg_sys::WalReceiverFunctionsType);

/// Loads libpqwalreceiver (a no-op once loaded) and returns its functions.
pub fn load() -> WalReceiver {
    // SAFETY: a guarded binding (a missing library is an ERROR, raised as
    // a panic); the name is a NUL-terminated literal.
    unsafe { pg_sys::load_file(c"libpqwalreceiver".as_ptr(), false) };
    // SAFETY: a copy of this process's global pointer; libpqwalreceiver's
    // _PG_init, run by load_file above, points it at the library's static
    // table, which lives as long as the process (PostgreSQL never unloads
    // a library), so the 'static borrow holds.
    let funcs = unsafe { pg_sys::WalReceiverFunctions.as_ref() }.expect("libpqwalreceiver sets WalReceiverFunctions");
    WalReceiver(funcs)
}

impl WalReceiver {
    /// Connects to `conninfo` as a logical replication client named
    /// `appname`; on failure, libpq's message.
    pub fn connect(self, conninfo: &CStr, appname: &CStr) -> Result<Connection, String> {
        let mut err: *mut c_char = std::ptr::null_mut();
        let connect = self.0.walrcv_connect.expect("walrcv_connect");
        // SAFETY: libpqwalreceiver's own connect; both strings are
        // NUL-terminated and outlive the call (libpq copies them), and
        // `err` is a valid out-pointer for it.
        let conn = unsafe { guarded(|| connect(conninfo.as_ptr(), true, appname.as_ptr(), &mut err)) };
        match NonNull::new(conn) {
            Some(conn) => Ok(Connection { funcs: self.0, conn }),
            None if err.is_null() => Err("unknown error".into()),
            // SAFETY: on failure libpqwalreceiver sets `err` to a
            // NUL-terminated message palloc'd in the current memory
            // context, which nothing resets before this copy.
            None => Err(unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned()),
        }
    }
}

/// A replication connection to a peer's walsender. Dropping it without
/// [`Connection::disconnect`] leaves it to the process's exit (as an
/// ERROR that ends a worker does).
pub struct Connection {
    funcs: &'static pg_sys::WalReceiverFunctionsType,
    conn: NonNull<pg_sys::WalReceiverConn>,
}

impl Connection {
    /// Asks the walsender to stream slot `slot` from `start` with logical
    /// protocol `proto_version` (two-phase transactions decoded as such if
    /// `twophase`); false if it refused.
    pub fn start_logical(&mut self, slot: &CStr, start: pg_sys::XLogRecPtr, proto_version: u32, twophase: bool) -> bool {
        // SAFETY: a plain C struct of integers, bools and pointers, for
        // which all zeroes is valid (null publication list, no binary, no
        // streaming), as PostgreSQL's own callers start from.
        let mut opts: pg_sys::WalRcvStreamOptions = unsafe { std::mem::zeroed() };
        opts.logical = true;
        opts.slotname = slot.as_ptr() as *mut c_char;
        opts.startpoint = start;
        // The union's logical variant: `logical = true` tells
        // libpqwalreceiver to read that one.
        opts.proto.logical.proto_version = proto_version;
        opts.proto.logical.twophase = twophase;
        let start_streaming = self.funcs.walrcv_startstreaming.expect("walrcv_startstreaming");
        // SAFETY: a live connection of this table; `opts` and the slot name
        // it points to outlive the call, which only reads them.
        unsafe { guarded(|| start_streaming(self.conn.as_ptr(), &opts)) }
    }

    /// The connection's reading and writing halves, usable side by side:
    /// feedback is sent while a received message is still being handled.
    pub fn split(&mut self) -> (Stream<'_>, Sender<'_>) {
        (
            Stream { funcs: self.funcs, conn: self.conn, _conn: PhantomData },
            Sender { funcs: self.funcs, conn: self.conn, _conn: PhantomData },
        )
    }

    /// Runs `sql` (one statement) on the peer over this replication connection
    /// (a logical one: the walsender runs SQL) and returns its rows, each column as text (None for NULL),
    /// or the error message. Only from a worker connected to a database:
    /// libpqwalreceiver raises an ERROR (a panic here) otherwise, or when the
    /// rows do not have `columns` columns.
    pub fn exec(&self, sql: &CStr, columns: usize) -> Result<Vec<Vec<Option<String>>>, String> {
        let types = vec![pg_sys::TEXTOID; columns];
        let exec = self.funcs.walrcv_exec.expect("walrcv_exec");
        // SAFETY: a live connection of this table; `sql` is NUL-terminated
        // and `types` holds the `columns` OIDs the call reads, both
        // outliving it (the result copies what it keeps).
        let res = unsafe { guarded(|| exec(self.conn.as_ptr(), sql.as_ptr(), columns as i32, types.as_ptr())) };
        // SAFETY: walrcv_exec returns a result palloc'd in the current memory
        // context (never null) that only we hold, freed once below.
        let r = unsafe { *res };
        let out = match r.status {
            // SAFETY: for OK_TUPLES libpqwalreceiver sets the tuplestore and
            // a tupledesc of `columns` text attributes, which the slot is made
            // for. Without copying, a fetched tuple stays valid until the next
            // fetch, and each datum is copied into a String before that; the
            // slot is dropped while the tupledesc it points to still lives.
            pg_sys::WalRcvExecStatus::WALRCV_OK_TUPLES => unsafe {
                let slot = pg_sys::MakeSingleTupleTableSlot(r.tupledesc, &pg_sys::TTSOpsMinimalTuple);
                let mut rows = Vec::new();
                while pg_sys::tuplestore_gettupleslot(r.tuplestore, true, false, slot) {
                    let row = (1..=columns as i32).map(|attnum| {
                        let mut isnull = false;
                        let datum = pg_sys::slot_getattr(slot, attnum, &mut isnull);
                        String::from_datum(datum, isnull)
                    });
                    rows.push(row.collect());
                }
                pg_sys::ExecDropSingleTupleTableSlot(slot);
                Ok(rows)
            },
            pg_sys::WalRcvExecStatus::WALRCV_OK_COMMAND => Ok(Vec::new()),
            pg_sys::WalRcvExecStatus::WALRCV_ERROR if !r.err.is_null() => {
                // SAFETY: on an error libpqwalreceiver sets `err` to a
                // NUL-terminated message palloc'd with the result, freed only below.
                Err(unsafe { CStr::from_ptr(r.err) }.to_string_lossy().into_owned())
            }
            status => Err(format!("walrcv_exec: unexpected result status {status}")),
        };
        // SAFETY: the result walrcv_exec returned, no longer read (the rows
        // and message are copies) and freed only here; a guarded binding.
        unsafe { pg_sys::walrcv_clear_result(res) };
        out
    }

    /// Closes the connection.
    pub fn disconnect(self) {
        if let Some(disconnect) = self.funcs.walrcv_disconnect {
            // SAFETY: a live connection of this table, consumed here so
            // nothing can use it afterwards.
            unsafe { guarded(|| disconnect(self.conn.as_ptr())) };
        }
    }
}

/// What [`Stream::receive`] found.
pub enum Received<'a> {
    /// One CopyData message, valid until the next receive.
    Data(&'a [u8]),
    /// Nothing yet: wait for this socket to become readable.
    Idle(pg_sys::pgsocket),
    /// The walsender ended the stream.
    Ended,
}

/// The reading half of a [`Connection`].
pub struct Stream<'c> {
    funcs: &'static pg_sys::WalReceiverFunctionsType,
    conn: NonNull<pg_sys::WalReceiverConn>,
    _conn: PhantomData<&'c mut Connection>,
}

impl Stream<'_> {
    /// The next message from the walsender, without waiting.
    pub fn receive(&mut self) -> Received<'_> {
        let mut buf: *mut c_char = std::ptr::null_mut();
        let mut fd: pg_sys::pgsocket = pg_sys::PGINVALID_SOCKET;
        let receive = self.funcs.walrcv_receive.expect("walrcv_receive");
        // SAFETY: a live connection of this table (borrowed from the
        // Connection for 'c); `buf` and `fd` are valid out-pointers.
        let len = unsafe { guarded(|| receive(self.conn.as_ptr(), &mut buf, &mut fd)) };
        if len > 0 {
            // SAFETY: libpqwalreceiver returns `len` bytes at `buf` and
            // frees them only at its next receive (walrcv_send leaves them
            // alone); the slice borrows this Stream mutably, so no receive
            // runs while it lives, and the Connection cannot be
            // disconnected while the Stream lives.
            Received::Data(unsafe { std::slice::from_raw_parts(buf as *const u8, len as usize) })
        } else if len < 0 {
            Received::Ended
        } else {
            Received::Idle(fd)
        }
    }
}

/// The writing half of a [`Connection`].
pub struct Sender<'c> {
    funcs: &'static pg_sys::WalReceiverFunctionsType,
    conn: NonNull<pg_sys::WalReceiverConn>,
    _conn: PhantomData<&'c mut Connection>,
}

impl Sender<'_> {
    /// Sends `bytes` to the walsender as one CopyData message (a reply).
    pub fn send(&self, bytes: &[u8]) {
        if let Some(send) = self.funcs.walrcv_send {
            // SAFETY: a live connection of this table (borrowed for 'c);
            // `bytes` outlives the call, which copies them into libpq's
            // output buffer.
            unsafe { guarded(|| send(self.conn.as_ptr(), bytes.as_ptr() as *const c_char, bytes.len() as i32)) };
        }
    }
}

/// How far this node's WAL is flushed to disk.
pub fn flushed_up_to() -> pg_sys::XLogRecPtr {
    // SAFETY: reads the shared WAL control data under its spinlock, valid
    // in any backend; a null TLI out-pointer is allowed (not wanted).
    unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) }
}
