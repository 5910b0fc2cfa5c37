//! The responder: cuts the node's output into messages and treats each
//! by the [`Expect`] at the head of the session's queue.

use super::*;


/// A signal for the driver, sent once the bytes before it reached the
/// client (so the driver's own replies never overtake them).
pub(super) enum Signal {
    Held(oneshot::Sender<Held>, Held),
    Captured(oneshot::Sender<Vec<Reply>>, Vec<Reply>),
}

pub(super) struct Responder<'a, CW> {
    pub(super) link: &'a Link<CW>,
    pub(super) ctx: &'a PumpCtx<'a>,
    pub(super) out: BytesMut,
    pub(super) held_complete: Option<BytesMut>,
    pub(super) held_error: bool,
    pub(super) captured: Vec<Reply>,
    pub(super) fire: Vec<Signal>,
    /// An entry left the queue during this read.
    pub(super) progressed: bool,
}

/// A piece of the node's output, as a range of [`Splitter::buf`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    Whole(std::ops::Range<usize>),
    /// The start of a message too large to hold (its tag first): passed
    /// on as it comes.
    Begin(std::ops::Range<usize>),
    /// The rest of such a message.
    Through(std::ops::Range<usize>),
}

/// Cuts the node's output into messages where they lie in the read
/// buffer: nothing is copied or allocated per message.
#[derive(Default)]
pub(super) struct Splitter {
    buf: BytesMut,
    /// Start of what [`Splitter::next`] has not handed out yet.
    pos: usize,
    /// Bytes still to pass through of a large message.
    streaming: usize,
}

impl Splitter {
    pub(super) fn next(&mut self) -> Result<Option<Piece>, String> {
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
            return Ok(Some(Piece::Begin(p..self.pos)));
        }
        Ok(None)
    }

    /// Drops what was handed out, before the next read.
    pub(super) fn consume(&mut self) {
        bytes::Buf::advance(&mut self.buf, self.pos);
        self.pos = 0;
    }
}

/// The value of a ParameterStatus for [`XACT_WRITES`], if it is one.
pub(super) fn xact_writes_report(body: &[u8]) -> Option<bool> {
    let mut r = BodyReader::new(body);
    (r.cstr().ok()? == XACT_WRITES).then(|| r.cstr().ok() == Some("on"))
}

impl<CW: AsyncWrite + Unpin> Responder<'_, CW> {
    pub(super) async fn run<SR: AsyncRead + Unpin>(mut self, mut sr: SR) -> End {
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
                        Ok(Some(Piece::Begin(r))) => {
                            // A huge ErrorResponse (or answer) to a unit short
                            // of its Sync still counts for `Loose`.
                            if queue.is_empty() && self.link.loose.lock().unwrap_or_else(|e| e.into_inner()).count(split.buf[r.start]) {
                                self.progressed = true;
                            }
                            self.out.extend_from_slice(&split.buf[r]);
                        }
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

    pub(super) fn count_error(&self, tag: u8, raw: &[u8]) {
        if tag == b'E' {
            self.ctx.shared.totals.errors.fetch_add(1, Ordering::Relaxed);
            count_error(&crate::net::scan::sqlstate(&raw[5..]).unwrap_or_else(|| "XX000".into()));
        }
    }

    /// One whole message of the node, handled as the head of `queue` says.
    pub(super) fn message(&mut self, queue: &mut VecDeque<Expect>, raw: &[u8]) {
        let tag = raw[0];
        let body = &raw[5..];
        if tag == b'S' {
            if let Some(on) = xact_writes_report(body) {
                self.link.wrote.store(on, Ordering::Relaxed);
                return;
            }
            // A setting's new value belongs to the client whatever is
            // running: a transaction the proxy ended (its PREPARE, its
            // ROLLBACK) reverts `SET LOCAL client_encoding`, DateStyle,
            // TimeZone…, and a driver decodes with what it was told last.
            self.out.extend_from_slice(raw);
            return;
        }
        if tag == b'G' {
            self.link.copy_in_response.store(true, Ordering::Release);
        }
        if tag == b'A' {
            // Notifications belong to the client whatever is running; but
            // one that comes with the answer to a statement of the
            // proxy's (its commit) goes out before the ReadyForQuery of
            // the answer the client gets, not ahead of its CommandComplete.
            if matches!(queue.front(), Some(Expect::Capture(_))) {
                self.link.hold_notification(raw);
            } else {
                self.out.extend_from_slice(raw);
            }
            return;
        }
        let status = (tag == b'Z').then(|| body.first().copied().unwrap_or(b'I'));
        if let Some(s) = status {
            self.link.set_status(s);
        }
        let fatal = tag == b'E' && matches!(crate::net::scan::error_field(body, b'V').as_deref(), Some("FATAL" | "PANIC"));
        if fatal && self.link.committing.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            // The node ends the session in the middle of a commit, or
            // after one before the client heard of it (its postmaster
            // died, it was terminated): the client is told how the commit
            // stands instead (40003, or 08006 saying it committed), not
            // the node's reason, which would read as "not committed" to a
            // client that then retries.
            return;
        }
        let before = self.out.len();
        self.route(queue, raw, status);
        if fatal && self.out.len() > before {
            // The client knows why the session ends. (A FATAL the proxy's
            // own statement caught did not reach it: it hears 08006.)
            self.link.node_fatal.store(true, Ordering::Relaxed);
        }
    }

    /// A message of the node, as the head of `queue` says.
    fn route(&mut self, queue: &mut VecDeque<Expect>, raw: &[u8], status: Option<u8>) {
        let tag = raw[0];
        let Some(front) = queue.front_mut() else {
            // Nothing expected (a notice between units, the answers to a
            // unit short of its Sync): pass it on.
            if self.link.loose.lock().unwrap_or_else(|e| e.into_inner()).count(tag) {
                self.progressed = true;
            }
            self.out.extend_from_slice(raw);
            return;
        };
        let done = match front {
            // The proxy's BEGIN failed (a cancel reached it): the node
            // skips the rest of the unit, the BEGIN's last answer among
            // it, and the error is the client's to hear.
            Expect::Skip(_) if tag == b'E' => {
                self.count_error(tag, raw);
                self.out.extend_from_slice(raw);
                true
            }
            Expect::Skip(n) => {
                if tag != b'N' {
                    *n = n.saturating_sub(1);
                }
                *n == 0
            }
            Expect::Forward => {
                self.count_error(tag, raw);
                if status.is_some() {
                    if let Some(held) = self.link.held_notifications() {
                        self.out.extend_from_slice(&held);
                    }
                }
                self.out.extend_from_slice(raw);
                if let Some(s) = status {
                    self.ctx.tracker.on_ready(s);
                    // The end of a unit whose COMMIT the driver answered
                    // in place: the client now has the whole answer.
                    if self.link.committing() {
                        self.link.set_committing(self.ctx.tracker.info, None);
                    }
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
            Some(Expect::Skip(_)) => self.ctx.tracker.info.beginning.store(false, Ordering::Release),
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
        assert_eq!(s.next(), Ok(Some(Piece::Begin(0..1000))));
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
