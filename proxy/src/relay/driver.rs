//! The driver: reads the client, cuts its messages into units, and
//! decides how each runs on the node (as sent, wrapped in a transaction
//! of the proxy's, or ended by the cluster's commit in [`super::two_phase`]).

use super::*;


/// How an extended-protocol unit (messages up to a Sync) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UnitMode {
    Plain,
    /// The node failed a message of the unit before the proxy's Sync:
    /// PostgreSQL would skip the rest up to the client's Sync, so do we.
    Discard,
    /// The same in a unit the proxy wrapped in its own transaction, which
    /// it still ends (rolls back) at the client's Sync.
    DiscardWrapped,
    /// In a transaction the proxy opened: the proxy commits it at the Sync.
    Wrapped,
    /// Contains the COMMIT of a transaction that wrote: the proxy runs the
    /// two-phase commit in its place.
    CommitInside,
}

impl UnitMode {
    /// The mode once a statement of the unit failed: skip the rest up to
    /// the client's Sync, still ending the proxy's own transaction there
    /// if the unit runs in one.
    pub(super) fn discarding(self) -> UnitMode {
        if self == UnitMode::Wrapped {
            UnitMode::DiscardWrapped
        } else {
            UnitMode::Discard
        }
    }
}

/// The extended unit under way.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unit {
    pub(super) mode: UnitMode,
    /// Messages of the unit already passed on.
    pub(super) sent: bool,
    /// An Execute of the unit seen so far may write / is a COMMIT: how the
    /// unit runs was decided for it. A unit may arrive in pieces (a
    /// pipeline sent in several writes), so a piece that brings the first
    /// write or the first COMMIT decides again.
    pub(super) write_seen: bool,
    pub(super) commit_seen: bool,
    /// An Execute of the unit has gone to the node / a BEGIN is among its
    /// Executes so far. A Sync of the proxy's inside the unit would end an
    /// implicit transaction that has run statements (their locks and
    /// portals with it), unless the unit opened a block.
    pub(super) executed: bool,
    pub(super) begins: bool,
    /// The node's loose answers ([`Loose`]) when the unit started, and how
    /// many its messages sent since are owed: all are in once the counts
    /// have moved by that much (or an error came).
    pub(super) base: Loose,
    pub(super) owed: usize,
    /// The last message of the unit so far was an Execute the proxy ran
    /// and answered itself (a COMMIT, PREPARE TRANSACTION or COMMIT AND
    /// CHAIN): nothing of the client's has gone to the node since.
    pub(super) answered_in_place: bool,
    /// While none of the unit's messages has been written to the node:
    /// the driver's write count then ([`Driver::writes`]) and where they
    /// start in [`Driver::out`].
    pub(super) unsent: Option<(u64, usize)>,
    /// The unit's messages so far are Parse and Close only: they wait in
    /// [`Driver::out`] for the rest of the unit ([`Driver::batch`]).
    pub(super) only_parses: bool,
}

impl Unit {
    fn new(base: Loose) -> Unit {
        Unit {
            mode: UnitMode::Plain,
            sent: false,
            write_seen: false,
            commit_seen: false,
            executed: false,
            begins: false,
            base,
            owed: 0,
            answered_in_place: false,
            unsent: None,
            only_parses: true,
        }
    }

    /// What is left of a unit once the proxy has answered its COMMIT,
    /// PREPARE TRANSACTION or COMMIT AND CHAIN itself.
    pub(super) fn after_answer_in_place(base: Loose) -> Unit {
        Unit { answered_in_place: true, ..Unit::new(base) }
    }
}

/// A unit whose end the proxy finishes itself.
pub(super) struct Pending {
    pub(super) rx: oneshot::Receiver<Held>,
    pub(super) kind: PendingKind,
}

pub(super) enum PendingKind {
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

pub(super) struct Driver<'a, SW, CW> {
    pub(super) sw: SW,
    pub(super) link: &'a Link<CW>,
    pub(super) ctx: &'a PumpCtx<'a>,
    pub(super) reader: FrameReader,
    /// Bytes for the node, written at the end of a batch or before a wait.
    pub(super) out: BytesMut,
    /// What each prepared statement / portal (by name) executes. Fx
    /// hashing: the names come from this session's own client, so a
    /// client that picks colliding names slows only itself.
    pub(super) statements: HashMap<Vec<u8>, Intent>,
    pub(super) portals: HashMap<Vec<u8>, Intent>,
    /// How many times [`Self::send`] has written to the node.
    pub(super) writes: u64,
    /// Frames of the batch being handled that [`Self::look_ahead`] has
    /// already seen (their unit decided on): up to this index.
    pub(super) looked_ahead_to: usize,
    /// The tag of the client's last message other than COPY data, and
    /// whether the COPY under way started after its unit's Sync.
    pub(super) last_tag: u8,
    pub(super) copy_after_sync: bool,
    /// The Query under way is not UTF-8 (the client's encoding is not):
    /// its text was read one char per byte, and its parts go back so.
    pub(super) bytewise: bool,
    /// The extended unit being passed on (no Sync yet).
    pub(super) unit: Option<Unit>,
    pub(super) pending: Option<Pending>,
    /// The session timer ([`Self::rearm`]): idle timeout and reload
    /// re-check. One timer for the session's life, reset only when it
    /// fires.
    pub(super) wake: std::pin::Pin<Box<tokio::time::Sleep>>,
}

pub(super) enum Input {
    Batch(Batch),
    Held(Held),
    /// The start of a CopyData message too big to buffer, and how many of
    /// its bytes are still to come from the client.
    Stream(BytesMut, usize),
}

impl<SW: AsyncWrite + Unpin, CW: AsyncWrite + Unpin> Driver<'_, SW, CW> {
    pub(super) async fn run<CR: AsyncRead + Unpin>(&mut self, mut cr: CR) -> End {
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

    pub(super) fn status(&self) -> u8 {
        self.link.status.load(Ordering::Relaxed)
    }

    pub(super) fn wrote(&self) -> bool {
        self.link.wrote.load(Ordering::Relaxed)
    }

    pub(super) fn expect(&self, e: Expect) {
        self.link.queue().push_back(e);
    }

    pub(super) fn expect_hold(&self, hold_complete: bool) -> oneshot::Receiver<Held> {
        let (tx, rx) = oneshot::channel();
        self.expect(Expect::Hold { hold_complete, tx });
        rx
    }

    /// Writes what is queued for the node.
    pub(super) async fn send(&mut self) -> Result<(), End> {
        if !self.out.is_empty() {
            self.sw.write_all(&self.out).await.map_err(|_| End::ServerIo)?;
            self.out.clear();
            self.writes += 1;
        }
        Ok(())
    }

    /// Waits until the node has answered everything sent, so the
    /// transaction status and `wrote` are exact.
    pub(super) async fn drain(&mut self) -> Result<(), End> {
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

    /// A Sync of the proxy's inside the unit being passed on (harmless in
    /// a transaction block, and before any of the unit executed): the
    /// node's exact state once it has run what was sent.
    pub(super) async fn sync_inside_unit(&mut self) -> Result<Held, End> {
        let rx = self.expect_hold(false);
        self.out.extend_from_slice(&commit::sync());
        self.send().await?;
        let held = rx.await.unwrap_or_default();
        // Everything sent so far was answered before that Sync's end.
        let base = self.link.loose();
        if let Some(u) = self.unit.as_mut() {
            (u.base, u.owed) = (base, 0);
        }
        Ok(held)
    }

    /// Inside a unit whose statements have begun to run in the node's
    /// implicit transaction: waits (with a Flush) until the node has
    /// answered every message of `unit` sent so far. False if one failed:
    /// the node now skips the rest of the unit up to the client's Sync.
    async fn answered_so_far(&mut self, unit: &Unit) -> Result<bool, End> {
        self.out.extend_from_slice(&crate::net::frame::frame(b'H', &[]));
        self.send().await?;
        loop {
            let progressed = self.link.progressed.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            let now = self.link.loose();
            if now.errors > unit.base.errors {
                return Ok(false);
            }
            if now.answers - unit.base.answers >= unit.owed {
                return Ok(true);
            }
            progressed.await;
        }
    }

    /// Runs the proxy's own statements (pipelined) and returns the answers.
    pub(super) async fn own(&mut self, sqls: &[&str]) -> Result<Vec<Vec<Reply>>, End> {
        let mut answers = Vec::with_capacity(sqls.len());
        for rx in self.own_pipelined(sqls).await? {
            answers.push(answer(rx).await?);
        }
        Ok(answers)
    }

    /// Sends the proxy's own statements (pipelined, one write); each
    /// one's answers arrive on its receiver, to be read as they come.
    pub(super) async fn own_pipelined(&mut self, sqls: &[&str]) -> Result<Vec<oneshot::Receiver<Vec<Reply>>>, End> {
        let mut rxs = Vec::with_capacity(sqls.len());
        for sql in sqls {
            let (tx, rx) = oneshot::channel();
            self.expect(Expect::Capture(tx));
            self.out.extend_from_slice(&commit::own_unit(sql));
            rxs.push(rx);
        }
        self.send().await?;
        Ok(rxs)
    }

    /// The next client batch, or the held end of a pending unit, whichever
    /// comes first; closes an idle session after `client_idle_timeout`.
    pub(super) async fn next_input<CR: AsyncRead + Unpin>(&mut self, cr: &mut CR) -> Result<Input, End> {
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
    pub(super) fn rearm(&mut self) -> Result<(), End> {
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
    pub(super) async fn stream<CR: AsyncRead + Unpin>(&mut self, head: BytesMut, mut remaining: usize, cr: &mut CR) -> Result<(), End> {
        let total = (head.len() + remaining) as u64;
        self.ctx.bytes_in.increment(total);
        self.ctx.shared.totals.bytes_in.fetch_add(total, Ordering::Relaxed);
        let tag = head[0];
        if tag != b'd' {
            self.finish_pending().await?;
            self.last_tag = tag;
        }
        let forward = match tag {
            b'd' => {
                self.copy_data_seen();
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
                !matches!(self.unit.map(|u| u.mode), Some(UnitMode::Discard | UnitMode::DiscardWrapped))
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
    pub(super) async fn function_call(&mut self, raw: &[u8]) {
        self.ends_extended_unit();
        self.ctx.tracker.before_send(1).await;
        self.past_answered_commit();
        self.expect(Expect::Forward);
        self.out.extend_from_slice(raw);
    }

    /// A Query or FunctionCall after extended messages with no Sync
    /// between (pgjdbc's autosave: Close, then its savepoint's Query):
    /// PostgreSQL runs it after them and ends their implicit transaction
    /// with it, answering ReadyForQuery, so it ends their unit here too —
    /// their answers reach the client ahead of its own, unasked, and what
    /// follows is a unit of its own. Neither may be held back behind a
    /// BEGIN of the proxy's any more: the Query's answer is awaited.
    fn ends_extended_unit(&mut self) {
        match self.unit.as_mut() {
            Some(u) if u.mode == UnitMode::Plain => self.unit = None,
            Some(u) => u.unsent = None,
            None => {}
        }
    }

    /// A new unit waits until the pending one is finished — and the one
    /// finishing it may start: the rest of a Query string after its
    /// COMMIT runs as a pending unit of its own.
    pub(super) async fn finish_pending(&mut self) -> Result<(), End> {
        while self.pending.is_some() {
            self.send().await?;
            let held = match self.pending.as_mut() {
                Some(p) => (&mut p.rx).await.unwrap_or_default(),
                None => Held::default(),
            };
            self.finish(held).await?;
        }
        Ok(())
    }

    /// COPY data (or its end) from the client: if the COPY was started by
    /// an extended unit whose Sync came before the data (as tokio-postgres
    /// sends it), the node ignored that Sync, and the client's next Sync
    /// takes its place ([`Self::batch`]).
    fn copy_data_seen(&mut self) {
        if self.last_tag == b'S' {
            self.copy_after_sync = true;
        } else if self.last_tag != b'd' {
            // A COPY with no Sync before its data (a Query, or a unit
            // ended by a Flush): its CopyInResponse concerns no Sync.
            self.link.copy_in_response.store(false, Ordering::Release);
        }
        self.last_tag = b'd';
    }

    /// Sends the Query `raw` (whole, or the start of one streamed after
    /// it) in a transaction of the proxy's: the proxy finishes it when the
    /// node's ReadyForQuery comes back ([`Self::finish`]).
    pub(super) fn wrap_autocommit(&mut self, raw: &[u8]) {
        self.begin_own_transaction();
        self.send_pending(raw, true, PendingKind::Autocommit);
    }

    /// Opens a transaction of the proxy's in front of the next unit (its
    /// answer is not the client's).
    pub(super) fn begin_own_transaction(&mut self) {
        self.ctx.tracker.info.beginning.store(true, Ordering::Release);
        self.out.extend_from_slice(&commit::own_statement("BEGIN"));
        self.expect(Expect::Skip(commit::OWN_STATEMENT_REPLIES));
    }

    /// Sends `raw` as a unit the proxy ends itself ([`Self::finish`], as
    /// `kind` says) once the node's ReadyForQuery comes back.
    pub(super) fn send_pending(&mut self, raw: &[u8], hold_complete: bool, kind: PendingKind) {
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
    pub(super) async fn large_query(&mut self, head: &[u8]) -> Result<(), End> {
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

    pub(super) async fn batch(&mut self, batch: Batch) -> Result<(), End> {
        self.looked_ahead_to = 0;
        self.ctx.bytes_in.increment(batch.bytes.len() as u64);
        self.ctx.shared.totals.bytes_in.fetch_add(batch.bytes.len() as u64, Ordering::Relaxed);
        for (i, f) in batch.frames.iter().enumerate() {
            let raw = &batch.bytes[f.start..f.start + f.len];
            let body = batch.body(f);
            if matches!(f.tag, b'd' | b'c' | b'f') {
                self.copy_data_seen();
            } else if f.tag == b'S' && std::mem::take(&mut self.copy_after_sync) && self.link.copy_in_response.swap(false, Ordering::AcqRel) {
                // The unit's own Sync went out before its COPY data, and
                // the node, in COPY FROM STDIN by then, ignored it
                // (PostgreSQL skips a Sync read during COPY): this one ends
                // the unit, answering what that one was expected to. (A
                // COPY that failed before CopyInResponse answered both.)
                self.out.extend_from_slice(raw);
                self.last_tag = f.tag;
                continue;
            } else {
                // COPY data belongs to the running unit; anything else
                // starts a new one, which must wait until the pending one
                // is finished.
                self.finish_pending().await?;
                self.last_tag = f.tag;
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
        self.send_unless_only_parses().await
    }

    /// Sends what the batch left to send — but a unit that so far only
    /// parsed statements (psycopg sends a pipeline's Parse on its own)
    /// waits for its next messages: PostgreSQL answers none before a Flush
    /// or Sync, and the proxy may yet put its BEGIN in front of the unit,
    /// which it can do without a Sync of its own (an early ParseComplete)
    /// only while none of it has left.
    async fn send_unless_only_parses(&mut self) -> Result<(), End> {
        let writes = self.writes;
        let waiting = self.unit.and_then(|u| u.unsent.filter(|&(w, from)| u.only_parses && w == writes && from <= self.out.len()));
        let Some((_, from)) = waiting else { return self.send().await };
        let unit_part = self.out.split_off(from);
        self.send().await?;
        self.out = unit_part;
        if let Some(u) = self.unit.as_mut() {
            u.unsent = Some((self.writes, 0));
        }
        Ok(())
    }

    pub(super) fn count_statement(&self, sql: &str, executes: bool) {
        let class = self.ctx.shared.live.load().classifier.classify(sql);
        self.ctx.queries_by_class[class as usize].increment(1);
        self.ctx.shared.totals.by_class[class as usize].fetch_add(1, Ordering::Relaxed);
        if executes {
            self.count_query();
        }
    }

    pub(super) fn count_query(&self) {
        self.ctx.tracker.info.queries.fetch_add(1, Ordering::Relaxed);
        self.ctx.shared.totals.queries.fetch_add(1, Ordering::Relaxed);
    }

    /// What every simple-protocol Query does first, whole or streamed:
    /// count it, pass the pause gate, and forget the unnamed statement and
    /// portal, which a Query replaces.
    pub(super) async fn start_query(&mut self, sql: &str) {
        self.count_statement(sql, true);
        self.ends_extended_unit();
        self.ctx.tracker.before_send(1).await;
        self.statements.remove(&b""[..]);
        self.portals.remove(&b""[..]);
    }

    /// A simple-protocol Query.
    pub(super) async fn query(&mut self, raw: &[u8], body: &[u8]) -> Result<(), End> {
        let sql = query_text(body).map_err(End::ClientProtocol)?;
        self.bytewise = matches!(sql, std::borrow::Cow::Owned(_));
        self.start_query(&sql).await;
        self.query_string(raw, &sql).await
    }

    /// The SQL of a Query (`raw`, the whole message): run part by part
    /// when a COMMIT or ROLLBACK inside it ends a transaction that more
    /// statements follow.
    pub(super) async fn query_string(&mut self, raw: &[u8], sql: &str) -> Result<(), End> {
        match crate::classify::split_after_transaction_end(sql) {
            Some((first, rest)) => self.query_part(&own_query(first, self.bytewise), first, Some(rest.to_string())).await,
            None => self.query_part(raw, sql, None).await,
        }
    }

    /// A Query, or the part of one through its first transaction end
    /// when `rest` follows it: the rest is run once this part has ended
    /// without an error ([`Self::then`]), as PostgreSQL runs the rest of
    /// a string.
    pub(super) async fn query_part(&mut self, raw: &[u8], sql: &str, rest: Option<String>) -> Result<(), End> {
        self.past_answered_commit();
        if let Some(head) = crate::classify::strip_trailing_commit(sql) {
            // `…; COMMIT` in one string: run what comes before the COMMIT,
            // then commit as for a COMMIT of its own.
            self.drain().await?;
            // In a failed transaction only a ROLLBACK TO in `head` lets
            // the COMMIT commit: whether it did is known once head ran.
            if matches!(self.status(), b'T' | b'E') || crate::classify::opens_transaction_anywhere(head) {
                self.send_pending(&own_query(head, self.bytewise), false, PendingKind::CommitAfter(rest));
                return Ok(());
            }
            if self.status() == b'I' {
                // No transaction open: PostgreSQL runs the statements in
                // an implicit one, which the COMMIT commits with a warning.
                self.begin_own_transaction();
                self.send_pending(&own_query(head, self.bytewise), false, PendingKind::ImplicitCommitAfter(rest));
                return Ok(());
            }
        }
        if let Some(head) = crate::classify::strip_trailing_commit_and_chain(sql) {
            // `…; COMMIT AND CHAIN` in one string (or the part of one
            // through it): the cluster's commit, then the chain, as for
            // one of its own.
            self.drain().await?;
            if !head.is_empty() && (self.status() == b'T' || crate::classify::opens_transaction_anywhere(head)) {
                self.send_pending(&own_query(head, self.bytewise), false, PendingKind::ChainAfter(rest));
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
                self.send_pending(&own_query(head, self.bytewise), false, PendingKind::PrepareAfter { gid, rest });
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
                // Read-only too: see `Block::ReadOnly`.
                if self.status() == b'T' {
                    self.send_pending(raw, true, PendingKind::Prepare(gid));
                    return Ok(());
                }
            }
            Intent::EveryNode => {
                self.drain().await?;
                if self.status() == b'I' {
                    let (home, side) = (self.ctx.node_id.saturating_sub(1), &self.ctx.side);
                    if let Err(reply) = crate::everywhere::run_on_others(self.ctx.shared, side, home, sql, self.bytewise).await {
                        count_error(&crate::net::scan::sqlstate(&reply[5..]).unwrap_or_default());
                        return self.answer(reply, b'I').await;
                    }
                }
            }
            Intent::Read | Intent::Begin | Intent::Rollback | Intent::TransactionControl | Intent::BlockOnly(_) => {}
        }
        self.expect(Expect::Forward);
        self.out.extend_from_slice(raw);
        Ok(())
    }

    /// What the statement or portal `name` runs (unknown: may write):
    /// the unit's own definitions (`overlay`, latest last) first.
    pub(super) fn resolve(map: &HashMap<Vec<u8>, Intent>, overlay: &[(&[u8], Intent)], name: &[u8]) -> Intent {
        match overlay.iter().rev().find(|(n, _)| *n == name) {
            Some((_, it)) => it.clone(),
            None => map.get(name).cloned().unwrap_or(Intent::Write),
        }
    }

    /// The intents of the Executes in the unit starting at frame `i`, up
    /// to its Sync or the end of the batch, and the index of the frame
    /// where that look stopped. A portal bound there that may write but is
    /// not executed yet counts as a write too: a client that binds, flushes
    /// and executes later (pg-cursor) gets the proxy's transaction before
    /// its Bind, since a portal does not outlive the Sync the proxy would
    /// need once it is bound. A unit names a few statements and portals
    /// at most: the ones it defines are kept in small lists, not maps.
    pub(super) fn look_ahead(&self, batch: &Batch, i: usize) -> Result<(Vec<Intent>, usize), End> {
        let mut statements: Vec<(&[u8], Intent)> = Vec::new();
        let mut portals: Vec<(&[u8], Intent)> = Vec::new();
        let mut unexecuted: Vec<&[u8]> = Vec::new();
        let mut executes = Vec::new();
        let mut end = batch.frames.len();
        for (k, f) in batch.frames.iter().enumerate().skip(i) {
            let body = batch.body(f);
            match f.tag {
                b'S' => {
                    end = k;
                    break;
                }
                b'P' => {
                    let (name, sql) = parse_message(body)?;
                    statements.push((name, intent(&sql)));
                }
                b'B' => {
                    let (portal, statement) = bind_names(body)?;
                    let it = Self::resolve(&self.statements, &statements, statement);
                    if it == Intent::Write {
                        unexecuted.push(portal);
                    }
                    portals.push((portal, it));
                }
                b'E' => {
                    let portal = BodyReader::new(body).cbytes().map_err(End::ClientProtocol)?;
                    unexecuted.retain(|p| *p != portal);
                    executes.push(Self::resolve(&self.portals, &portals, portal));
                }
                _ => {}
            }
        }
        executes.extend(unexecuted.iter().map(|_| Intent::Write));
        Ok((executes, end))
    }

    /// A portal made by Bind lasts until its transaction ends. With no
    /// transaction open and nothing in flight, every portal the map names
    /// is gone on the node: forget them, so a client that binds new names
    /// and never closes them does not grow the session. (Checked only past
    /// a few entries: the usual client binds the unnamed portal alone.)
    fn forget_ended_portals(&mut self) {
        if self.portals.len() > 16 && self.status() == b'I' && self.link.queue().is_empty() {
            self.portals.clear();
        }
    }

    /// An extended-protocol message other than Sync. Not `whole`: only the
    /// start of a Parse or Bind too big to buffer (see [`Self::stream`]),
    /// the only message of `batch`.
    pub(super) async fn extended(&mut self, batch: &Batch, i: usize, whole: bool) -> Result<(), End> {
        let f = batch.frames[i];
        let raw = &batch.bytes[f.start..f.start + f.len];
        let body = batch.body(&f);
        let mut unit = match self.unit {
            Some(u) => u,
            None => {
                self.ctx.tracker.before_send(0).await;
                self.forget_ended_portals();
                Unit { unsent: Some((self.writes, self.out.len())), ..Unit::new(self.link.loose()) }
            }
        };
        if matches!(unit.mode, UnitMode::Discard | UnitMode::DiscardWrapped) {
            return Ok(());
        }
        let mut held_back: Option<BytesMut> = None;
        // Each piece of the unit is looked at once, from its first Bind or
        // Execute (the batch's frames up to `looked_ahead_to` were seen).
        if unit.mode == UnitMode::Plain && matches!(f.tag, b'B' | b'E') && (i >= self.looked_ahead_to || !whole) {
            let executes = if whole {
                let (executes, end) = self.look_ahead(batch, i)?;
                self.looked_ahead_to = end;
                executes
            } else {
                // The Execute is yet to come: decide on the statement the
                // big Bind binds, before it goes out (a portal bound
                // before the proxy's BEGIN would not survive it).
                let (_, statement) = bind_names(body)?;
                vec![Self::resolve(&self.statements, &[], statement)]
            };
            let commit = executes.contains(&Intent::Commit);
            let may_write = executes.contains(&Intent::Write);
            // A statement only a block allows keeps the unit unwrapped if
            // it runs in the writes' implicit transaction, before a
            // COMMIT: after it, the rest of the unit is decided afresh.
            let control = executes
                .iter()
                .any(|x| matches!(x, Intent::Begin | Intent::Rollback | Intent::TransactionControl | Intent::CommitAndChain | Intent::PrepareTransaction(_)))
                || executes.iter().take_while(|x| **x != Intent::Commit).any(|x| matches!(x, Intent::BlockOnly(_)));
            let write = may_write && !control;
            // BEGIN, statements that may write, COMMIT, all in this piece
            // (psycopg's pipeline, pgbench's \startpipeline): the block is
            // open by the time the COMMIT executes.
            let begin_then_commit = executes
                .iter()
                .position(|x| *x == Intent::Begin)
                .is_some_and(|b| executes.iter().skip(b).any(|x| *x == Intent::Commit) && may_write);
            let new_need = (commit && !unit.commit_seen) || (write && !unit.write_seen);
            unit.commit_seen |= commit;
            unit.write_seen |= write;
            // A later piece decides again only where the proxy's Sync
            // changes nothing: before any Execute of the unit ran, or
            // inside a transaction block. Otherwise the unit runs as sent
            // (a write in it is then refused at its end, 0A000, rather
            // than split into two transactions).
            let may_sync = !unit.sent || !unit.executed || unit.begins || matches!(self.status(), b'T' | b'E');
            unit.begins |= executes.contains(&Intent::Begin);
            if new_need && !may_sync && write && !commit && self.status() == b'I' {
                // Reads of the unit ran in the node's implicit transaction
                // (a pipeline in autocommit: a SELECT, then an INSERT). A
                // BEGIN now makes that transaction a block, as PostgreSQL
                // does with a BEGIN inside a unit, and the proxy commits
                // it at the client's Sync — once the node has answered
                // what came before, so the BEGIN's answers are known to
                // come (after an error the node skips up to the Sync).
                if !self.answered_so_far(&unit).await? {
                    unit.mode = unit.mode.discarding();
                    self.unit = Some(unit);
                    return Ok(());
                }
                self.begin_own_transaction();
                unit.mode = UnitMode::Wrapped;
            }
            if new_need && may_sync {
                // The exact state first: wait for the answers so far — with
                // a Sync of the proxy's if part of this unit is already on
                // its way (harmless: nothing of it has executed yet). If
                // none of it has left yet, it is held back instead, and the
                // proxy's BEGIN, if any, goes in front of it: a Sync would
                // make the node answer the unit's first messages (a
                // ParseComplete) before the client's Sync or Flush asks,
                // and cost a round trip.
                let unsent = unit.unsent.filter(|&(writes, from)| writes == self.writes && from <= self.out.len());
                if let Some((_, from)) = unsent.filter(|_| unit.sent) {
                    held_back = Some(self.out.split_off(from));
                    self.drain().await?;
                } else if unit.sent {
                    let errors_before = unit.base.errors;
                    let held = self.sync_inside_unit().await?;
                    // What the node owes is answered now (and was counted
                    // by the Sync's entry, not as loose).
                    if let Some(u) = self.unit {
                        (unit.base, unit.owed) = (u.base, u.owed);
                    }
                    // A message of the unit may have failed before the
                    // Sync was sent (its error came with nothing expected):
                    // the node then skipped up to that Sync, and the rest of
                    // the unit is skipped here as it would be there.
                    if held.error || unit.base.errors > errors_before {
                        unit.mode = unit.mode.discarding();
                        self.unit = Some(unit);
                        return Ok(());
                    }
                } else {
                    self.drain().await?;
                }
                let open_and_writes = self.status() == b'T' && (self.wrote() || may_write);
                // A failed block: a ROLLBACK TO before the COMMIT may
                // restore it, which its Execute learns (commit_in_place).
                let failed = self.status() == b'E';
                if commit && (open_and_writes || failed || (self.status() == b'I' && begin_then_commit)) {
                    unit.mode = UnitMode::CommitInside;
                } else if write && self.status() == b'I' && !(commit && unit.begins) {
                    // A COMMIT among them ends the implicit transaction:
                    // the proxy commits its block there
                    // (`implicit_commit_in_place`).
                    self.begin_own_transaction();
                    unit.mode = UnitMode::Wrapped;
                }
            }
        }
        if let Some(held) = held_back {
            // After the proxy's BEGIN, if it put one in front.
            unit.unsent = Some((self.writes, self.out.len()));
            self.out.extend_from_slice(&held);
        }
        unit.sent = true;
        unit.only_parses &= matches!(f.tag, b'P' | b'C');
        self.unit = Some(unit);
        match f.tag {
            b'P' if whole => {
                let (name, sql) = parse_message(body)?;
                self.count_statement(&sql, false);
                self.statements.insert(name.to_vec(), intent(&sql));
            }
            b'P' => {
                // Only its start is here: see [`head_intent`].
                let mut r = BodyReader::new(body);
                let name = r.cbytes().map_err(End::ClientProtocol)?.to_vec();
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
                let name = r.cbytes().map_err(End::ClientProtocol)?.to_vec();
                if kind == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
            }
            b'E' => {
                self.count_query();
                self.past_answered_commit();
                unit.executed = true;
                self.unit = Some(unit);
                let portal = BodyReader::new(body).cbytes().map_err(End::ClientProtocol)?.to_vec();
                // The client's own BEGIN, in a later piece of a unit the
                // proxy wrapped: PostgreSQL makes the implicit transaction
                // a block there, and so the proxy's block becomes the
                // client's (`begin_in_place`).
                let is_begin = self.portals.get(&portal) == Some(&Intent::Begin);
                if is_begin && unit.mode == UnitMode::Wrapped && !unit.begins && self.begin_in_place().await? {
                    return Ok(());
                }
                if is_begin {
                    unit.begins = true;
                    self.unit = Some(unit);
                }
                if unit.mode == UnitMode::CommitInside && self.portals.get(&portal) == Some(&Intent::Commit) {
                    // Stays CommitInside: a later COMMIT of the unit (a
                    // pipeline of several transactions) is taken over too.
                    if self.commit_in_place().await? {
                        return Ok(());
                    }
                }
                if unit.mode == UnitMode::Wrapped && self.portals.get(&portal) == Some(&Intent::Commit) && self.implicit_commit_in_place().await? {
                    return Ok(());
                }
                let implicit = unit.mode == UnitMode::Wrapped && !unit.begins;
                if implicit && self.portals.get(&portal) == Some(&Intent::Rollback) && self.implicit_rollback_in_place().await? {
                    return Ok(());
                }
                if let (true, Some(Intent::BlockOnly(what))) = (implicit, self.portals.get(&portal).cloned()) {
                    if self.refuse_outside_a_block(what).await? {
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
        if let Some(u) = self.unit.as_mut() {
            u.owed += answers_owed(f.tag, body);
            u.answered_in_place = false;
        }
        self.out.extend_from_slice(raw);
        Ok(())
    }

    pub(super) async fn sync(&mut self, raw: &[u8]) -> Result<(), End> {
        self.ctx.tracker.before_send(1).await;
        let unit = self.unit.take();
        if unit.is_some_and(|u| u.answered_in_place) && self.out.is_empty() && self.link.queue().is_empty() {
            // The unit ended with a commit the proxy ran and answered: its
            // own statements, each ended by a Sync, have all been answered,
            // so the node is idle in a known state and would answer this
            // Sync with exactly this ReadyForQuery. One round trip to the
            // node less per commit.
            let status = self.status();
            return self.answer(BytesMut::new(), status).await;
        }
        if matches!(unit.map(|u| u.mode), Some(UnitMode::Wrapped | UnitMode::DiscardWrapped)) {
            self.send_pending(raw, false, PendingKind::Autocommit);
        } else {
            self.expect(Expect::Forward);
            self.out.extend_from_slice(raw);
        }
        Ok(())
    }

}

/// The answers to one of the proxy's own statements sent by
/// [`Driver::own_pipelined`]; the node's connection broke if they never
/// come.
pub(super) async fn answer(rx: oneshot::Receiver<Vec<Reply>>) -> Result<Vec<Reply>, End> {
    rx.await.map_err(|_| End::ServerClosed)
}

/// (statement name, SQL) of a Parse body.
pub(super) fn parse_message(body: &[u8]) -> Result<(&[u8], std::borrow::Cow<'_, str>), End> {
    let mut r = BodyReader::new(body);
    let name = r.cbytes().map_err(End::ClientProtocol)?;
    let sql = parse_text(body).map_err(End::ClientProtocol)?;
    Ok((name, sql))
}

/// The text at the start of a message cut short (`bytes` may end inside
/// the string or even inside a UTF-8 sequence): up to its terminator or
/// the last whole character.
pub(super) fn text_prefix(bytes: &[u8]) -> &str {
    let bytes = bytes.iter().position(|&b| b == 0).map_or(bytes, |n| &bytes[..n]);
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// What SQL known only by its start may do: transaction control if it
/// starts with it, else it may write (the part not seen yet may).
pub(super) fn head_intent(text: &str) -> Intent {
    match crate::classify::first_keyword(text).as_deref() {
        Some("BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE" | "PREPARE") => {
            Intent::TransactionControl
        }
        _ => Intent::Write,
    }
}

/// (portal, statement) of a Bind body.
pub(super) fn bind_names(body: &[u8]) -> Result<(&[u8], &[u8]), End> {
    let mut r = BodyReader::new(body);
    let portal = r.cbytes().map_err(End::ClientProtocol)?;
    let statement = r.cbytes().map_err(End::ClientProtocol)?;
    Ok((portal, statement))
}
