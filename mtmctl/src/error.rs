//! Launcher errors. Each renders as one line naming the cause and, where a
//! process failed, the log file to read.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} not found: {detail}")]
    MissingBinary { what: String, detail: String },
    #[error("port {port} ({what}) is already in use by another process; pick other ports or stop that process")]
    PortInUse { port: u16, what: String },
    #[error("data directory {path} is owned by {owner}, not {expected}; use another --data-dir")]
    ForeignDataDir { path: PathBuf, owner: String, expected: String },
    #[error("{0}")]
    DataDir(String),
    #[error("{what} failed to start: {reason} (read {log})")]
    StartFailed { what: String, reason: String, log: PathBuf },
    #[error("{what} failed: {reason} (read {log})")]
    CommandFailed { what: String, reason: String, log: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {}", describe_sql_error(source))]
    Sql { what: String, source: postgres::Error },
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { what: what.into(), source }
    }
}

/// postgres::Error displays a server error as just "db error"; say what
/// the server said.
fn describe_sql_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}
