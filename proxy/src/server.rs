//! The client listener: accepts TCP connections and runs one
//! [`session`](crate::session) task per client.

use crate::config::Config;
use std::sync::Arc;
use tokio::net::TcpListener;

pub async fn run(config: Arc<Config>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&config.proxy.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.proxy.listen))?;
    if !config.proxy.metrics_listen.is_empty() {
        let addr: std::net::SocketAddr = config
            .proxy
            .metrics_listen
            .parse()
            .map_err(|e| anyhow::anyhow!("bad metrics_listen {}: {e}", config.proxy.metrics_listen))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    }
    tracing::info!(listen = %config.proxy.listen, nodes = config.nodes.len(), "mtm-proxy listening");
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let config = config.clone();
        metrics::counter!("mtm_proxy_client_connections_total").increment(1);
        tokio::spawn(async move {
            let active = metrics::gauge!("mtm_proxy_client_sessions_active");
            active.increment(1.0);
            if let Err(e) = crate::session::run(socket, config).await {
                tracing::info!(%peer, error = %e, "session ended with an error");
            }
            active.decrement(1.0);
        });
    }
}
