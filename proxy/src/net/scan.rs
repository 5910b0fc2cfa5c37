//! Follows backend (server → client) messages as they stream through, so
//! the proxy can forward whatever a read returned in one write — a 100 MB
//! DataRow is never buffered whole — while still seeing each
//! ReadyForQuery's transaction status and each ErrorResponse's SQLSTATE.

/// What one chunk contained that the session cares about.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Transaction status byte of each ReadyForQuery ('I', 'T' or 'E').
    pub ready: Vec<u8>,
    /// SQLSTATE of each ErrorResponse.
    pub errors: Vec<String>,
}

/// ErrorResponse bodies are kept up to this size to find the SQLSTATE
/// (field 'C' comes early; the message text may be long).
const ERROR_CAPTURE: usize = 512;

#[derive(Debug)]
enum State {
    /// Reading the 5-byte header; `have` bytes of it so far.
    Header { hdr: [u8; 5], have: usize },
    /// Inside a body with `remaining` bytes to go.
    Body { tag: u8, remaining: usize, captured: Vec<u8> },
}

#[derive(Debug)]
pub struct BackendScanner {
    state: State,
}

impl Default for BackendScanner {
    fn default() -> Self {
        BackendScanner { state: State::Header { hdr: [0; 5], have: 0 } }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("server sent a message with invalid length {0}")]
pub struct BadServerLength(pub u32);

impl BackendScanner {
    /// True when the stream is between messages.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    pub fn feed(&mut self, mut data: &[u8], ev: &mut Events) -> Result<(), BadServerLength> {
        while !data.is_empty() {
            match &mut self.state {
                State::Header { hdr, have } => {
                    let take = (5 - *have).min(data.len());
                    hdr[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data = &data[take..];
                    if *have == 5 {
                        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
                        if len < 4 {
                            return Err(BadServerLength(len));
                        }
                        let tag = hdr[0];
                        let remaining = len as usize - 4;
                        self.state = State::Body { tag, remaining, captured: Vec::new() };
                        if remaining == 0 {
                            self.finish(ev);
                        }
                    }
                }
                State::Body { tag, remaining, captured } => {
                    let take = (*remaining).min(data.len());
                    let want = match tag {
                        b'Z' => 1,
                        b'E' => ERROR_CAPTURE,
                        _ => 0,
                    };
                    if captured.len() < want {
                        let n = (want - captured.len()).min(take);
                        captured.extend_from_slice(&data[..n]);
                    }
                    *remaining -= take;
                    data = &data[take..];
                    if *remaining == 0 {
                        self.finish(ev);
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self, ev: &mut Events) {
        if let State::Body { tag, captured, .. } = std::mem::replace(&mut self.state, State::Header { hdr: [0; 5], have: 0 }) {
            match tag {
                b'Z' => ev.ready.push(captured.first().copied().unwrap_or(b'I')),
                b'E' => ev.errors.push(sqlstate(&captured).unwrap_or_else(|| "XX000".into())),
                _ => {}
            }
        }
    }
}

/// The 'C' field (SQLSTATE) of an ErrorResponse/NoticeResponse body.
pub fn sqlstate(body: &[u8]) -> Option<String> {
    error_field(body, b'C')
}

/// One field of an ErrorResponse/NoticeResponse body ('M' message, ...).
pub fn error_field(body: &[u8], field: u8) -> Option<String> {
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if code == field {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        crate::net::frame::frame(tag, body).to_vec()
    }

    #[test]
    fn sees_statuses_and_sqlstates_across_any_split() {
        let mut wire = msg(b'D', &vec![7u8; 3000]);
        wire.extend(msg(b'E', b"SERROR\0VERROR\0C42P01\0Mrelation does not exist\0\0"));
        wire.extend(msg(b'Z', b"E"));
        wire.extend(msg(b'C', b"SELECT 1\0"));
        wire.extend(msg(b'Z', b"I"));
        for chunk in [1usize, 2, 3, 7, 64, 5000] {
            let mut s = BackendScanner::default();
            let mut ev = Events::default();
            for part in wire.chunks(chunk) {
                s.feed(part, &mut ev).unwrap();
            }
            assert_eq!(ev.ready, b"EI", "chunk {chunk}");
            assert_eq!(ev.errors, vec!["42P01".to_string()]);
            assert!(s.at_boundary());
        }
    }

    #[test]
    fn mid_message_is_not_a_boundary() {
        let mut s = BackendScanner::default();
        let mut ev = Events::default();
        s.feed(&msg(b'D', b"abcdef")[..7], &mut ev).unwrap();
        assert!(!s.at_boundary());
    }

    #[test]
    fn bad_length_is_an_error() {
        let mut s = BackendScanner::default();
        assert_eq!(s.feed(&[b'Z', 0, 0, 0, 2], &mut Events::default()), Err(BadServerLength(2)));
    }

    #[test]
    fn sqlstate_parsing() {
        assert_eq!(sqlstate(b"SFATAL\0C28P01\0Mno\0\0").as_deref(), Some("28P01"));
        assert_eq!(sqlstate(b"SFATAL\0Mno\0\0"), None);
        assert_eq!(sqlstate(b"SFATAL"), None);
    }
}
