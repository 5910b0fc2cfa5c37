//! The relay: a session's forwarding loop, which understands every
//! message it passes on, so that it can put its own statements in and
//! answer for the node where the cluster's commit needs it.
//!
//! Two halves run side by side, so a full socket on one side never stalls
//! the other (a pipelining client and a node writing results cannot
//! deadlock):
//! - the **driver** (client → node) cuts the client's messages into units
//!   — a Query, a FunctionCall, or extended-protocol messages up to their
//!   Sync — and decides for each how it runs: as sent; wrapped in a
//!   transaction of the proxy's (an autocommit unit that may write); or,
//!   for a COMMIT of a transaction that wrote, replaced by the cluster's
//!   two-phase commit ([`crate::commit`]). Every unit and every statement
//!   of the proxy's own pushes an [`Expect`] entry;
//! - the **responder** (node → client) cuts the node's output into
//!   messages (a large one streams through, never held whole) and treats
//!   each according to the [`Expect`] at the head of the queue: forward,
//!   skip, hold the ReadyForQuery for the driver, or capture the answer to
//!   the proxy's own statement. It also swallows the node's report of
//!   `multimaster.xact_writes` (whether the open transaction wrote).
//!
//! Plain reads cost nothing extra: a unit that cannot write is forwarded
//! with one queue entry and no extra round trip; a read-only transaction
//! commits with the client's own COMMIT.

use crate::classify::{intent, Intent};
use crate::commit::{self, Reply, Votes};
use crate::net::frame::{parse_text, query_text, Batch, BodyReader, FrameIoError, FrameReader, FrameRef, Read};
use crate::net::messages::{self, PgError};
use crate::session::{count_error, End, PumpCtx};
use bytes::BytesMut;
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

/// Startup parameter the proxy sets on its node sessions (see the
/// extension's `xact` module).
pub const COORDINATED_COMMIT: &str = "multimaster.coordinated_commit";
/// The node's reported setting: the open transaction wrote to a
/// replicated table.
pub const XACT_WRITES: &str = "multimaster.xact_writes";

/// A message bigger than this streams through the responder in pieces.
const WHOLE_MESSAGE_LIMIT: usize = 256 * 1024;

/// The longest a session goes without looking at the configuration
/// again: how late a reloaded `client_idle_timeout` or `max_message_size`
/// can reach it. Chosen over waking sessions on reload, which would add a
/// waiter registration (a lock) to every read; its cost is one timer
/// wake-up per second per session.
const RECHECK: Duration = Duration::from_secs(1);

/// How the responder treats the node's answers to one request.
enum Expect {
    /// The proxy's own BEGIN in front of a client unit: swallow this many
    /// messages.
    Skip(usize),
    /// A client unit: forward everything through its ReadyForQuery.
    Forward,
    /// A client unit the proxy finishes itself: forward its answers but
    /// hand the ReadyForQuery to the driver — and with `hold_complete` its
    /// last CommandComplete too, which PostgreSQL sends only after a
    /// successful commit in the simple protocol.
    Hold { hold_complete: bool, tx: oneshot::Sender<Held> },
    /// The proxy's own statement: collect its answer for the driver.
    Capture(oneshot::Sender<Vec<Reply>>),
}

/// The held end of a unit.
#[derive(Debug, Default)]
struct Held {
    status: u8,
    complete: Option<BytesMut>,
    /// An ErrorResponse was among the unit's answers.
    error: bool,
}

/// What the two halves share.
struct Link<CW> {
    expect: Mutex<VecDeque<Expect>>,
    /// Signalled whenever an entry leaves the queue.
    progressed: Notify,
    /// Transaction status of the last ReadyForQuery from the node.
    status: AtomicU8,
    /// The node said the open transaction wrote to a replicated table.
    wrote: AtomicBool,
    client: tokio::sync::Mutex<CW>,
}

impl<CW: AsyncWrite + Unpin> Link<CW> {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Expect>> {
        self.expect.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_status(&self, status: u8) {
        self.status.store(status, Ordering::Relaxed);
        if status == b'I' {
            self.wrote.store(false, Ordering::Relaxed);
        }
    }

    async fn to_client(&self, bytes: &[u8]) -> Result<(), End> {
        let mut c = self.client.lock().await;
        c.write_all(bytes).await.map_err(|_| End::ClientIo)
    }
}

/// Runs a session until either side ends it.
pub async fn pump<CR, CW, SR, SW>(cr: CR, cw: CW, sr: SR, sw: SW, ctx: &PumpCtx<'_>, initial_status: u8) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let link = Link {
        expect: Mutex::new(VecDeque::new()),
        progressed: Notify::new(),
        status: AtomicU8::new(initial_status),
        wrote: AtomicBool::new(false),
        client: tokio::sync::Mutex::new(cw),
    };
    let mut driver = Driver {
        sw,
        link: &link,
        ctx,
        reader: FrameReader::new(ctx.shared.live.load().config.limits.max_message_size),
        out: BytesMut::new(),
        statements: HashMap::default(),
        portals: HashMap::default(),
        unit: None,
        pending: None,
        wake: Box::pin(tokio::time::sleep(RECHECK)),
    };
    let responder = Responder { link: &link, ctx, out: BytesMut::new(), held_complete: None, held_error: false, captured: Vec::new(), fire: Vec::new(), progressed: false };
    tokio::select! {
        biased;
        end = driver.run(cr) => end,
        end = responder.run(sr) => end,
    }
}

// ---------------------------------------------------------------- responder

/// A signal for the driver, sent once the bytes before it reached the
/// client (so the driver's own replies never overtake them).
enum Signal {
    Held(oneshot::Sender<Held>, Held),
    Captured(oneshot::Sender<Vec<Reply>>, Vec<Reply>),
}

struct Responder<'a, CW> {
    link: &'a Link<CW>,
    ctx: &'a PumpCtx<'a>,
    out: BytesMut,
    held_complete: Option<BytesMut>,
    held_error: bool,
    captured: Vec<Reply>,
    fire: Vec<Signal>,
    /// An entry left the queue during this read.
    progressed: bool,
}

/// A piece of the node's output, as a range of [`Splitter::buf`].
#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Whole(std::ops::Range<usize>),
    /// Part of a message too large to hold: passed on as it comes.
    Through(std::ops::Range<usize>),
}

/// Cuts the node's output into messages where they lie in the read
/// buffer: nothing is copied or allocated per message.
#[derive(Default)]
struct Splitter {
    buf: BytesMut,
    /// Start of what [`Splitter::next`] has not handed out yet.
    pos: usize,
    /// Bytes still to pass through of a large message.
    streaming: usize,
}

impl Splitter {
    fn next(&mut self) -> Result<Option<Piece>, String> {
        let have = self.buf.len() - self.pos;
        if self.streaming > 0 {
            if have == 0 {
                return Ok(None);
            }
            let n = self.streaming.min(have);
            self.streaming -= n;
            self.pos += n;
            return Ok(Some(Piece::Through(self.pos - n..self.pos)));
        }
        if have < 5 {
            return Ok(None);
        }
        let p = self.pos;
        let len = u32::from_be_bytes([self.buf[p + 1], self.buf[p + 2], self.buf[p + 3], self.buf[p + 4]]) as usize;
        if len < 4 {
            return Err(format!("server sent a message with invalid length {len}"));
        }
        let total = len + 1;
        if have >= total {
            self.pos += total;
            return Ok(Some(Piece::Whole(p..self.pos)));
        }
        if total > WHOLE_MESSAGE_LIMIT {
            self.streaming = total - have;
            self.pos += have;
            return Ok(Some(Piece::Through(p..self.pos)));
        }
        Ok(None)
    }

    /// Drops what was handed out, before the next read.
    fn consume(&mut self) {
        bytes::Buf::advance(&mut self.buf, self.pos);
        self.pos = 0;
    }
}

/// The value of a ParameterStatus for [`XACT_WRITES`], if it is one.
fn xact_writes_report(body: &[u8]) -> Option<bool> {
    let mut r = BodyReader::new(body);
    (r.cstr().ok()? == XACT_WRITES).then(|| r.cstr().ok() == Some("on"))
}

impl<CW: AsyncWrite + Unpin> Responder<'_, CW> {
    async fn run<SR: AsyncRead + Unpin>(mut self, mut sr: SR) -> End {
        let mut split = Splitter::default();
        loop {
            split.consume();
            split.buf.reserve(64 * 1024);
            match sr.read_buf(&mut split.buf).await {
                Ok(0) => return End::ServerClosed,
                Ok(_) => {}
                Err(_) => return End::ServerIo,
            }
            {
                // One look at the queue for all the messages of a read.
                let mut queue = self.link.queue();
                loop {
                    match split.next() {
                        Err(e) => return End::ServerProtocol(e),
                        Ok(None) => break,
                        Ok(Some(Piece::Through(r))) => self.out.extend_from_slice(&split.buf[r]),
                        Ok(Some(Piece::Whole(r))) => self.message(&mut queue, &split.buf[r]),
                    }
                }
            }
            if !self.out.is_empty() {
                if self.link.to_client(&self.out).await.is_err() {
                    return End::ClientIo;
                }
                self.ctx.bytes_out.increment(self.out.len() as u64);
                self.ctx.shared.totals.bytes_out.fetch_add(self.out.len() as u64, Ordering::Relaxed);
                self.out.clear();
            }
            // Only now, with the bytes before them at the client: the
            // driver's own replies never overtake them.
            if std::mem::take(&mut self.progressed) {
                self.link.progressed.notify_waiters();
            }
            for s in self.fire.drain(..) {
                // A driver that is gone has ended the session anyway.
                let _ = match s {
                    Signal::Held(tx, h) => tx.send(h).map_err(|_| ()),
                    Signal::Captured(tx, r) => tx.send(r).map_err(|_| ()),
                };
            }
        }
    }

    fn count_error(&self, tag: u8, raw: &[u8]) {
        if tag == b'E' {
            self.ctx.shared.totals.errors.fetch_add(1, Ordering::Relaxed);
            count_error(&crate::net::scan::sqlstate(&raw[5..]).unwrap_or_else(|| "XX000".into()));
        }
    }

    /// One whole message of the node, handled as the head of `queue` says.
    fn message(&mut self, queue: &mut VecDeque<Expect>, raw: &[u8]) {
        let tag = raw[0];
        let body = &raw[5..];
        if tag == b'S' {
            if let Some(on) = xact_writes_report(body) {
                self.link.wrote.store(on, Ordering::Relaxed);
                return;
            }
        }
        if tag == b'A' {
            // Notifications belong to the client whatever is running.
            self.out.extend_from_slice(raw);
            return;
        }
        let status = (tag == b'Z').then(|| body.first().copied().unwrap_or(b'I'));
        if let Some(s) = status {
            self.link.set_status(s);
        }
        let Some(front) = queue.front_mut() else {
            // Nothing expected (e.g. a notice between units): pass it on.
            self.out.extend_from_slice(raw);
            return;
        };
        let done = match front {
            Expect::Skip(n) => {
                if tag != b'N' {
                    *n = n.saturating_sub(1);
                }
                *n == 0
            }
            Expect::Forward => {
                self.count_error(tag, raw);
                self.out.extend_from_slice(raw);
                if let Some(s) = status {
                    self.ctx.tracker.on_ready(s);
                }
                status.is_some()
            }
            Expect::Hold { hold_complete, .. } => {
                if status.is_none() {
                    if let Some(c) = self.held_complete.take() {
                        self.out.extend_from_slice(&c);
                    }
                    if tag == b'C' && *hold_complete {
                        self.held_complete = Some(BytesMut::from(raw));
                    } else {
                        self.held_error |= tag == b'E';
                        self.count_error(tag, raw);
                        self.out.extend_from_slice(raw);
                    }
                    false
                } else {
                    true
                }
            }
            Expect::Capture(_) => {
                if tag != b'N' {
                    self.captured.push(Reply { tag, raw: BytesMut::from(raw) });
                }
                status.is_some()
            }
        };
        if !done {
            return;
        }
        match queue.pop_front() {
            Some(Expect::Hold { tx, .. }) => {
                let held = Held {
                    status: status.unwrap_or(b'I'),
                    complete: self.held_complete.take(),
                    error: std::mem::take(&mut self.held_error),
                };
                self.fire.push(Signal::Held(tx, held));
            }
            Some(Expect::Capture(tx)) => self.fire.push(Signal::Captured(tx, std::mem::take(&mut self.captured))),
            _ => {}
        }
        self.progressed = true;
    }
}

// ------------------------------------------------------------------- driver

/// How an extended-protocol unit (messages up to a Sync) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnitMode {
    Plain,
    /// The node failed a message of the unit before the proxy's Sync:
    /// PostgreSQL would skip the rest up to the client's Sync, so do we.
    Discard,
    /// In a transaction the proxy opened: the proxy commits it at the Sync.
    Wrapped,
    /// Contains the COMMIT of a transaction that wrote: the proxy runs the
    /// two-phase commit in its place.
    CommitInside,
}

/// The extended unit under way.
#[derive(Debug, Clone, Copy)]
struct Unit {
    mode: UnitMode,
    /// Messages of the unit already passed on.
    sent: bool,
    /// How it runs was decided from an Execute it contains.
    decided: bool,
}

/// A unit whose end the proxy finishes itself.
struct Pending {
    rx: oneshot::Receiver<Held>,
    kind: PendingKind,
}

enum PendingKind {
    /// An autocommit unit wrapped in the proxy's transaction.
    Autocommit,
    /// The client's `PREPARE TRANSACTION 'gid'` of a transaction that wrote.
    Prepare(String),
    /// The statements of a `…; COMMIT` Query before its COMMIT: the proxy
    /// commits after them, then runs the rest of the Query if any.
    CommitAfter(Option<String>),
    /// The same with no transaction open before them: they run in one of
    /// the proxy's, as PostgreSQL runs them in an implicit one.
    ImplicitCommitAfter(Option<String>),
    /// The statements of a `…; PREPARE TRANSACTION 'gid'` Query before
    /// it: the proxy prepares and collects the votes after them, then runs
    /// the rest if any.
    PrepareAfter { gid: String, rest: Option<String> },
    /// The statements of a `…; COMMIT AND CHAIN` Query before it: the
    /// proxy commits and chains after them, then runs the rest if any.
    ChainAfter(Option<String>),
    /// The part of a Query through a transaction end the node runs
    /// itself: the rest of the Query follows unless the part failed.
    Then(String),
}

struct Driver<'a, SW, CW> {
    sw: SW,
    link: &'a Link<CW>,
    ctx: &'a PumpCtx<'a>,
    reader: FrameReader,
    /// Bytes for the node, written at the end of a batch or before a wait.
    out: BytesMut,
    /// What each prepared statement / portal (by name) executes. Fx
    /// hashing: the names come from this session's own client, so a
    /// client that picks colliding names slows only itself.
    statements: HashMap<Vec<u8>, Intent>,
    portals: HashMap<Vec<u8>, Intent>,
    /// The extended unit being passed on (no Sync yet).
    unit: Option<Unit>,
    pending: Option<Pending>,
    /// The session timer ([`Self::rearm`]): idle timeout and reload
    /// re-check. One timer for the session's life, reset only when it
    /// fires.
    wake: std::pin::Pin<Box<tokio::time::Sleep>>,
}

enum Input {
    Batch(Batch),
    Held(Held),
    /// The start of a CopyData message too big to buffer, and how many of
    /// its bytes are still to come from the client.
    Stream(BytesMut, usize),
}

impl<SW: AsyncWrite + Unpin, CW: AsyncWrite + Unpin> Driver<'_, SW, CW> {
    async fn run<CR: AsyncRead + Unpin>(&mut self, mut cr: CR) -> End {
        if let Err(end) = self.rearm() {
            return end;
        }
        loop {
            let step = match self.next_input(&mut cr).await {
                Ok(Input::Batch(b)) => self.batch(b).await,
                Ok(Input::Held(h)) => self.finish(h).await,
                Ok(Input::Stream(head, remaining)) => self.stream(head, remaining, &mut cr).await,
                Err(end) => Err(end),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    fn status(&self) -> u8 {
        self.link.status.load(Ordering::Relaxed)
    }

    fn wrote(&self) -> bool {
        self.link.wrote.load(Ordering::Relaxed)
    }

    fn expect(&self, e: Expect) {
        self.link.queue().push_back(e);
    }

    fn expect_hold(&self, hold_complete: bool) -> oneshot::Receiver<Held> {
        let (tx, rx) = oneshot::channel();
        self.expect(Expect::Hold { hold_complete, tx });
        rx
    }

    /// Writes what is queued for the node.
    async fn send(&mut self) -> Result<(), End> {
        if !self.out.is_empty() {
            self.sw.write_all(&self.out).await.map_err(|_| End::ServerIo)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Waits until the node has answered everything sent, so the
    /// transaction status and `wrote` are exact.
    async fn drain(&mut self) -> Result<(), End> {
        self.send().await?;
        loop {
            let progressed = self.link.progressed.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            if self.link.queue().is_empty() {
                return Ok(());
            }
            progressed.await;
        }
    }

    /// Runs the proxy's own statements (pipelined) and returns the answers.
    async fn own(&mut self, sqls: &[&str]) -> Result<Vec<Vec<Reply>>, End> {
        let mut rxs = Vec::with_capacity(sqls.len());
        for sql in sqls {
            let (tx, rx) = oneshot::channel();
            self.expect(Expect::Capture(tx));
            self.out.extend_from_slice(&commit::own_unit(sql));
            rxs.push(rx);
        }
        self.send().await?;
        let mut answers = Vec::with_capacity(rxs.len());
        for rx in rxs {
            answers.push(rx.await.map_err(|_| End::ServerClosed)?);
        }
        Ok(answers)
    }

    /// The next client batch, or the held end of a pending unit, whichever
    /// comes first; closes an idle session after `client_idle_timeout`.
    async fn next_input<CR: AsyncRead + Unpin>(&mut self, cr: &mut CR) -> Result<Input, End> {
        loop {
            let read = self.reader.next_read(cr);
            // Biased (no random branch order drawn on every read): the
            // pending unit's end, then the timer, so that a client that
            // always has data ready still meets it, then the client.
            let result = match &mut self.pending {
                Some(p) => tokio::select! {
                    biased;
                    held = &mut p.rx => return Ok(Input::Held(held.unwrap_or_default())),
                    () = self.wake.as_mut() => None,
                    r = read => Some(r),
                },
                None => tokio::select! {
                    biased;
                    () = self.wake.as_mut() => None,
                    r = read => Some(r),
                },
            };
            match result {
                None => self.rearm()?,
                Some(Ok(Some(Read::Batch(b)))) => return Ok(Input::Batch(b)),
                Some(Ok(Some(Read::Stream { head, remaining }))) => return Ok(Input::Stream(head, remaining)),
                Some(Ok(None)) => return Err(End::ClientClosed),
                Some(Err(FrameIoError::Frame(e))) => return Err(End::ClientProtocol(e)),
                Some(Err(FrameIoError::Io(_))) => return Err(End::ClientIo),
            }
        }
    }

    /// At the session timer: takes the configuration again (so RELOAD
    /// reaches open sessions within [`RECHECK`]), ends a session idle for
    /// `client_idle_timeout`, and sets the timer's next deadline. Only the
    /// timer looks at the clock and the configuration, not every read: a
    /// session that becomes idle is closed exactly when its idle time is
    /// up, because the timer never sleeps past that moment (at most
    /// `min(timeout, RECHECK)` while busy, then to the exact end).
    fn rearm(&mut self) -> Result<(), End> {
        let limit = {
            let live = self.ctx.shared.live.load();
            self.reader.set_max_message_size(live.config.limits.max_message_size);
            live.config.limits.client_idle_timeout
        };
        let wait = match self.ctx.tracker.idle_since() {
            Some(since) if !limit.is_zero() => limit.saturating_sub(since.elapsed()),
            _ if !limit.is_zero() => limit.min(RECHECK),
            _ => RECHECK,
        };
        if !limit.is_zero() && wait.is_zero() && self.pending.is_none() {
            return Err(End::IdleTimeout);
        }
        let wait = wait.clamp(Duration::from_millis(1), RECHECK);
        self.wake.as_mut().reset(tokio::time::Instant::now() + wait);
        Ok(())
    }

    /// A message too big to buffer (`net::frame::Read::Stream`): decided
    /// on from its start, then passed to the node as it arrives, through a
    /// fixed buffer. CopyData belongs to the running COPY, so it does not
    /// wait for a pending unit; a Query, Parse, Bind or FunctionCall starts
    /// or continues a unit like a whole one ([`Self::large_query`],
    /// [`Self::extended`], [`Self::function_call`]).
    async fn stream<CR: AsyncRead + Unpin>(&mut self, head: BytesMut, mut remaining: usize, cr: &mut CR) -> Result<(), End> {
        let total = (head.len() + remaining) as u64;
        self.ctx.bytes_in.increment(total);
        self.ctx.shared.totals.bytes_in.fetch_add(total, Ordering::Relaxed);
        let tag = head[0];
        if tag != b'd' {
            self.finish_pending().await?;
        }
        let forward = match tag {
            b'd' => {
                self.out.extend_from_slice(&head);
                true
            }
            b'Q' => {
                self.large_query(&head).await?;
                true
            }
            b'F' => {
                self.function_call(&head).await;
                true
            }
            _ => {
                let batch = Batch { frames: vec![FrameRef { tag, start: 0, len: head.len() }], bytes: head };
                self.extended(&batch, 0, false).await?;
                // A unit the node already failed skips the message, as
                // PostgreSQL would.
                self.unit.map(|u| u.mode) != Some(UnitMode::Discard)
            }
        };
        self.send().await?;
        let mut buf = vec![0u8; 64 * 1024];
        while remaining > 0 {
            let want = remaining.min(buf.len());
            let n = cr.read(&mut buf[..want]).await.map_err(|_| End::ClientIo)?;
            if n == 0 {
                // The node sees its connection end inside the message.
                return Err(End::ClientIo);
            }
            if forward {
                self.sw.write_all(&buf[..n]).await.map_err(|_| End::ServerIo)?;
            }
            remaining -= n;
        }
        Ok(())
    }

    /// A FunctionCall (whole, or the start of one streamed after it):
    /// passed on as it is, a unit of its own.
    async fn function_call(&mut self, raw: &[u8]) {
        self.ctx.tracker.before_send(1).await;
        self.expect(Expect::Forward);
        self.out.extend_from_slice(raw);
    }

    /// A new unit waits until the pending one is finished.
    async fn finish_pending(&mut self) -> Result<(), End> {
        if self.pending.is_some() {
            self.send().await?;
            let held = match self.pending.as_mut() {
                Some(p) => (&mut p.rx).await.unwrap_or_default(),
                None => Held::default(),
            };
            self.finish(held).await?;
        }
        Ok(())
    }

    /// Sends the Query `raw` (whole, or the start of one streamed after
    /// it) in a transaction of the proxy's: the proxy finishes it when the
    /// node's ReadyForQuery comes back ([`Self::finish`]).
    fn wrap_autocommit(&mut self, raw: &[u8]) {
        self.begin_own_transaction();
        self.send_pending(raw, true, PendingKind::Autocommit);
    }

    /// Opens a transaction of the proxy's in front of the next unit (its
    /// answer is not the client's).
    fn begin_own_transaction(&mut self) {
        self.out.extend_from_slice(&commit::own_statement("BEGIN"));
        self.expect(Expect::Skip(commit::OWN_STATEMENT_REPLIES));
    }

    /// Sends `raw` as a unit the proxy ends itself ([`Self::finish`], as
    /// `kind` says) once the node's ReadyForQuery comes back.
    fn send_pending(&mut self, raw: &[u8], hold_complete: bool, kind: PendingKind) {
        let rx = self.expect_hold(hold_complete);
        self.out.extend_from_slice(raw);
        self.pending = Some(Pending { rx, kind });
    }

    /// A simple-protocol Query too big to buffer, decided on from its
    /// start (`head`, at least `net::frame::STREAM_HEAD` bytes). Whether it
    /// writes cannot be told from a part, so it runs as if it may: in a
    /// transaction of the proxy's when none is open, committed by the
    /// cluster's commit if it wrote. One that starts with transaction
    /// control is passed on as it is; a COMMIT further inside a string
    /// that big is not seen, and the node refuses it if the transaction
    /// wrote (SQLSTATE 0A000, nothing committed).
    async fn large_query(&mut self, head: &[u8]) -> Result<(), End> {
        let text = text_prefix(&head[5..]);
        self.start_query(text).await;
        if head_intent(text) == Intent::Write {
            self.drain().await?;
            if self.status() == b'I' {
                self.wrap_autocommit(head);
                return Ok(());
            }
        }
        self.expect(Expect::Forward);
        self.out.extend_from_slice(head);
        Ok(())
    }

    async fn batch(&mut self, batch: Batch) -> Result<(), End> {
        self.ctx.bytes_in.increment(batch.bytes.len() as u64);
        self.ctx.shared.totals.bytes_in.fetch_add(batch.bytes.len() as u64, Ordering::Relaxed);
        for (i, f) in batch.frames.iter().enumerate() {
            let raw = &batch.bytes[f.start..f.start + f.len];
            let body = batch.body(f);
            // COPY data belongs to the running unit; anything else starts
            // a new one, which must wait until the pending one is finished.
            if !matches!(f.tag, b'd' | b'c' | b'f') {
                self.finish_pending().await?;
            }
            match f.tag {
                b'Q' => self.query(raw, body).await?,
                b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => self.extended(&batch, i, true).await?,
                b'S' => self.sync(raw).await?,
                b'F' => self.function_call(raw).await,
                b'X' => {
                    self.out.extend_from_slice(raw);
                    self.send().await?;
                    return Err(End::ClientTerminated);
                }
                _ => self.out.extend_from_slice(raw),
            }
        }
        self.send().await
    }

    fn count_statement(&self, sql: &str, executes: bool) {
        let class = self.ctx.shared.live.load().classifier.classify(sql);
        self.ctx.queries_by_class[class as usize].increment(1);
        self.ctx.shared.totals.by_class[class as usize].fetch_add(1, Ordering::Relaxed);
        if executes {
            self.count_query();
        }
    }

    fn count_query(&self) {
        self.ctx.tracker.info.queries.fetch_add(1, Ordering::Relaxed);
        self.ctx.shared.totals.queries.fetch_add(1, Ordering::Relaxed);
    }

    /// What every simple-protocol Query does first, whole or streamed:
    /// count it, pass the pause gate, and forget the unnamed statement and
    /// portal, which a Query replaces.
    async fn start_query(&mut self, sql: &str) {
        self.count_statement(sql, true);
        self.ctx.tracker.before_send(1).await;
        self.statements.remove(&b""[..]);
        self.portals.remove(&b""[..]);
    }

    /// A simple-protocol Query.
    async fn query(&mut self, raw: &[u8], body: &[u8]) -> Result<(), End> {
        let sql = query_text(body).map_err(End::ClientProtocol)?;
        self.start_query(sql).await;
        self.query_string(raw, sql).await
    }

    /// The SQL of a Query (`raw`, the whole message): run part by part
    /// when a COMMIT or ROLLBACK inside it ends a transaction that more
    /// statements follow.
    async fn query_string(&mut self, raw: &[u8], sql: &str) -> Result<(), End> {
        match crate::classify::split_after_transaction_end(sql) {
            Some((first, rest)) => self.query_part(&own_query(first), first, Some(rest.to_string())).await,
            None => self.query_part(raw, sql, None).await,
        }
    }

    /// A Query, or the part of one through its first transaction end
    /// when `rest` follows it: the rest is run once this part has ended
    /// without an error ([`Self::then`]), as PostgreSQL runs the rest of
    /// a string.
    async fn query_part(&mut self, raw: &[u8], sql: &str, rest: Option<String>) -> Result<(), End> {
        if let Some(head) = crate::classify::strip_trailing_commit(sql) {
            // `…; COMMIT` in one string: run what comes before the COMMIT,
            // then commit as for a COMMIT of its own.
            self.drain().await?;
            if self.status() == b'T' || crate::classify::opens_transaction_anywhere(head) {
                self.send_pending(&own_query(head), false, PendingKind::CommitAfter(rest));
                return Ok(());
            }
            if self.status() == b'I' {
                // No transaction open: PostgreSQL runs the statements in
                // an implicit one, which the COMMIT commits with a warning.
                self.begin_own_transaction();
                self.send_pending(&own_query(head), false, PendingKind::ImplicitCommitAfter(rest));
                return Ok(());
            }
        }
        if let Some(head) = crate::classify::strip_trailing_commit_and_chain(sql) {
            // `…; COMMIT AND CHAIN` in one string (or the part of one
            // through it): the cluster's commit, then the chain, as for
            // one of its own.
            self.drain().await?;
            if !head.is_empty() && (self.status() == b'T' || crate::classify::opens_transaction_anywhere(head)) {
                self.send_pending(&own_query(head), false, PendingKind::ChainAfter(rest));
                return Ok(());
            }
            if head.is_empty() && rest.is_some() && self.status() == b'T' {
                return self.chain_then(rest).await;
            }
        }
        if let Some((head, gid)) = crate::classify::strip_trailing_prepare(sql) {
            // `…; PREPARE TRANSACTION 'gid'` in one string: the client's
            // own two-phase commit, voted on as for a statement of its own.
            self.drain().await?;
            if self.status() == b'T' || crate::classify::opens_transaction_anywhere(head) {
                self.send_pending(&own_query(head), false, PendingKind::PrepareAfter { gid, rest });
                return Ok(());
            }
        }
        if let Some(rest) = rest {
            if crate::classify::is_plain_commit(sql) {
                self.drain().await?;
                if self.status() == b'T' {
                    return self.commit_then(BytesMut::new(), Some(rest)).await;
                }
            }
            if let Some(gid) = crate::classify::prepared_gid(sql) {
                self.drain().await?;
                if self.status() == b'T' {
                    return self.prepare_then(gid, Some(rest)).await;
                }
            }
            // Ends with a ROLLBACK, or a COMMIT with no transaction open
            // or in a failed one: the node ends it as PostgreSQL does.
            self.send_pending(raw, false, PendingKind::Then(rest));
            return Ok(());
        }
        match intent(sql) {
            Intent::Write => {
                self.drain().await?;
                if self.status() == b'I' {
                    self.wrap_autocommit(raw);
                    return Ok(());
                }
            }
            Intent::Commit => {
                self.drain().await?;
                if self.status() == b'T' && self.wrote() {
                    let reply = self.commit_open_reply(messages::command_complete("COMMIT")).await?;
                    return self.answer(reply, b'I').await;
                }
            }
            Intent::CommitAndChain => {
                self.drain().await?;
                if self.status() == b'T' && self.wrote() {
                    return self.commit_and_chain().await;
                }
            }
            Intent::PrepareTransaction(gid) => {
                self.drain().await?;
                if self.status() == b'T' && self.wrote() {
                    self.send_pending(raw, true, PendingKind::Prepare(gid));
                    return Ok(());
                }
            }
            Intent::EveryNode => {
                self.drain().await?;
                if self.status() == b'I' {
                    let (home, side) = (self.ctx.node_id.saturating_sub(1), &self.ctx.side);
                    if let Err(reply) = crate::everywhere::run_on_others(self.ctx.shared, side, home, sql).await {
                        count_error(&crate::net::scan::sqlstate(&reply[5..]).unwrap_or_default());
                        return self.answer(reply, b'I').await;
                    }
                }
            }
            Intent::Read | Intent::TransactionControl => {}
        }
        self.expect(Expect::Forward);
        self.out.extend_from_slice(raw);
        Ok(())
    }

    /// What the statement or portal `name` runs (unknown: may write):
    /// the unit's own definitions (`overlay`, latest last) first.
    fn resolve(map: &HashMap<Vec<u8>, Intent>, overlay: &[(&[u8], Intent)], name: &[u8]) -> Intent {
        match overlay.iter().rev().find(|(n, _)| *n == name) {
            Some((_, it)) => it.clone(),
            None => map.get(name).cloned().unwrap_or(Intent::Write),
        }
    }

    /// The intents of the Executes in the unit starting at frame `i`.
    /// A unit names a few statements and portals at most: the ones it
    /// defines are kept in small lists, not maps.
    fn look_ahead(&self, batch: &Batch, i: usize) -> Result<Vec<Intent>, End> {
        let mut statements: Vec<(&[u8], Intent)> = Vec::new();
        let mut portals: Vec<(&[u8], Intent)> = Vec::new();
        let mut executes = Vec::new();
        for f in &batch.frames[i..] {
            let body = batch.body(f);
            match f.tag {
                b'S' => break,
                b'P' => {
                    let (name, sql) = parse_message(body)?;
                    statements.push((name, intent(sql)));
                }
                b'B' => {
                    let (portal, statement) = bind_names(body)?;
                    let it = Self::resolve(&self.statements, &statements, statement);
                    portals.push((portal, it));
                }
                b'E' => {
                    let portal = BodyReader::new(body).cstr().map_err(End::ClientProtocol)?;
                    executes.push(Self::resolve(&self.portals, &portals, portal.as_bytes()));
                }
                _ => {}
            }
        }
        Ok(executes)
    }

    /// An extended-protocol message other than Sync. Not `whole`: only the
    /// start of a Parse or Bind too big to buffer (see [`Self::stream`]),
    /// the only message of `batch`.
    async fn extended(&mut self, batch: &Batch, i: usize, whole: bool) -> Result<(), End> {
        let f = batch.frames[i];
        let raw = &batch.bytes[f.start..f.start + f.len];
        let body = batch.body(&f);
        let mut unit = match self.unit {
            Some(u) => u,
            None => {
                self.ctx.tracker.before_send(0).await;
                Unit { mode: UnitMode::Plain, sent: false, decided: false }
            }
        };
        if unit.mode == UnitMode::Discard {
            return Ok(());
        }
        if !unit.decided && matches!(f.tag, b'B' | b'E') {
            let executes = if whole {
                self.look_ahead(batch, i)?
            } else {
                // The Execute is yet to come: decide on the statement the
                // big Bind binds, before it goes out (a portal bound
                // before the proxy's BEGIN would not survive it).
                let (_, statement) = bind_names(body)?;
                vec![Self::resolve(&self.statements, &[], statement)]
            };
            let commit = executes.contains(&Intent::Commit);
            let control = executes.iter().any(|x| matches!(x, Intent::TransactionControl | Intent::CommitAndChain | Intent::PrepareTransaction(_)));
            let write = executes.contains(&Intent::Write) && !control;
            if commit || write {
                unit.decided = true;
                // The exact state first: wait for the answers so far — with
                // a Sync of the proxy's if part of this unit is already on
                // its way (harmless: nothing of it has executed yet).
                if unit.sent {
                    let rx = self.expect_hold(false);
                    self.out.extend_from_slice(&commit::sync());
                    self.send().await?;
                    if rx.await.unwrap_or_default().error {
                        unit.mode = UnitMode::Discard;
                        self.unit = Some(unit);
                        return Ok(());
                    }
                } else {
                    self.drain().await?;
                }
                if commit && self.status() == b'T' && self.wrote() {
                    unit.mode = UnitMode::CommitInside;
                } else if write && !commit && self.status() == b'I' {
                    self.begin_own_transaction();
                    unit.mode = UnitMode::Wrapped;
                }
            } else if !executes.is_empty() {
                unit.decided = true;
            }
        }
        unit.sent = true;
        self.unit = Some(unit);
        match f.tag {
            b'P' if whole => {
                let (name, sql) = parse_message(body)?;
                self.count_statement(sql, false);
                self.statements.insert(name.to_vec(), intent(sql));
            }
            b'P' => {
                // Only its start is here: see [`head_intent`].
                let mut r = BodyReader::new(body);
                let name = r.cstr().map_err(End::ClientProtocol)?.as_bytes().to_vec();
                let text = text_prefix(&body[name.len() + 1..]);
                self.count_statement(text, false);
                self.statements.insert(name, head_intent(text));
            }
            b'B' => {
                let (portal, statement) = bind_names(body)?;
                let it = Self::resolve(&self.statements, &[], statement);
                match self.portals.get_mut(portal) {
                    Some(slot) => *slot = it,
                    None => {
                        self.portals.insert(portal.to_vec(), it);
                    }
                }
            }
            b'C' => {
                let mut r = BodyReader::new(body);
                let kind = r.bytes(1).map_err(End::ClientProtocol)?[0];
                let name = r.cstr().map_err(End::ClientProtocol)?.as_bytes().to_vec();
                if kind == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
            }
            b'E' => {
                self.count_query();
                let portal = BodyReader::new(body).cstr().map_err(End::ClientProtocol)?.as_bytes().to_vec();
                if unit.mode == UnitMode::CommitInside && self.portals.get(&portal) == Some(&Intent::Commit) {
                    unit.mode = UnitMode::Plain;
                    self.unit = Some(unit);
                    if self.commit_in_place().await? {
                        return Ok(());
                    }
                }
                match self.portals.get(&portal).cloned() {
                    Some(Intent::PrepareTransaction(gid)) => {
                        self.unit = Some(unit);
                        if self.prepare_in_place(&gid).await? {
                            return Ok(());
                        }
                    }
                    Some(Intent::CommitAndChain) => {
                        self.unit = Some(unit);
                        if self.chain_in_place().await? {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        self.out.extend_from_slice(raw);
        Ok(())
    }

    /// Inside an extended unit, before an Execute the proxy may answer
    /// itself: learn the exact state with a Sync of the proxy's (harmless
    /// inside a transaction block). Whether a transaction block is open
    /// and wrote.
    async fn block_wrote(&mut self) -> Result<bool, End> {
        let rx = self.expect_hold(false);
        self.out.extend_from_slice(&commit::sync());
        self.send().await?;
        let held = rx.await.unwrap_or_default();
        Ok(held.status == b'T' && self.wrote())
    }

    /// At the Execute of a COMMIT inside an extended unit: if the
    /// transaction wrote ([`Self::block_wrote`]), run the two-phase commit
    /// and answer the Execute ourselves. Returns whether it did.
    async fn commit_in_place(&mut self) -> Result<bool, End> {
        if !self.block_wrote().await? {
            return Ok(false);
        }
        let reply = match self.two_phase().await? {
            Ok(()) => messages::command_complete("COMMIT"),
            Err(e) => e.into_bytes(),
        };
        self.link.to_client(&reply).await?;
        Ok(true)
    }

    /// At the Execute of the client's `PREPARE TRANSACTION 'gid'` inside
    /// an extended unit (as JDBC's XA support sends it): if the open
    /// transaction wrote, prepare it with a statement of the proxy's,
    /// collect every peer's vote as for the simple protocol, and answer the
    /// Execute ourselves — PREPARE TRANSACTION, or 40001 with the gid
    /// rolled back everywhere. Returns whether it did.
    async fn prepare_in_place(&mut self, gid: &str) -> Result<bool, End> {
        if !self.block_wrote().await? {
            return Ok(false);
        }
        let prepare = format!("PREPARE TRANSACTION {}", commit::literal(gid));
        let prepared = self.own(&[&prepare]).await?.remove(0);
        let reply = match commit::error_of(&prepared) {
            Some(e) => e.raw.clone(),
            None => self.voted_reply(gid, messages::command_complete("PREPARE TRANSACTION")).await?,
        };
        self.link.to_client(&reply).await?;
        Ok(true)
    }

    /// At the Execute of `COMMIT AND CHAIN` inside an extended unit: if
    /// the open transaction wrote, the cluster's commit and the chained
    /// transaction, as in the simple protocol, answering the Execute
    /// ourselves (the client's Sync then reports the chained block).
    /// Returns whether it did.
    async fn chain_in_place(&mut self) -> Result<bool, End> {
        if !self.block_wrote().await? {
            return Ok(false);
        }
        let (reply, _status) = self.chain().await?;
        self.link.to_client(&reply).await?;
        Ok(true)
    }

    async fn sync(&mut self, raw: &[u8]) -> Result<(), End> {
        self.ctx.tracker.before_send(1).await;
        if self.unit.take().map(|u| u.mode) == Some(UnitMode::Wrapped) {
            self.send_pending(raw, false, PendingKind::Autocommit);
        } else {
            self.expect(Expect::Forward);
            self.out.extend_from_slice(raw);
        }
        Ok(())
    }

    /// The pending unit has ended on the node: finish it and give the
    /// client the end it would have had from one PostgreSQL.
    async fn finish(&mut self, held: Held) -> Result<(), End> {
        let Some(pending) = self.pending.take() else { return Ok(()) };
        let Held { status, complete, error } = held;
        let mut reply = BytesMut::new();
        let mut end = status;
        match pending.kind {
            PendingKind::Autocommit => match status {
                b'T' => {
                    end = b'I';
                    let done = complete.unwrap_or_default();
                    reply.extend_from_slice(&self.commit_open_reply(done).await?);
                }
                b'E' => {
                    end = b'I';
                    self.own(&["ROLLBACK"]).await?;
                    reply.extend_from_slice(complete.as_deref().unwrap_or_default());
                }
                _ => reply.extend_from_slice(complete.as_deref().unwrap_or_default()),
            },
            PendingKind::ImplicitCommitAfter(rest) => match status {
                b'T' => {
                    let warning = messages::warning("25P01", "there is no transaction in progress");
                    return self.commit_then(warning, rest).await;
                }
                b'E' => {
                    end = b'I';
                    self.own(&["ROLLBACK"]).await?;
                }
                _ => {}
            },
            PendingKind::CommitAfter(rest) => match status {
                b'T' => return self.commit_then(BytesMut::new(), rest).await,
                // A failed statement: PostgreSQL skips the rest of the
                // string, COMMIT included.
                _ if error => {}
                b'E' => {}
                // The statements ended the transaction themselves.
                _ => {
                    let done = messages::command_complete("COMMIT");
                    if let Some(rest) = rest {
                        return self.then(done, rest).await;
                    }
                    reply.extend_from_slice(&done);
                }
            },
            PendingKind::PrepareAfter { gid, rest } if status == b'T' && !error => return self.prepare_then(gid, rest).await,
            PendingKind::PrepareAfter { .. } => {}
            PendingKind::ChainAfter(rest) if status == b'T' && !error => return self.chain_then(rest).await,
            PendingKind::ChainAfter(_) => {}
            PendingKind::Then(rest) if !error => return self.then(BytesMut::new(), rest).await,
            PendingKind::Then(_) => {}
            PendingKind::Prepare(gid) => match (status, complete) {
                (b'I', Some(done)) => reply.extend_from_slice(&self.voted_reply(&gid, done).await?),
                (_, other) => reply.extend_from_slice(other.as_deref().unwrap_or_default()),
            },
        }
        self.answer(reply, end).await
    }

    /// Commits the open transaction for a COMMIT inside a Query; if it
    /// committed, the client hears `notice` and COMMIT and the `rest` of
    /// the Query runs, else it gets the error and the rest is skipped.
    async fn commit_then(&mut self, notice: BytesMut, rest: Option<String>) -> Result<(), End> {
        let mut done = notice;
        done.extend_from_slice(&messages::command_complete("COMMIT"));
        match (self.commit_open().await?, rest) {
            (Ok(()), Some(rest)) => self.then(done, rest).await,
            (Ok(()), None) => self.answer(done, b'I').await,
            (Err(e), _) => self.answer(e.into_bytes(), b'I').await,
        }
    }

    /// The client's `PREPARE TRANSACTION 'gid'` inside a Query: prepared
    /// here with a statement of the proxy's, then voted on if it wrote;
    /// the `rest` of the Query runs once it is prepared everywhere.
    async fn prepare_then(&mut self, gid: String, rest: Option<String>) -> Result<(), End> {
        let wrote = self.wrote();
        let prepared = self.own(&[&format!("PREPARE TRANSACTION {}", commit::literal(&gid))]).await?.remove(0);
        if let Some(e) = commit::error_of(&prepared) {
            let status = self.status();
            return self.answer(e.raw.clone(), status).await;
        }
        let done = messages::command_complete("PREPARE TRANSACTION");
        if wrote {
            if let Err(e) = self.collect_votes(&gid).await? {
                count_error(e.code);
                return self.answer(e.encode(), b'I').await;
            }
        }
        match rest {
            Some(rest) => self.then(done, rest).await,
            None => self.answer(done, b'I').await,
        }
    }

    /// COMMIT AND CHAIN of the open transaction inside a Query (the
    /// cluster's commit if it wrote, else the node's own), then the
    /// `rest` of the Query in the chained transaction.
    async fn chain_then(&mut self, rest: Option<String>) -> Result<(), End> {
        let (reply, status) = if self.wrote() {
            self.chain().await?
        } else {
            let answer = self.own(&["COMMIT AND CHAIN"]).await?.remove(0);
            match commit::error_of(&answer) {
                None => (messages::command_complete("COMMIT"), self.status()),
                Some(e) => (e.raw.clone(), self.status()),
            }
        };
        match rest {
            Some(rest) if status == b'T' => self.then(reply, rest).await,
            _ => self.answer(reply, status).await,
        }
    }

    /// Gives the client `reply` (no ReadyForQuery: the Query goes on) and
    /// runs `rest`, the statements of the Query after a part that ended.
    async fn then(&mut self, reply: BytesMut, rest: String) -> Result<(), End> {
        if !reply.is_empty() {
            self.link.to_client(&reply).await?;
        }
        let raw = own_query(&rest);
        Box::pin(self.query_string(&raw, &rest)).await?;
        self.send().await
    }

    /// Sends the proxy's answer to a unit it finished itself, with the
    /// ReadyForQuery of transaction status `status`.
    async fn answer(&self, mut reply: BytesMut, status: u8) -> Result<(), End> {
        reply.extend_from_slice(&messages::ready_for_query(status));
        self.link.to_client(&reply).await?;
        self.ctx.tracker.on_ready(status);
        Ok(())
    }

    /// Commits the open transaction: with the cluster's two-phase commit
    /// if it wrote, else with a plain COMMIT of the proxy's.
    async fn commit_open(&mut self) -> Result<Result<(), Raw>, End> {
        if self.wrote() {
            return self.two_phase().await;
        }
        let answer = self.own(&["COMMIT"]).await?.remove(0);
        Ok(match commit::error_of(&answer) {
            Some(e) => Err(Raw(e.raw.clone())),
            None => Ok(()),
        })
    }

    /// Commits the open transaction; the client's reply is `done` if it
    /// committed, else the error.
    async fn commit_open_reply(&mut self, done: BytesMut) -> Result<BytesMut, End> {
        Ok(match self.commit_open().await? {
            Ok(()) => done,
            Err(e) => e.into_bytes(),
        })
    }

    /// COMMIT AND CHAIN of a transaction that wrote: the cluster's commit,
    /// then a new transaction with the same isolation level, read-only
    /// and deferrable settings, as PostgreSQL's chain starts.
    async fn commit_and_chain(&mut self) -> Result<(), End> {
        let (reply, status) = self.chain().await?;
        self.answer(reply, status).await
    }

    /// The cluster's commit of the open transaction, then its chained
    /// successor: the reply for the client and the transaction status
    /// after it.
    async fn chain(&mut self) -> Result<(BytesMut, u8), End> {
        let settings = self
            .own(&["SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'), current_setting('transaction_deferrable')"])
            .await?
            .remove(0);
        let row = commit::first_row(&settings).unwrap_or_default();
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let begin = commit::chained_begin(&get(0), &get(1), &get(2));
        let (reply, status) = match self.two_phase().await? {
            Ok(()) => {
                let started = self.own(&[&begin]).await?.remove(0);
                match commit::error_of(&started) {
                    None => (messages::command_complete("COMMIT"), b'T'),
                    // Committed, but the chain could not start: say so.
                    Some(e) => (e.raw.clone(), b'I'),
                }
            }
            Err(e) => (e.into_bytes(), b'I'),
        };
        Ok((reply, status))
    }

    /// The client's reply to its own PREPARE TRANSACTION of `gid`
    /// (prepared here): `done` once every peer voted yes, else the
    /// refusal (the gid rolled back everywhere).
    async fn voted_reply(&mut self, gid: &str, done: BytesMut) -> Result<BytesMut, End> {
        Ok(match self.collect_votes(gid).await? {
            Ok(()) => done,
            Err(e) => {
                count_error(e.code);
                e.encode()
            }
        })
    }

    /// Waits for the peers' votes on `gid` (prepared here); a refusal
    /// rolls it back everywhere.
    async fn collect_votes(&mut self, gid: &str) -> Result<Result<(), PgError>, End> {
        let timeout = self.ctx.shared.live.load().config.commit.vote_timeout;
        let answer = self.own(&[&commit::await_votes_sql(gid, timeout)]).await?.remove(0);
        match commit::read_votes(gid, &answer) {
            Votes::AllYes => Ok(Ok(())),
            Votes::Refused(e) => Ok(Err(self.roll_back_prepared(gid).await?.unwrap_or(e))),
            Votes::Undecided(e) => Ok(Err(e)),
        }
    }

    /// ROLLBACK PREPARED of a refused `gid`; the node's rollback reaches
    /// the peers. A failure is logged: the home node's resolver finishes
    /// the gid once this session is gone. Some(error) when the node
    /// refused because it had promised to commit the gid (the wait for the
    /// promises was cancelled): the outcome is not known, and the client
    /// gets that error instead.
    async fn roll_back_prepared(&mut self, gid: &str) -> Result<Option<PgError>, End> {
        let rollback = format!("ROLLBACK PREPARED {}", commit::literal(gid));
        let undone = self.own(&[&rollback]).await?.remove(0);
        let Some(err) = commit::error_of(&undone) else { return Ok(None) };
        let field = |f| crate::net::scan::error_field(err.body(), f).unwrap_or_default();
        tracing::warn!(gid, "rollback of a refused transaction failed: {}", field(b'M'));
        Ok((field(b'C') == "40003").then(|| PgError::error("40003", field(b'M')).with_hint(field(b'H'))))
    }

    /// The cluster's two-phase commit of the open transaction (module
    /// [`crate::commit`]). `Err(End)`: the session broke; `Ok(Err(e))`:
    /// the transaction did not commit and the client gets `e`.
    async fn two_phase(&mut self) -> Result<Result<(), Raw>, End> {
        // A paused cluster (e.g. a generation switch) takes no commits.
        let _pass = self.ctx.tracker.before_commit().await;
        let started = Instant::now();
        let gid = commit::new_gid(self.ctx.node_id, self.ctx.tracker.info.id);
        let (timeout, visible_everywhere) = {
            let live = self.ctx.shared.live.load();
            (live.config.commit.vote_timeout, live.config.commit.visible_everywhere)
        };
        let prepare = format!("PREPARE TRANSACTION {}", commit::literal(&gid));
        let mut answers = self.own(&[&prepare, &commit::await_votes_sql(&gid, timeout)]).await?;
        let votes = answers.pop().unwrap_or_default();
        let prepared = answers.pop().unwrap_or_default();
        let outcome = if let Some(e) = commit::error_of(&prepared) {
            // Not prepared (e.g. temporary objects): nothing to undo.
            Err(Raw(e.raw.clone()))
        } else {
            match commit::read_votes(&gid, &votes) {
                Votes::AllYes => {
                    let commit_prepared = format!("COMMIT PREPARED {}", commit::literal(&gid));
                    let await_commits = commit::await_commits_sql(&gid, timeout);
                    // One write: the wait runs right after the commit.
                    let mut sqls = vec![commit_prepared.as_str()];
                    if visible_everywhere {
                        sqls.push(&await_commits);
                    }
                    let mut answers = self.own(&sqls).await?;
                    let done = answers.remove(0);
                    match commit::error_of(&done) {
                        None => {
                            if let Some(waited) = answers.first() {
                                if commit::first_row(waited).and_then(|r| r.into_iter().next().flatten()).as_deref() != Some("t") {
                                    tracing::warn!(%gid, "committed, but not every node confirmed its commit within {timeout:?}");
                                    metrics::counter!("mtm_proxy_commits_unconfirmed_total").increment(1);
                                }
                            }
                            Ok(())
                        }
                        Some(_) => Err(Raw::from(commit::commit_unknown(&gid, &done))),
                    }
                }
                Votes::Refused(e) => Err(Raw::from(self.roll_back_prepared(&gid).await?.unwrap_or(e))),
                // Not ours to roll back: a majority may have promised it.
                Votes::Undecided(e) => Err(Raw::from(e)),
            }
        };
        let label = if outcome.is_ok() { "committed" } else { "aborted" };
        metrics::counter!("mtm_proxy_commits_total", "outcome" => label).increment(1);
        metrics::histogram!("mtm_proxy_commit_duration_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &outcome {
            count_error(&e.sqlstate());
        }
        Ok(outcome)
    }
}

/// A simple-protocol Query message of `sql`.
fn own_query(sql: &str) -> BytesMut {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    crate::net::frame::frame(b'Q', &body)
}

/// An ErrorResponse for the client, as bytes.
struct Raw(BytesMut);

impl From<PgError> for Raw {
    fn from(e: PgError) -> Self {
        Raw(e.encode())
    }
}

impl Raw {
    fn into_bytes(self) -> BytesMut {
        self.0
    }

    fn sqlstate(&self) -> String {
        crate::net::scan::sqlstate(&self.0[5..]).unwrap_or_else(|| "XX000".into())
    }
}

/// (statement name, SQL) of a Parse body.
fn parse_message(body: &[u8]) -> Result<(&[u8], &str), End> {
    let mut r = BodyReader::new(body);
    let name = r.cstr().map_err(End::ClientProtocol)?;
    let sql = parse_text(body).map_err(End::ClientProtocol)?;
    Ok((name.as_bytes(), sql))
}

/// The text at the start of a message cut short (`bytes` may end inside
/// the string or even inside a UTF-8 sequence): up to its terminator or
/// the last whole character.
fn text_prefix(bytes: &[u8]) -> &str {
    let bytes = bytes.iter().position(|&b| b == 0).map_or(bytes, |n| &bytes[..n]);
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// What SQL known only by its start may do: transaction control if it
/// starts with it, else it may write (the part not seen yet may).
fn head_intent(text: &str) -> Intent {
    match crate::classify::first_keyword(text).as_deref() {
        Some("BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE" | "PREPARE") => {
            Intent::TransactionControl
        }
        _ => Intent::Write,
    }
}

/// (portal, statement) of a Bind body.
fn bind_names(body: &[u8]) -> Result<(&[u8], &[u8]), End> {
    let mut r = BodyReader::new(body);
    let portal = r.cstr().map_err(End::ClientProtocol)?;
    let statement = r.cstr().map_err(End::ClientProtocol)?;
    Ok((portal.as_bytes(), statement.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::frame;

    #[test]
    fn splitter_cuts_whole_messages_and_streams_large_ones() {
        let mut s = Splitter::default();
        s.buf.extend_from_slice(&frame(b'Z', b"I"));
        s.buf.extend_from_slice(&frame(b'C', b"SEL")[..4]);
        assert_eq!(s.next(), Ok(Some(Piece::Whole(0..6))));
        assert_eq!(s.next(), Ok(None));
        s.consume();
        assert_eq!(&s.buf[..], &frame(b'C', b"SEL")[..4], "the incomplete message stays for the next read");
        let mut s = Splitter::default();
        let big = frame(b'D', &vec![7u8; WHOLE_MESSAGE_LIMIT + 10]);
        s.buf.extend_from_slice(&big[..1000]);
        assert_eq!(s.next(), Ok(Some(Piece::Through(0..1000))));
        s.consume();
        s.buf.extend_from_slice(&big[1000..]);
        s.buf.extend_from_slice(&frame(b'Z', b"T"));
        assert_eq!(s.next(), Ok(Some(Piece::Through(0..big.len() - 1000))));
        assert_eq!(s.next(), Ok(Some(Piece::Whole(big.len() - 1000..big.len() - 1000 + 6))));
        let mut s = Splitter::default();
        s.buf.extend_from_slice(&[b'Z', 0, 0, 0, 2]);
        assert!(s.next().is_err());
    }

    #[test]
    fn reads_the_xact_writes_report() {
        let on = messages::parameter_status(XACT_WRITES, "on");
        let off = messages::parameter_status(XACT_WRITES, "off");
        let other = messages::parameter_status("TimeZone", "UTC");
        assert_eq!(xact_writes_report(&on[5..]), Some(true));
        assert_eq!(xact_writes_report(&off[5..]), Some(false));
        assert_eq!(xact_writes_report(&other[5..]), None);
    }
}
