//! CancelRequest routing. Clients get their backend's pid with a secret
//! of the proxy's in BackendKeyData; this registry maps that pair to the
//! node and backend key the session really uses, so a cancel reaches the
//! right backend and a client cannot cancel sessions it does not know the
//! key of.

use dashmap::DashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: String,
    pub pid: i32,
    pub secret: i32,
    /// The session: while the proxy runs the cluster's commit of its
    /// transaction, a cancel is not passed on — PostgreSQL does not let
    /// one interrupt a commit, and the votes' wait would roll it back.
    pub session: Arc<crate::state::SessionInfo>,
}

/// Longest wait for a node to close a cancel connection (it does once it
/// has signalled the backend).
const CANCEL_DONE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest wait for the answer to the proxy's BEGIN before a cancel goes
/// out ([`crate::state::SessionInfo::beginning`]).
const BEGIN_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: DashMap<(i32, i32), CancelTarget>,
}

impl CancelRegistry {
    /// Registers a session and returns the key to give its client: the
    /// pid of its backend on its node — what `pg_backend_pid()`,
    /// `pg_stat_activity` and notifications from it say there — with a
    /// secret of the proxy's. Backends of two nodes may share a pid; their
    /// secrets keep the keys apart.
    pub fn register(&self, target: CancelTarget) -> (i32, i32) {
        loop {
            let key = (target.pid, rand::random::<i32>());
            if let dashmap::Entry::Vacant(e) = self.map.entry(key) {
                e.insert(target);
                return key;
            }
        }
    }

    pub fn remove(&self, key: (i32, i32)) {
        self.map.remove(&key);
    }

    /// Forwards a cancel for `key` if it is known; unknown keys are
    /// ignored, as PostgreSQL does. Returns once the node has closed the
    /// cancel connection, as PostgreSQL's postmaster does once it has
    /// signalled the backend: the client, which waits for the proxy to
    /// close its own (libpq's PQcancel does), then knows the cancel has
    /// landed, and it cannot hit the statement the client sends next.
    pub async fn cancel(&self, key: (i32, i32)) -> bool {
        let Some(t) = self.map.get(&key).map(|e| e.clone()) else {
            return false;
        };
        if t.session.committing.load(Ordering::Relaxed) {
            return false;
        }
        // Past the proxy's BEGIN, so the cancel reaches the client's
        // statement behind it; bounded, should the node never answer.
        let deadline = tokio::time::Instant::now() + BEGIN_ANSWER_WAIT;
        while t.session.beginning.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let mut raw = Vec::with_capacity(16);
        raw.extend_from_slice(&16u32.to_be_bytes());
        raw.extend_from_slice(&crate::startup::CANCEL_REQUEST.to_be_bytes());
        raw.extend_from_slice(&t.pid.to_be_bytes());
        raw.extend_from_slice(&t.secret.to_be_bytes());
        if t.addr.starts_with('/') {
            return match tokio::net::UnixStream::connect(&t.addr).await {
                Ok(s) => send_and_wait(s, &raw).await,
                Err(_) => false,
            };
        }
        match tokio::net::TcpStream::connect(&t.addr).await {
            Ok(s) => send_and_wait(s, &raw).await,
            Err(_) => false,
        }
    }
}

/// Writes the CancelRequest `raw` and waits (bounded) until the node
/// closes the connection.
async fn send_and_wait<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, raw: &[u8]) -> bool {
    if s.write_all(raw).await.is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(CANCEL_DONE_WAIT, s.read(&mut byte)).await;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SessionInfo;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
    use std::time::Instant;

    fn session() -> Arc<SessionInfo> {
        Arc::new(SessionInfo {
            id: 1,
            client: "client".into(),
            user: "user".into(),
            database: "db".into(),
            node: "node1".into(),
            started: Instant::now(),
            state: AtomicU8::new(0),
            queries: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            committing: AtomicBool::new(false),
            beginning: AtomicBool::new(false),
        })
    }

    /// A cancel that comes while the proxy's BEGIN in front of the
    /// client's statement is unanswered reaches the node only after it
    /// has answered: it then interrupts the statement, not the BEGIN.
    #[tokio::test]
    async fn a_cancel_waits_until_the_proxys_begin_has_answered() {
        let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = node.local_addr().unwrap().to_string();
        let info = session();
        info.beginning.store(true, Ordering::Release);
        let registry = CancelRegistry::default();
        let key = registry.register(CancelTarget { addr, pid: 7, secret: 9, session: info.clone() });
        let answered_at = Arc::new(std::sync::Mutex::new(None));
        let answered = answered_at.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            *answered.lock().unwrap() = Some(Instant::now());
            info.beginning.store(false, Ordering::Release);
        });
        let received = tokio::spawn(async move {
            let (mut s, _) = node.accept().await.unwrap();
            let mut request = [0u8; 16];
            s.read_exact(&mut request).await.unwrap();
            (Instant::now(), request)
        });
        assert!(registry.cancel(key).await);
        let (at, request) = received.await.unwrap();
        let answered = answered_at.lock().unwrap().expect("the BEGIN answered");
        assert!(at >= answered, "the cancel reached the node before the BEGIN had answered");
        assert_eq!(&request[8..12], &7i32.to_be_bytes());
        assert_eq!(&request[12..16], &9i32.to_be_bytes());
    }
}
