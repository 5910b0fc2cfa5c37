//! The listeners (TCP and optionally a unix socket), the metrics endpoint,
//! and the process lifecycle: SIGTERM stops accepting and lets sessions
//! finish for `shutdown_timeout`; SIGHUP reloads the configuration.

use crate::state::Shared;
use crate::workers::Accepted;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

/// Query latency buckets, in seconds (0.1 ms .. 10 s).
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

pub async fn run(shared: Arc<Shared>) -> anyhow::Result<()> {
    let config = shared.startup_config.clone();
    if !config.proxy.metrics_listen.is_empty() {
        let addr: std::net::SocketAddr = config
            .proxy
            .metrics_listen
            .parse()
            .map_err(|e| anyhow::anyhow!("bad metrics_listen {}: {e}", config.proxy.metrics_listen))?;
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Full("mtm_proxy_query_duration_seconds".into()), LATENCY_BUCKETS)?
            .install()
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
        describe_metrics();
    }
    let tcp = TcpListener::bind(&config.proxy.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.proxy.listen))?;
    let unix = if config.proxy.unix_socket_dir.is_empty() {
        None
    } else {
        let port = tcp.local_addr()?.port();
        let path = std::path::Path::new(&config.proxy.unix_socket_dir).join(format!(".s.PGSQL.{port}"));
        let _ = std::fs::remove_file(&path);
        Some(UnixListener::bind(&path).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?)
    };
    for node in &shared.router.nodes {
        node.mark_up();
    }
    tokio::spawn(crate::health::run(shared.clone()));
    let workers = crate::workers::Workers::start(config.proxy.worker_threads, &shared)
        .map_err(|e| anyhow::anyhow!("cannot start the session workers: {e}"))?;
    tracing::info!(listen = %config.proxy.listen, nodes = config.nodes.len(), workers = workers.threads(), "mtm-proxy listening");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    if let Err(e) = crate::net::keepalive::enable(&socket, shared.live.load().config.limits.tcp_keepalive) {
                        tracing::warn!(error = %e, %peer, "cannot set TCP keepalive on a client connection");
                    }
                    match socket.into_std() {
                        Ok(s) => workers.hand_over(Accepted::Tcp(s, peer)),
                        Err(e) => tracing::warn!(error = %e, "cannot detach an accepted connection"),
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Ok(socket) => match socket.into_std() {
                    Ok(s) => workers.hand_over(Accepted::Unix(s)),
                    Err(e) => tracing::warn!(error = %e, "cannot detach an accepted connection"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = hup.recv() => {
                if let Err(e) = shared.reload() {
                    tracing::error!("reload failed, the old configuration stays: {e}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    shutdown(&shared, tcp, unix).await;
    Ok(())
}

async fn accept_unix(l: Option<&UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Stop accepting, then wait for sessions to end on their own up to
/// `shutdown_timeout`; whatever is left is closed when the process exits.
async fn shutdown(shared: &Shared, tcp: TcpListener, unix: Option<UnixListener>) {
    drop(tcp);
    drop(unix);
    shared.shutting_down.store(true, Ordering::Relaxed);
    let timeout = shared.live.load().config.proxy.shutdown_timeout;
    tracing::info!(sessions = shared.clients.load(Ordering::Relaxed), "shutting down; waiting up to {timeout:?} for sessions");
    let deadline = tokio::time::Instant::now() + timeout;
    while shared.clients.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.clients.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!(sessions = left, "closing sessions still open");
    }
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("mtm_proxy_client_connections_total", "Client connections accepted");
    describe_gauge!("mtm_proxy_client_sessions", "Client connections open");
    describe_gauge!("mtm_proxy_client_sessions_waiting", "Sessions waiting at the pause gate");
    describe_gauge!("mtm_proxy_transactions_in_flight", "Transactions between their first message and ReadyForQuery idle");
    describe_gauge!("mtm_proxy_paused", "1 while any owner holds the pause gate (new transactions and commits wait)");
    describe_gauge!("mtm_proxy_server_connections", "Open connections to each node");
    describe_gauge!("mtm_proxy_node_up", "1 if the node passes health checks");
    describe_counter!("mtm_proxy_queries_total", "Statements by node and class (Query and Parse messages)");
    describe_counter!("mtm_proxy_transactions_total", "Transactions (and autocommit statements) completed per node");
    describe_histogram!("mtm_proxy_query_duration_seconds", Unit::Seconds, "Time from a request to its ReadyForQuery");
    describe_counter!("mtm_proxy_client_bytes_received_total", Unit::Bytes, "Bytes received from clients");
    describe_counter!("mtm_proxy_client_bytes_sent_total", Unit::Bytes, "Bytes sent to clients");
    describe_counter!("mtm_proxy_errors_total", "Errors sent to clients, by SQLSTATE class");
}
