//! One PostgreSQL node of a local cluster: created with initdb and the
//! settings of `conf/node.conf`, started and stopped with pg_ctl (as the
//! `postgres` user when we are root), queried over TCP.

use crate::error::{Error, Result};
use crate::host::{pid_alive, Host};
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// The settings every node needs; see the comments in the file.
pub const NODE_CONF: &str = include_str!("../../conf/node.conf");

/// How long a start waits for a crashed node's old processes to be gone.
const LEFTOVERS_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// How long `pg_ctl start` may wait for a node to accept connections.
const START_TIMEOUT_SECS: u32 = 60;

#[derive(Debug, Clone)]
pub struct Node {
    pub id: usize,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// Directory of the node's unix socket (the cluster's data directory).
    pub socket_dir: PathBuf,
    /// The replicated database.
    pub database: String,
}

impl Node {
    pub fn name(&self) -> String {
        format!("node{}", self.id)
    }

    pub fn is_initialised(&self) -> bool {
        self.dir.join("PG_VERSION").is_file()
    }

    /// The postmaster's pid, if it is running.
    pub fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        pid_alive(pid).then_some(pid)
    }

    /// initdb plus our settings. Never called on an initialised node.
    pub fn init(&self, host: &Host) -> Result<()> {
        let out = host
            .pg_command("initdb")
            .arg("-D")
            .arg(&self.dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-instructions"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("cannot run initdb", e))?;
        std::fs::write(&self.log, [&out.stdout[..], &out.stderr[..]].concat())
            .map_err(|e| Error::io(format!("cannot write {}", self.log.display()), e))?;
        host.give(&self.log)?;
        if !out.status.success() {
            return Err(Error::CommandFailed {
                what: format!("initdb of {}", self.name()),
                reason: last_line(&String::from_utf8_lossy(&out.stderr)),
                log: self.log.clone(),
            });
        }
        let conf = self.dir.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| Error::io(format!("cannot open {}", conf.display()), e))?;
        write!(
            f,
            "\n# ---- added by mtmctl (from conf/node.conf) ----\n{NODE_CONF}\n\
             port = {}\nunix_socket_directories = '{}'\ncluster_name = 'mtm-{}'\nmultimaster.database = '{}'\n",
            self.port,
            self.socket_dir.display(),
            self.name(),
            self.database.replace('\'', "''")
        )
        .map_err(|e| Error::io(format!("cannot write {}", conf.display()), e))?;
        Ok(())
    }

    /// Starts the node and waits until it accepts connections. Right after
    /// a crash (kill -9 of the postmaster) its old processes linger for a
    /// moment — the postmaster until it is reaped, its children until they
    /// notice — and PostgreSQL refuses to start while they do: that is
    /// waited out (up to [`LEFTOVERS_WAIT`]) rather than reported.
    pub fn start(&self, host: &Host) -> Result<()> {
        let deadline = std::time::Instant::now() + LEFTOVERS_WAIT;
        loop {
            match self.start_once(host) {
                Err(Error::StartFailed { reason, .. })
                    if std::time::Instant::now() < deadline && (reason.contains("already exists") || reason.contains("still in use")) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
                done => return done,
            }
        }
    }

    fn start_once(&self, host: &Host) -> Result<()> {
        crate::host::check_port_free(self.port, &self.name())?;
        // The previous run's log is kept; pg_ctl appends.
        let out = host
            .pg_command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", &START_TIMEOUT_SECS.to_string()])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("cannot run pg_ctl", e))?;
        if !out.status.success() {
            return Err(Error::StartFailed {
                what: self.name(),
                reason: self.failure_reason(&out.stderr),
                log: self.log.clone(),
            });
        }
        Ok(())
    }

    /// Stops the node: `fast` (roll back sessions, checkpoint) or
    /// `immediate` (crash-like, for tests).
    pub fn stop(&self, host: &Host, mode: &str) -> Result<()> {
        if self.pid().is_none() {
            return Ok(());
        }
        let out = host
            .pg_command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", mode, "-w", "-t", "60"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("cannot run pg_ctl", e))?;
        if !out.status.success() && self.pid().is_some() {
            return Err(Error::CommandFailed {
                what: format!("stopping {}", self.name()),
                reason: last_line(&String::from_utf8_lossy(&out.stderr)),
                log: self.log.clone(),
            });
        }
        Ok(())
    }

    /// Sends SIGKILL to the postmaster (a crash, for failure tests) and
    /// waits until the process is gone, zombie included: PostgreSQL refuses
    /// to start while the old pid still answers kill(pid, 0).
    pub fn kill9(&self) {
        if let Some(pid) = self.pid() {
            let p = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            wait_for(Duration::from_secs(30), || nix::sys::signal::kill(p, None).is_err().then_some(()));
        }
    }

    pub fn conninfo(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=10", self.port)
    }

    /// An administrator's session on the node: it may write to replicated
    /// tables directly (`multimaster.direct_writes`), which a node refuses
    /// to sessions that do not come through the proxy.
    pub fn admin_conninfo(&self, dbname: &str) -> String {
        format!("{} options='-c multimaster.direct_writes=on'", self.conninfo(dbname))
    }

    /// Connects to the replicated database as [`Node::admin_conninfo`].
    pub fn connect(&self) -> Result<postgres::Client> {
        postgres::Client::connect(&self.admin_conninfo(&self.database), postgres::NoTls)
            .map_err(|e| Error::Sql { what: format!("cannot connect to {}", self.name()), source: e })
    }

    /// Creates the replicated database on this node if it does not exist
    /// (`postgres` always does). The node's workers connect to it as soon
    /// as it is there.
    pub fn create_database(&self) -> Result<()> {
        if self.database == "postgres" {
            return Ok(());
        }
        let sql_err = |e| Error::Sql { what: format!("cannot create database {} on {}", self.database, self.name()), source: e };
        let mut c = postgres::Client::connect(&self.admin_conninfo("postgres"), postgres::NoTls)
            .map_err(|e| Error::Sql { what: format!("cannot connect to {}", self.name()), source: e })?;
        let exists = c.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&self.database]).map_err(sql_err)?.is_some();
        if !exists {
            let quoted = format!("\"{}\"", self.database.replace('"', "\"\""));
            c.batch_execute(&format!("CREATE DATABASE {quoted}")).map_err(sql_err)?;
        }
        Ok(())
    }

    /// Why a start failed: the server log's last FATAL/PANIC message (with
    /// the line before it from the same process, which often names the bad
    /// setting), else what pg_ctl said.
    fn failure_reason(&self, pg_ctl_stderr: &[u8]) -> String {
        if let Ok(log) = std::fs::read_to_string(&self.log) {
            if let Some(reason) = fatal_reason(&log) {
                return reason;
            }
        }
        last_line(&String::from_utf8_lossy(pg_ctl_stderr))
    }
}

/// `"... [pid] LOG:  bad value\n... [pid] FATAL:  file contains errors"` →
/// `"bad value; file contains errors"`.
fn fatal_reason(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().collect();
    let i = lines.iter().rposition(|l| l.contains("FATAL:") || l.contains("PANIC:"))?;
    let (pid, fatal) = split_log_line(lines[i])?;
    let mut reason = fatal.to_string();
    if i > 0 {
        if let Some((prev_pid, prev)) = split_log_line(lines[i - 1]) {
            if prev_pid == pid {
                reason = format!("{prev}; {reason}");
            }
        }
    }
    Some(reason)
}

/// A line of our `log_line_prefix` (`%m [%p] ...LEVEL:  message`) as (pid, message).
fn split_log_line(line: &str) -> Option<(&str, &str)> {
    let pid = line.split('[').nth(1)?.split(']').next()?;
    let level_end = ["FATAL:", "PANIC:", "ERROR:", "LOG:", "DETAIL:", "HINT:"]
        .iter()
        .filter_map(|lvl| line.find(lvl).map(|p| p + lvl.len()))
        .min()?;
    Some((pid, line[level_end..].trim()))
}

fn last_line(s: &str) -> String {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_string()
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_reason_joins_the_cause_from_the_same_process() {
        let log = "2026-01-01 00:00:00 UTC [7] LOG:  starting\n\
                   2026-01-01 00:00:00 UTC [9] LOG:  invalid value for parameter \"shared_buffers\": \"lots\"\n\
                   2026-01-01 00:00:00 UTC [9] FATAL:  configuration file \"x\" contains errors\n";
        assert_eq!(
            fatal_reason(log).unwrap(),
            "invalid value for parameter \"shared_buffers\": \"lots\"; configuration file \"x\" contains errors"
        );
        let other_pid = "t [7] LOG:  unrelated\nt [9] FATAL:  could not bind\n";
        assert_eq!(fatal_reason(other_pid).unwrap(), "could not bind");
        assert_eq!(fatal_reason("t [7] LOG:  fine\n"), None);
    }
}
