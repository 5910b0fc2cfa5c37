//! Background health checks: every `routing.health_check_interval`, each
//! node is asked for a real session (startup + authentication as
//! `backend.health_user`, exactly what a client session does) within
//! `health_check_timeout`. Success marks it up; no answer, or a refusal
//! with class 57P (starting up, shutting down), marks it down.

use crate::backend::{self, ConnectError, NodeAuth};
use crate::state::Shared;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

pub async fn run(shared: Arc<Shared>) {
    loop {
        let live = shared.live.load_full();
        let routing = &live.config.routing;
        let params = vec![
            ("user".to_string(), live.config.backend.health_user.clone()),
            ("database".to_string(), live.config.backend.health_database.clone()),
            ("application_name".to_string(), "mtm-proxy health check".to_string()),
        ];
        let checks = shared.router.nodes.iter().map(|node| {
            let params = params.clone();
            let shared = shared.clone();
            let node = node.clone();
            let timeout = routing.health_check_timeout;
            let limits = live.config.limits.clone();
            let password = live.config.backend.password.clone();
            async move {
                let user = params[0].1.clone();
                let auth: NodeAuth<'_, tokio::io::Empty> = NodeAuth::Password { user: &user, password: password.as_deref() };
                let addr = node.config.addr();
                let fut = backend::connect(&addr, &node.config.host, &shared.backend, &limits, &params, auth);
                match tokio::time::timeout(timeout, fut).await {
                    Ok(Ok(mut conn)) => {
                        let _ = conn.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
                        node.mark_up();
                    }
                    // Starting up, shutting down, in recovery: no sessions now.
                    Ok(Err(ConnectError::Refused { code, message, .. })) if code.starts_with("57P") => {
                        node.mark_down(&format!("{code}: {message}"))
                    }
                    // The node answered, so it is up; the refusal (a wrong
                    // health_user password, say) is configuration, shown in
                    // SHOW NODES, and clients get the node's own error.
                    Ok(Err(ConnectError::Refused { code, message, .. })) => node.mark_up_with_warning(&format!("{code}: {message}")),
                    Ok(Err(e)) => node.mark_down(&e.to_string()),
                    Err(_) => node.mark_down(&format!("health check timed out after {timeout:?}")),
                }
            }
        });
        // Concurrently: one slow node does not delay the others.
        let mut set = tokio::task::JoinSet::new();
        for check in checks {
            set.spawn(check);
        }
        while set.join_next().await.is_some() {}
        // Keep the pause gauges current without touching the hot path.
        metrics::gauge!("mtm_proxy_client_sessions_waiting").set(shared.pause.waiting() as f64);
        metrics::gauge!("mtm_proxy_transactions_in_flight").set(shared.pause.in_flight() as f64);
        metrics::gauge!("mtm_proxy_paused").set(if shared.pause.is_paused() { 1.0 } else { 0.0 });
        tokio::time::sleep(routing.health_check_interval).await;
    }
}

