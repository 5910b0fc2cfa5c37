//! Where a COMMIT is rewritten: the driver's steps that end a
//! transaction which wrote — the cluster's two-phase commit in place of
//! the client's COMMIT (simple and extended protocol, inside Query
//! strings, COMMIT AND CHAIN, the client's own PREPARE TRANSACTION) —
//! and the end of the units the proxy finishes itself. What is sent to
//! the node and how its answers read is in [`crate::commit`].

use super::driver::{answer, Driver, PendingKind};
use super::*;

impl<SW: AsyncWrite + Unpin, CW: AsyncWrite + Unpin> Driver<'_, SW, CW> {
    /// Inside an extended unit, before an Execute the proxy may answer
    /// itself: learn the exact state with a Sync of the proxy's (harmless
    /// inside a transaction block): whether a transaction block is open
    /// and wrote, or a statement of the unit failed.
    pub(super) async fn block_wrote(&mut self) -> Result<Block, End> {
        let held = self.sync_inside_unit().await?;
        if held.error {
            // A statement of the unit failed: PostgreSQL skips the rest of
            // it up to the client's Sync, this Execute included.
            if let Some(unit) = self.unit.as_mut() {
                unit.mode = unit.mode.discarding();
            }
            return Ok(Block::Failed);
        }
        Ok(match (held.status, self.wrote()) {
            (b'T', true) => Block::Wrote,
            (b'T', false) => Block::ReadOnly,
            _ => Block::Other,
        })
    }

    /// Before an Execute the proxy answers itself if a transaction block
    /// is open (one that only read too; [`Self::block_wrote`]): None when
    /// one is, else whether the Execute was dealt with — a failed unit
    /// skips it (true), with no block it goes as sent (false).
    async fn unless_a_block_is_open(&mut self) -> Result<Option<bool>, End> {
        Ok(match self.block_wrote().await? {
            Block::Wrote | Block::ReadOnly => None,
            Block::Failed => Some(true),
            Block::Other => Some(false),
        })
    }

    /// At the Execute of a COMMIT inside an extended unit: if the
    /// transaction wrote ([`Self::block_wrote`]), run the two-phase commit
    /// and answer the Execute ourselves. Returns whether it did.
    pub(super) async fn commit_in_place(&mut self) -> Result<bool, End> {
        match self.block_wrote().await? {
            Block::Wrote => {}
            Block::Failed => return Ok(true),
            Block::ReadOnly | Block::Other => return Ok(false),
        }
        let reply = match self.two_phase().await? {
            Ok(()) => messages::command_complete("COMMIT"),
            Err(e) => e.into_bytes(),
        };
        self.answered_in_place(&reply).await?;
        Ok(true)
    }

    /// At the Execute of a COMMIT in a unit the proxy wrapped in its own
    /// BEGIN (writes before it in the unit's implicit transaction, no
    /// BEGIN of the client's): PostgreSQL commits the implicit
    /// transaction there with a warning that no transaction block is in
    /// progress; the proxy commits its block the cluster's way instead and
    /// answers the same. Returns whether it did.
    pub(super) async fn implicit_commit_in_place(&mut self) -> Result<bool, End> {
        if let Some(done) = self.unless_a_block_is_open().await? {
            return Ok(done);
        }
        let mut reply = messages::warning("25P01", NO_TRANSACTION);
        reply.extend_from_slice(&self.commit_open_reply(messages::command_complete("COMMIT")).await?);
        self.answered_in_place(&reply).await?;
        Ok(true)
    }

    /// At the Execute of the client's BEGIN in a unit the proxy wrapped in
    /// its own BEGIN, sent after the unit's writes went out: PostgreSQL
    /// turns the implicit transaction into a block, which the client then
    /// ends. The proxy's block is that block: it answers BEGIN itself and
    /// no longer commits at the unit's Sync. Returns whether it did.
    pub(super) async fn begin_in_place(&mut self) -> Result<bool, End> {
        if let Some(done) = self.unless_a_block_is_open().await? {
            return Ok(done);
        }
        self.answered_in_place(&messages::command_complete("BEGIN")).await?;
        Ok(true)
    }

    /// At the Execute of a ROLLBACK in a unit the proxy wrapped in its own
    /// BEGIN, sent after the unit's writes went out: PostgreSQL rolls the
    /// implicit transaction back with a warning that no transaction is in
    /// progress; the proxy rolls its block back and answers the same.
    /// Returns whether it did.
    pub(super) async fn implicit_rollback_in_place(&mut self) -> Result<bool, End> {
        if let Some(done) = self.unless_a_block_is_open().await? {
            return Ok(done);
        }
        self.own(&["ROLLBACK"]).await?;
        let mut reply = messages::warning("25P01", NO_TRANSACTION);
        reply.extend_from_slice(&messages::command_complete("ROLLBACK"));
        self.answered_in_place(&reply).await?;
        Ok(true)
    }

    /// At the Execute of LOCK TABLE or DECLARE CURSOR (`what`) in a unit
    /// the proxy wrapped in its BEGIN, sent after the unit's writes went
    /// out: PostgreSQL, which runs the unit in an implicit transaction,
    /// refuses it (25P01) and rolls the writes back. So does the proxy: it
    /// rolls its block back, answers the error and skips the rest of the
    /// unit up to the client's Sync, which it answers itself. Returns
    /// whether it did.
    pub(super) async fn refuse_outside_a_block(&mut self, what: &str) -> Result<bool, End> {
        if let Some(done) = self.unless_a_block_is_open().await? {
            return Ok(done);
        }
        self.own(&["ROLLBACK"]).await?;
        count_error("25P01");
        self.answered_in_place(&messages::error_response("25P01", &format!("{what} can only be used in transaction blocks"), None)).await?;
        if let Some(rest) = self.unit.as_mut() {
            rest.mode = super::driver::UnitMode::Discard;
        }
        Ok(true)
    }

    /// Gives the client the answer to an Execute the proxy ran itself
    /// with its own statements, all answered by now
    /// ([`super::driver::Unit::answered_in_place`]). The node is then idle
    /// (or in the chained block) in a known state, as after a Sync: the
    /// rest of the unit is decided afresh, as a unit of its own — a write
    /// after the COMMIT runs in a new implicit transaction, which the
    /// proxy wraps and commits at the client's Sync.
    async fn answered_in_place(&mut self, reply: &[u8]) -> Result<(), End> {
        self.to_client(reply).await?;
        self.unit = Some(super::driver::Unit::after_answer_in_place(self.link.loose()));
        self.looked_ahead_to = 0;
        Ok(())
    }

    /// At the Execute of the client's `PREPARE TRANSACTION 'gid'` inside
    /// an extended unit (as JDBC's XA support sends it): if a transaction
    /// block is open (read-only too), prepare it with a statement of the proxy's,
    /// collect every peer's vote as for the simple protocol, and answer the
    /// Execute ourselves — PREPARE TRANSACTION, or 40001 with the gid
    /// rolled back everywhere. Returns whether it did.
    pub(super) async fn prepare_in_place(&mut self, gid: &str) -> Result<bool, End> {
        if let Some(done) = self.unless_a_block_is_open().await? {
            return Ok(done);
        }
        let prepare = format!("PREPARE TRANSACTION {}", commit::literal(gid));
        let prepared = self.own(&[&prepare]).await?.remove(0);
        let reply = match commit::error_of(&prepared) {
            Some(e) => e.raw.clone(),
            None => self.voted_reply(gid, messages::command_complete("PREPARE TRANSACTION")).await?,
        };
        self.answered_in_place(&reply).await?;
        Ok(true)
    }

    /// At the Execute of `COMMIT AND CHAIN` inside an extended unit: if
    /// the open transaction wrote, the cluster's commit and the chained
    /// transaction, as in the simple protocol, answering the Execute
    /// ourselves (the client's Sync then reports the chained block).
    /// Returns whether it did.
    pub(super) async fn chain_in_place(&mut self) -> Result<bool, End> {
        match self.block_wrote().await? {
            Block::Wrote => {}
            Block::Failed => return Ok(true),
            Block::ReadOnly | Block::Other => return Ok(false),
        }
        let (reply, _status) = self.chain().await?;
        self.answered_in_place(&reply).await?;
        Ok(true)
    }

    /// The pending unit has ended on the node: finish it and give the
    /// client the end it would have had from one PostgreSQL.
    pub(super) async fn finish(&mut self, held: Held) -> Result<(), End> {
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
                    let warning = messages::warning("25P01", NO_TRANSACTION);
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
    pub(super) async fn commit_then(&mut self, notice: BytesMut, rest: Option<String>) -> Result<(), End> {
        let mut done = notice;
        done.extend_from_slice(&messages::command_complete("COMMIT"));
        match (self.commit_open().await?, rest) {
            (Ok(()), Some(rest)) => self.then(done, rest).await,
            (Ok(()), None) => self.answer(done, b'I').await,
            (Err(e), _) => self.answer(e.into_bytes(), b'I').await,
        }
    }

    /// The client's `PREPARE TRANSACTION 'gid'` inside a Query: prepared
    /// here with a statement of the proxy's, then voted on (read-only
    /// too, see [`Block::ReadOnly`]); the `rest` of the Query runs once it is prepared everywhere.
    pub(super) async fn prepare_then(&mut self, gid: String, rest: Option<String>) -> Result<(), End> {
        let prepared = self.own(&[&format!("PREPARE TRANSACTION {}", commit::literal(&gid))]).await?.remove(0);
        if let Some(e) = commit::error_of(&prepared) {
            let status = self.status();
            return self.answer(e.raw.clone(), status).await;
        }
        let done = messages::command_complete("PREPARE TRANSACTION");
        if let Err(e) = self.collect_votes(&gid).await? {
            count_error(e.code);
            return self.answer(e.encode(), b'I').await;
        }
        match rest {
            Some(rest) => self.then(done, rest).await,
            None => self.answer(done, b'I').await,
        }
    }

    /// COMMIT AND CHAIN of the open transaction inside a Query (the
    /// cluster's commit if it wrote, else the node's own), then the
    /// `rest` of the Query in the chained transaction.
    pub(super) async fn chain_then(&mut self, rest: Option<String>) -> Result<(), End> {
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
    pub(super) async fn then(&mut self, reply: BytesMut, rest: String) -> Result<(), End> {
        if !reply.is_empty() {
            self.to_client(&reply).await?;
        }
        let raw = own_query(&rest, self.bytewise);
        Box::pin(self.query_string(&raw, &rest)).await?;
        self.send().await
    }

    /// Sends the proxy's answer to a unit it finished itself, with the
    /// ReadyForQuery of transaction status `status`.
    pub(super) async fn answer(&self, mut reply: BytesMut, status: u8) -> Result<(), End> {
        reply.extend_from_slice(&messages::ready_for_query(status));
        self.to_client(&reply).await?;
        self.ctx.tracker.on_ready(status);
        Ok(())
    }

    /// Commits the open transaction: with the cluster's two-phase commit
    /// if it wrote, else with a plain COMMIT of the proxy's.
    pub(super) async fn commit_open(&mut self) -> Result<Result<(), Raw>, End> {
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
    pub(super) async fn commit_open_reply(&mut self, done: BytesMut) -> Result<BytesMut, End> {
        Ok(match self.commit_open().await? {
            Ok(()) => done,
            Err(e) => e.into_bytes(),
        })
    }

    /// COMMIT AND CHAIN of a transaction that wrote: the cluster's commit,
    /// then a new transaction with the same isolation level, read-only
    /// and deferrable settings, as PostgreSQL's chain starts.
    pub(super) async fn commit_and_chain(&mut self) -> Result<(), End> {
        let (reply, status) = self.chain().await?;
        self.answer(reply, status).await
    }

    /// The cluster's commit of the open transaction, then its chained
    /// successor: the reply for the client and the transaction status
    /// after it.
    pub(super) async fn chain(&mut self) -> Result<(BytesMut, u8), End> {
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
    pub(super) async fn voted_reply(&mut self, gid: &str, done: BytesMut) -> Result<BytesMut, End> {
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
    pub(super) async fn collect_votes(&mut self, gid: &str) -> Result<Result<(), PgError>, End> {
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
    pub(super) async fn roll_back_prepared(&mut self, gid: &str) -> Result<Option<PgError>, End> {
        let rollback = format!("ROLLBACK PREPARED {}", commit::literal(gid));
        let undone = self.own(&[&rollback]).await?.remove(0);
        let Some(err) = commit::error_of(&undone) else { return Ok(None) };
        let field = |f| crate::net::scan::error_field(err.body(), f).unwrap_or_default();
        tracing::warn!(gid, "rollback of a refused transaction failed: {}", field(b'M'));
        Ok((field(b'C') == "40003").then(|| PgError::error("40003", field(b'M')).with_hint(field(b'H'))))
    }

    /// Where the commit under way stands ([`Committing`]; None: no commit
    /// or its outcome known). From the PREPARE to the outcome a client's
    /// cancel is not passed on ([`crate::cancel::CancelTarget`]).
    fn set_committing(&self, state: Option<Committing>) {
        self.link.set_committing(self.ctx.tracker.info, state);
    }

    /// The client's next statement goes to the node: a commit the driver
    /// answered before it (a COMMIT inside an extended unit or a Query
    /// string, whose ReadyForQuery is still to come) is over for the
    /// session — a node lost from here on is about that statement, and a
    /// cancel may reach it. (No commit is under way while the driver
    /// passes on a client's statement.) One atomic load when none.
    pub(super) fn past_answered_commit(&self) {
        if self.ctx.tracker.info.committing.load(Ordering::Relaxed) {
            self.set_committing(None);
        }
    }

    /// Writes the driver's own answer to the client; once it ends with
    /// a ReadyForQuery, a commit it reported is over for the session
    /// ([`Self::two_phase`]). (An Execute answered inside an extended
    /// unit is over at the ReadyForQuery that answers the client's Sync,
    /// which the responder passes on: see `Responder::route`.)
    pub(super) async fn to_client(&self, bytes: &[u8]) -> Result<(), End> {
        let ends_unit = bytes.len() >= 6 && bytes[bytes.len() - 6] == b'Z';
        match ends_unit.then(|| self.link.held_notifications()).flatten() {
            Some(held) => {
                let (answer, ready) = bytes.split_at(bytes.len() - 6);
                self.link.to_client(&[answer, &held, ready].concat()).await?;
            }
            None => self.link.to_client(bytes).await?,
        }
        if ends_unit && self.link.committing() {
            self.set_committing(None);
        }
        Ok(())
    }

    /// The cluster's two-phase commit of the open transaction (module
    /// [`crate::commit`]). `Err(End)`: the session broke; `Ok(Err(e))`:
    /// the transaction did not commit and the client gets `e`.
    pub(super) async fn two_phase(&mut self) -> Result<Result<(), Raw>, End> {
        // A paused cluster (e.g. a generation switch) takes no commits.
        let _pass = self.ctx.tracker.before_commit().await;
        let started = Instant::now();
        let gid = commit::new_gid(self.ctx.node_id, self.ctx.tracker.info.id);
        let (timeout, visible_everywhere) = {
            let live = self.ctx.shared.live.load();
            (live.config.commit.vote_timeout, live.config.commit.visible_everywhere)
        };
        let prepare = format!("PREPARE TRANSACTION {}", commit::literal(&gid));
        self.set_committing(Some(Committing::InDoubt(gid.clone())));
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
                    // Each answer read as it comes: should the node's
                    // connection break during the wait for the peers, the
                    // client still learns its transaction committed.
                    let mut answers = self.own_pipelined(&sqls).await?.into_iter();
                    let done = answer(answers.next().ok_or(End::ServerClosed)?).await?;
                    match commit::error_of(&done) {
                        None => {
                            self.set_committing(Some(Committing::Committed(gid.clone())));
                            if let Some(waited) = answers.next() {
                                let waited = answer(waited).await?;
                                if commit::first_row(&waited).and_then(|r| r.into_iter().next().flatten()).as_deref() != Some("t") {
                                    tracing::warn!(%gid, "committed, but not every node confirmed its commit: one was unreachable, or did not confirm within {timeout:?}; it commits the transaction when it gets there");
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
        // Committed, or its outcome not known (40003): the state stays
        // until the client has its answer ([`Self::to_client`]). A node
        // lost before that (its backend's FATAL, 57P01, or the end of the
        // session, would read as "not committed") ends the session with
        // the truth instead: 08006 saying it committed, or 40003.
        if outcome.as_ref().is_err_and(|e| e.sqlstate() != "40003") {
            self.set_committing(None);
        }
        let label = if outcome.is_ok() { "committed" } else { "aborted" };
        metrics::counter!("mtm_proxy_commits_total", "outcome" => label).increment(1);
        metrics::histogram!("mtm_proxy_commit_duration_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &outcome {
            count_error(&e.sqlstate());
        }
        Ok(outcome)
    }
}

/// PostgreSQL's warning at a COMMIT outside a transaction block (an
/// implicit one included).
const NO_TRANSACTION: &str = "there is no transaction in progress";

/// The open transaction, as the proxy's Sync inside a unit finds it.
pub(super) enum Block {
    /// A transaction block that wrote: the proxy ends it.
    Wrote,
    /// One that did not: its COMMIT runs as sent, but the client's
    /// PREPARE TRANSACTION of it still collects the votes — the peers
    /// must hold the gid before its client may finish it from a session
    /// on another node.
    ReadOnly,
    /// A statement of the unit failed: the rest of the unit is skipped.
    Failed,
    /// Anything else: the client's statement runs as sent.
    Other,
}

/// An ErrorResponse for the client, as bytes.
pub(super) struct Raw(BytesMut);

impl From<PgError> for Raw {
    fn from(e: PgError) -> Self {
        Raw(e.encode())
    }
}

impl Raw {
    pub(super) fn into_bytes(self) -> BytesMut {
        self.0
    }

    pub(super) fn sqlstate(&self) -> String {
        crate::net::scan::sqlstate(&self.0[5..]).unwrap_or_else(|| "XX000".into())
    }
}
