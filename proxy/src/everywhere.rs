//! Statements PostgreSQL refuses inside a transaction block — VACUUM,
//! CREATE/DROP INDEX CONCURRENTLY, REINDEX, CLUSTER, CREATE/ALTER/DROP
//! DATABASE, ALTER SYSTEM — cannot travel inside the cluster's 2PC like
//! other DDL, so the proxy runs them on every node in turn: first on each
//! other node (in node order) over a short-lived session opened as the
//! client's user, then on the session's own node, whose answer is the one
//! the client gets. If one node fails, the client gets that node's error
//! (its SQLSTATE, the node named in the message), and the statement is not
//! run on the nodes after it, nor on the client's own node; the nodes it
//! already ran on are named in the hint (a CREATE INDEX CONCURRENTLY there
//! is done; drop it or retry the statement, which `IF NOT EXISTS` makes
//! safe).
//!
//! Only the simple protocol is handled: that is how psql, pgbench and
//! migration tools send these statements.

use crate::backend::{self, NodeAuth};
use crate::net::frame::{frame, read_one};
use crate::net::messages;
use crate::net::scan::error_field;
use crate::net::stream::ClientStream;
use crate::state::Shared;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

/// How the proxy opens extra sessions as the client's user.
#[derive(Debug, Clone, Default)]
pub struct SideLogin {
    /// The startup parameters the session's node got (user, database, options).
    pub params: Vec<(String, String)>,
    pub user: String,
    /// The password the proxy knows for the user, if any (none in
    /// passthrough mode unless `backend.password` is set).
    pub password: Option<String>,
}

/// A node's answers are small; bound them anyway.
const ANSWER_LIMIT: usize = 1 << 20;

/// Runs `sql` on every configured node but `home` (an index into the
/// router's nodes). On failure, the ErrorResponse for the client.
/// `bytewise`: `sql` was read one char per byte from a client encoding
/// that is not UTF-8 (`net::frame::sql_text`), and goes out as those
/// bytes — never re-encoded into a different statement.
pub async fn run_on_others(shared: &Shared, side: &SideLogin, home: usize, sql: &str, bytewise: bool) -> Result<(), BytesMut> {
    let shown: String = {
        let one_line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        if one_line.chars().count() > 60 { format!("{}…", one_line.chars().take(60).collect::<String>()) } else { one_line }
    };
    let mut done: Vec<String> = Vec::new();
    for (i, node) in shared.router.nodes.iter().enumerate() {
        if i == home {
            continue;
        }
        let name = node.config.name.clone();
        if let Err((code, message)) = run_on(shared, side, i, sql, bytewise).await {
            let hint = if done.is_empty() {
                "It was not run on any node.".to_string()
            } else {
                format!("It already ran on {}; it was not run on the other nodes.", done.join(", "))
            };
            return Err(messages::error_response(&code, &format!("\"{shown}\" failed on node {name}: {message}"), Some(&hint)));
        }
        done.push(name);
    }
    Ok(())
}

/// One node: connect, run, read the answer up to ReadyForQuery.
async fn run_on(shared: &Shared, side: &SideLogin, idx: usize, sql: &str, bytewise: bool) -> Result<(), (String, String)> {
    let node = &shared.router.nodes[idx].config;
    let live = shared.live.load();
    let auth: NodeAuth<ClientStream> = NodeAuth::Password { user: &side.user, password: side.password.as_deref() };
    let mut conn = backend::connect(&node.addr(), &node.host, &shared.backend, &live.config.limits, &side.params, auth)
        .await
        .map_err(|e| ("57P03".to_string(), format!("cannot open a session there: {e}")))?;
    let mut body = crate::net::frame::sql_bytes(sql, bytewise);
    body.push(0);
    let io = |e: std::io::Error| ("08006".to_string(), format!("connection lost: {e}"));
    conn.stream.write_all(&frame(b'Q', &body)).await.map_err(io)?;
    let mut error = None;
    loop {
        let (tag, body) = read_one(&mut conn.stream, ANSWER_LIMIT).await.map_err(|e| ("08006".to_string(), format!("connection lost: {e}")))?;
        match tag {
            b'E' if error.is_none() => {
                let code = error_field(&body, b'C').unwrap_or_else(|| "XX000".into());
                error = Some((code, error_field(&body, b'M').unwrap_or_default()));
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = conn.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    error.map_or(Ok(()), Err)
}
