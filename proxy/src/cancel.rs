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
