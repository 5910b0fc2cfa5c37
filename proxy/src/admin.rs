//! The admin console: a virtual database (`proxy.admin_database`, "mtm")
//! that speaks the simple query protocol and answers
//! `SHOW NODES | SESSIONS | STATS | CONFIG`, `PAUSE`, `RESUME`, `RELOAD`.
//! It owns the console's pause: one hold on the pause gate shared by all
//! console sessions, which RESUME releases without touching other owners'.

use crate::net::frame::{query_text, FrameIoError, FrameReader};
use crate::net::messages::{self, PgError};
use crate::net::stream::ClientStream;
use crate::state::{session_state, Shared};
use bytes::BytesMut;
use std::sync::atomic::Ordering;
use tokio::io::AsyncWriteExt;

const PARAMS: &[(&str, &str)] = &[
    ("server_version", "15.0 (mtm-proxy admin console)"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
];

pub async fn run(mut client: ClientStream, user: &str, shared: &Shared) {
    let mut hello = BytesMut::new();
    for (k, v) in PARAMS {
        hello.extend_from_slice(&messages::parameter_status(k, v));
    }
    hello.extend_from_slice(&messages::backend_key_data(0, 0));
    hello.extend_from_slice(&messages::ready_for_query(b'I'));
    if client.write_all(&hello).await.is_err() {
        return;
    }
    tracing::info!(user, "admin console session");
    let mut reader = FrameReader::new(1 << 20);
    loop {
        let batch = match reader.next_batch(&mut client).await {
            Ok(Some(b)) => b,
            Ok(None) | Err(FrameIoError::Io(_)) => return,
            Err(FrameIoError::Frame(e)) => {
                let _ = client.write_all(&PgError::fatal("08P01", e.to_string()).encode()).await;
                return;
            }
        };
        for f in &batch.frames {
            let reply = match f.tag {
                b'Q' => match query_text(batch.body(f)) {
                    Ok(sql) => {
                        let mut out = execute(&sql, shared).await.unwrap_or_else(|e| e.encode());
                        out.extend_from_slice(&messages::ready_for_query(b'I'));
                        out
                    }
                    Err(e) => {
                        let _ = client.write_all(&PgError::fatal("08P01", e.to_string()).encode()).await;
                        return;
                    }
                },
                b'X' => return,
                b'S' => {
                    let mut out = PgError::error("0A000", "the admin console speaks only the simple query protocol").encode();
                    out.extend_from_slice(&messages::ready_for_query(b'I'));
                    out
                }
                _ => continue,
            };
            if client.write_all(&reply).await.is_err() {
                return;
            }
        }
    }
}

/// Runs one admin command and returns its result messages.
pub async fn execute(sql: &str, shared: &Shared) -> Result<BytesMut, PgError> {
    let words: Vec<String> =
        sql.trim().trim_end_matches(';').split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW", "NODES"] => Ok(show_nodes(shared)),
        ["SHOW", "SESSIONS"] => Ok(show_sessions(shared)),
        ["SHOW", "STATS"] => Ok(show_stats(shared)),
        ["SHOW", "CONFIG"] => Ok(show_config(shared)),
        ["PAUSE"] => {
            let timeout = shared.live.load().config.proxy.pause_timeout;
            match shared.pause.pause(ADMIN_OWNER, timeout).await {
                Ok(hold) => {
                    // Console sessions share one pause: a second PAUSE
                    // replaces the first, so one RESUME undoes both.
                    let earlier = lock(&shared.admin_pause).replace(hold);
                    drop(earlier);
                    tracing::info!("paused by the admin console: new transactions and commits wait");
                    metrics::gauge!("mtm_proxy_paused").set(1.0);
                    Ok(messages::command_complete("PAUSE"))
                }
                Err(e) => Err(PgError::error("57014", format!("PAUSE gave up: {e}"))
                    .with_hint("Raise proxy.pause_timeout or retry when the commits under way are done.")),
            }
        }
        ["RESUME"] => {
            let Some(hold) = lock(&shared.admin_pause).take() else {
                return Err(PgError::error("55000", "the admin console holds no pause")
                    .with_hint(held_by(shared)));
            };
            drop(hold);
            let others = shared.pause.owners();
            if others.is_empty() {
                metrics::gauge!("mtm_proxy_paused").set(0.0);
                tracing::info!("resumed");
            } else {
                tracing::info!(?others, "the admin console's pause is released; others still hold the gate");
            }
            Ok(messages::command_complete("RESUME"))
        }
        ["RELOAD"] => match shared.reload() {
            Ok(()) => Ok(messages::command_complete("RELOAD")),
            Err(e) => Err(PgError::error("F0000", format!("reload failed, the old configuration stays: {e}"))),
        },
        [] => Ok(BytesMut::from(&[b'I', 0, 0, 0, 4][..])),
        _ => Err(PgError::error("42601", format!("unsupported admin command: {}", sql.trim()))
            .with_hint("Commands: SHOW NODES | SESSIONS | STATS | CONFIG, PAUSE, RESUME, RELOAD.")),
    }
}

/// The owner name of the console's pause, as SHOW STATS lists it.
pub const ADMIN_OWNER: &str = "admin console";

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn held_by(shared: &Shared) -> String {
    match shared.pause.owners() {
        owners if owners.is_empty() => "The proxy is not paused.".to_string(),
        owners => format!("The gate is held by: {}; each owner releases only its own pause.", owners.join(", ")),
    }
}

fn show_nodes(shared: &Shared) -> BytesMut {
    let rows: Vec<Vec<String>> = shared
        .router
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.config.name.clone(),
                n.config.host.clone(),
                n.config.port.to_string(),
                if n.is_up() { "up" } else { "down" }.to_string(),
                n.sessions().to_string(),
                n.last_error(),
            ]
        })
        .collect();
    messages::result_set(&["name", "host", "port", "state", "sessions", "last_error"], &rows)
}

fn show_sessions(shared: &Shared) -> BytesMut {
    let mut rows: Vec<(u64, Vec<String>)> = shared
        .sessions
        .iter()
        .map(|e| {
            let s = e.value();
            (
                s.id,
                vec![
                    s.id.to_string(),
                    s.client.clone(),
                    s.user.clone(),
                    s.database.clone(),
                    s.node.clone(),
                    session_state::name(s.state.load(Ordering::Relaxed)).to_string(),
                    s.started.elapsed().as_secs().to_string(),
                    s.queries.load(Ordering::Relaxed).to_string(),
                    s.transactions.load(Ordering::Relaxed).to_string(),
                ],
            )
        })
        .collect();
    rows.sort_by_key(|(id, _)| *id);
    let rows: Vec<Vec<String>> = rows.into_iter().map(|(_, r)| r).collect();
    messages::result_set(
        &["id", "client", "user", "database", "node", "state", "age_s", "queries", "transactions"],
        &rows,
    )
}

fn show_stats(shared: &Shared) -> BytesMut {
    let t = &shared.totals;
    let mut rows = vec![
        ("clients_connected", shared.clients.load(Ordering::Relaxed) as u64),
        ("sessions_total", t.sessions.load(Ordering::Relaxed)),
        ("transactions_total", t.transactions.load(Ordering::Relaxed)),
        ("queries_total", t.queries.load(Ordering::Relaxed)),
        ("errors_total", t.errors.load(Ordering::Relaxed)),
        ("bytes_received_total", t.bytes_in.load(Ordering::Relaxed)),
        ("bytes_sent_total", t.bytes_out.load(Ordering::Relaxed)),
        ("transactions_in_flight", shared.pause.in_flight() as u64),
        ("sessions_waiting", shared.pause.waiting() as u64),
        ("paused", shared.pause.is_paused() as u64),
        ("commits_in_progress", shared.pause.committing() as u64),
    ];
    let class_names = crate::classify::StatementClass::ALL.map(|c| c.as_str());
    let by_class: Vec<(String, u64)> = class_names
        .iter()
        .zip(&t.by_class)
        .map(|(name, v)| (format!("statements_{name}_total"), v.load(Ordering::Relaxed)))
        .collect();
    let mut out: Vec<Vec<String>> = rows.drain(..).map(|(k, v)| vec![k.to_string(), v.to_string()]).collect();
    out.extend(by_class.into_iter().map(|(k, v)| vec![k, v.to_string()]));
    out.push(vec!["paused_by".to_string(), shared.pause.owners().join(", ")]);
    messages::result_set(&["stat", "value"], &out)
}

fn show_config(shared: &Shared) -> BytesMut {
    messages::result_set(&["key", "value"], &config_rows(&shared.live.load().config))
}

/// The configuration as (key, value) rows, secrets redacted.
fn config_rows(config: &crate::config::Config) -> Vec<Vec<String>> {
    let value = toml::Value::try_from(config).unwrap_or(toml::Value::Table(Default::default()));
    let mut rows = Vec::new();
    flatten("", &value, &mut rows);
    for row in &mut rows {
        if is_secret(&row[0]) {
            row[1] = REDACTED.to_string();
        }
    }
    rows
}

/// Shown instead of a secret: the reader learns the key is set, not its value.
const REDACTED: &str = "********";

/// Whether a flattened key names a secret. Judged by name rather than by a
/// list of known keys so that a secret added to the configuration later is
/// hidden without anyone remembering this console; paths to key or users
/// files (`*_file`) are not secrets themselves.
fn is_secret(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    let last = last.split('[').next().unwrap_or(&last);
    if last.ends_with("_file") {
        return false;
    }
    ["password", "secret", "token", "passphrase"].iter().any(|w| last.contains(w))
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<Vec<String>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        toml::Value::Array(items) if items.iter().all(|i| i.is_table()) && !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, out);
            }
        }
        toml::Value::String(s) => out.push(vec![prefix.to_string(), s.clone()]),
        other => out.push(vec![prefix.to_string(), other.to_string()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised_by_name_and_paths_are_not() {
        for key in ["backend.password", "auth.secret", "x.api_token", "tls.key_passphrase", "a[0].Password"] {
            assert!(is_secret(key), "{key}");
        }
        for key in ["tls.key_file", "auth.users_file", "backend.tls_ca_file", "proxy.listen", "backend.health_user"] {
            assert!(!is_secret(key), "{key}");
        }
    }

    #[test]
    fn the_backend_password_is_listed_but_not_shown() {
        let mut cfg = crate::config::Config::example();
        cfg.backend.password = Some("hunter2".into());
        cfg.tls.key_file = Some("/etc/mtm/key.pem".into());
        let rows = config_rows(&cfg);
        assert!(rows.iter().all(|r| !r[1].contains("hunter2")), "{rows:?}");
        assert!(rows.contains(&vec!["backend.password".to_string(), REDACTED.to_string()]), "{rows:?}");
        assert!(rows.contains(&vec!["tls.key_file".to_string(), "/etc/mtm/key.pem".to_string()]), "{rows:?}");
    }
}
