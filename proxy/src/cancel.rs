//! CancelRequest routing. Clients get the proxy's own (pid, secret) pair in
//! BackendKeyData; this registry maps it to the node and backend key the
//! session really uses, so a cancel reaches the right backend and a client
//! cannot cancel sessions it does not know the key of.

use dashmap::DashMap;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: String,
    pub pid: i32,
    pub secret: i32,
}

#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: DashMap<(i32, i32), CancelTarget>,
}

impl CancelRegistry {
    /// Registers a session and returns the key to give its client.
    pub fn register(&self, target: CancelTarget) -> (i32, i32) {
        loop {
            let key = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
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
    /// ignored, as PostgreSQL does.
    pub async fn cancel(&self, key: (i32, i32)) -> bool {
        let Some(t) = self.map.get(&key).map(|e| e.clone()) else {
            return false;
        };
        let mut raw = Vec::with_capacity(16);
        raw.extend_from_slice(&16u32.to_be_bytes());
        raw.extend_from_slice(&crate::startup::CANCEL_REQUEST.to_be_bytes());
        raw.extend_from_slice(&t.pid.to_be_bytes());
        raw.extend_from_slice(&t.secret.to_be_bytes());
        if t.addr.starts_with('/') {
            return match tokio::net::UnixStream::connect(&t.addr).await {
                Ok(mut s) => s.write_all(&raw).await.is_ok(),
                Err(_) => false,
            };
        }
        match tokio::net::TcpStream::connect(&t.addr).await {
            Ok(mut s) => s.write_all(&raw).await.is_ok(),
            Err(_) => false,
        }
    }
}
