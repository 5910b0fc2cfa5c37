//! Session workers: threads that each run a single-threaded tokio runtime
//! and own the sessions handed to them.
//!
//! The listener (on the control runtime, see [`crate::server`]) accepts a
//! connection and hands the socket to the worker with the fewest sessions;
//! the session then lives on that thread to its end, with its client and
//! node sockets registered in that thread's poller. Nothing on a session's
//! path wakes another thread. A work-stealing runtime (tokio's
//! multi-threaded one), measured on the same machine and load, spent more
//! CPU per transaction on waking idle workers and moving tasks between
//! them than the relay itself costs (`bench/RESULTS.md`, hop cost).
//!
//! What sessions share (the router, the pause gate, the configuration,
//! counters) is thread-safe already; tokio's synchronisation types wake a
//! waiter on any runtime.

use crate::net::stream::ClientStream;
use crate::state::{Shared, SocketAddrOrUnix};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A connection accepted by the listener, detached from its runtime.
pub enum Accepted {
    Tcp(std::net::TcpStream, std::net::SocketAddr),
    Unix(std::os::unix::net::UnixStream),
}

pub struct Workers {
    queues: Vec<mpsc::UnboundedSender<Accepted>>,
    /// Live sessions per worker.
    load: Arc<Vec<AtomicUsize>>,
}

impl Workers {
    /// Starts `n` workers (0: one per CPU core).
    pub fn start(n: usize, shared: &Arc<Shared>) -> std::io::Result<Workers> {
        let n = if n == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { n };
        let load: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
        let mut queues = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (shared, load) = (shared.clone(), load.clone());
            std::thread::Builder::new()
                .name(format!("mtm-proxy-w{i}"))
                .spawn(move || rt.block_on(serve(i, rx, shared, load)))?;
            queues.push(tx);
        }
        Ok(Workers { queues, load })
    }

    /// How many session threads there are.
    pub fn threads(&self) -> usize {
        self.queues.len()
    }

    /// Gives a new connection to the least loaded worker.
    pub fn hand_over(&self, accepted: Accepted) {
        let i = least_loaded(self.load.iter().map(|l| l.load(Ordering::Relaxed)));
        // Counted here, not when the worker picks it up, so that a burst of
        // connections spreads over the workers.
        self.load[i].fetch_add(1, Ordering::Relaxed);
        if self.queues[i].send(accepted).is_err() {
            // The worker thread is gone (it panicked): the socket is closed
            // by the drop, the client sees its connection end.
            self.load[i].fetch_sub(1, Ordering::Relaxed);
            tracing::error!(worker = i, "session worker is gone; connection dropped");
        }
    }
}

/// Index of the smallest count (the first of equals).
fn least_loaded(counts: impl Iterator<Item = usize>) -> usize {
    counts.enumerate().min_by_key(|&(i, n)| (n, i)).map_or(0, |(i, _)| i)
}

/// A worker's life: take connections and run each as a session. After the
/// listener is gone the runtime keeps serving the sessions it has until
/// the process exits (the shutdown waits for them, see `server`).
async fn serve(i: usize, mut rx: mpsc::UnboundedReceiver<Accepted>, shared: Arc<Shared>, load: Arc<Vec<AtomicUsize>>) {
    while let Some(accepted) = rx.recv().await {
        let (client, peer) = match attach(accepted) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take over an accepted connection");
                load[i].fetch_sub(1, Ordering::Relaxed);
                continue;
            }
        };
        spawn_session(&shared, client, peer, load.clone(), i);
    }
    std::future::pending::<()>().await
}

/// Registers the socket with this worker's runtime.
fn attach(accepted: Accepted) -> std::io::Result<(ClientStream, SocketAddrOrUnix)> {
    Ok(match accepted {
        Accepted::Tcp(s, peer) => (ClientStream::Tcp(tokio::net::TcpStream::from_std(s)?), SocketAddrOrUnix::Tcp(peer)),
        Accepted::Unix(s) => (ClientStream::Unix(tokio::net::UnixStream::from_std(s)?), SocketAddrOrUnix::Unix),
    })
}

fn spawn_session(shared: &Arc<Shared>, client: ClientStream, peer: SocketAddrOrUnix, load: Arc<Vec<AtomicUsize>>, worker: usize) {
    let shared = shared.clone();
    shared.clients.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("mtm_proxy_client_connections_total").increment(1);
    metrics::gauge!("mtm_proxy_client_sessions").increment(1.0);
    tokio::spawn(async move {
        // The session is its own task: a panic in it (a bug) must not take
        // the counters with it.
        let s = shared.clone();
        let result = tokio::spawn(async move { crate::session::run(client, peer, s).await }).await;
        if let Err(e) = result {
            tracing::error!("session task failed: {e}");
        }
        shared.clients.fetch_sub(1, Ordering::Relaxed);
        load[worker].fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("mtm_proxy_client_sessions").decrement(1.0);
    });
}

#[cfg(test)]
mod tests {
    use super::least_loaded;

    #[test]
    fn a_new_session_goes_to_the_worker_with_fewest() {
        assert_eq!(least_loaded([3, 1, 2].into_iter()), 1);
        assert_eq!(least_loaded([2, 2, 2].into_iter()), 0, "ties go to the first");
        assert_eq!(least_loaded([0].into_iter()), 0);
    }
}
