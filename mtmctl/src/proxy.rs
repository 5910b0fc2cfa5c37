//! The cluster's `mtm-proxy` process: started in the background with
//! `<data-dir>/mtm-proxy.toml` (generated from the layout when missing, the
//! user's own otherwise), tracked by a pid file, stopped with SIGTERM (then
//! SIGKILL if it does not exit).

use crate::error::{Error, Result};
use crate::host::pid_alive;
use crate::layout::Layout;
use crate::node::wait_for;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct ProxyProcess<'a> {
    pub layout: &'a Layout,
}

impl ProxyProcess<'_> {
    /// The running proxy's pid: the pid file names a live `mtm-proxy`.
    pub fn pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.layout.proxy_pid()).ok()?.trim().parse().ok()?;
        if !pid_alive(pid) {
            return None;
        }
        // Guard against pid reuse after a reboot.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains("mtm-proxy").then_some(pid)
    }

    /// Starts the proxy (if not running) and waits until it answers. The
    /// configuration file is generated from the layout only when it is
    /// missing: it is where users configure TLS, authentication and
    /// routing, so `up` must not undo their edits.
    pub fn start(&self, binary: &PathBuf) -> Result<()> {
        let path = self.layout.proxy_config();
        let query_check = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let cfg = mtm_proxy::config::Config::parse(&text).map_err(|e| {
                    Error::DataDir(format!("{} is not a valid proxy configuration: {}", path.display(), one_line(&e.to_string())))
                })?;
                self.check_listen_port(&cfg)?;
                plain_login(&cfg)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.write_config(&self.layout.proxy_config_toml())?;
                true
            }
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        self.launch(binary, query_check)
    }

    /// Replaces the configuration file with `config` (a full mtm-proxy.toml)
    /// and starts the proxy with it (if not running). With `query_check`,
    /// waits until `select 1` as postgres without a password answers;
    /// otherwise until the proxy answers an SSLRequest (for configurations
    /// that require a password or TLS).
    pub fn start_with(&self, binary: &PathBuf, config: &str, query_check: bool) -> Result<()> {
        if self.pid().is_none() {
            self.write_config(config)?;
        }
        self.launch(binary, query_check)
    }

    fn write_config(&self, config: &str) -> Result<()> {
        std::fs::write(self.layout.proxy_config(), config)
            .map_err(|e| Error::io("cannot write the proxy configuration", e))
    }

    /// The readiness checks and `status` look at the port in cluster.toml;
    /// a file listening elsewhere would make `up` wait 30 s for nothing.
    fn check_listen_port(&self, cfg: &mtm_proxy::config::Config) -> Result<()> {
        let port = cfg.proxy.listen.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        if port != Some(self.layout.proxy_port) {
            return Err(Error::DataDir(format!(
                "proxy.listen = {:?} in {} does not use port {}, the proxy port recorded in cluster.toml",
                cfg.proxy.listen,
                self.layout.proxy_config().display(),
                self.layout.proxy_port
            )));
        }
        Ok(())
    }

    /// Starts the proxy with the configuration file as it is (if not
    /// running) and waits until it is ready.
    fn launch(&self, binary: &PathBuf, query_check: bool) -> Result<()> {
        let ready = || if query_check { self.answers() } else { self.listening() };
        let log_path = self.layout.proxy_log();
        if self.pid().is_none() {
            crate::host::check_port_free(self.layout.proxy_port, "mtm-proxy")?;
            crate::host::check_port_free(self.layout.metrics_port, "mtm-proxy metrics")?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| Error::io(format!("cannot open {}", log_path.display()), e))?;
            let log2 = log.try_clone().map_err(|e| Error::io("cannot dup log file", e))?;
            let child = Command::new(binary)
                .arg("--config")
                .arg(self.layout.proxy_config())
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                // Its own process group: a Ctrl-C at mtmctl's terminal must not stop it.
                .process_group(0)
                .spawn()
                .map_err(|e| Error::io(format!("cannot start {}", binary.display()), e))?;
            let pid = child.id() as i32;
            std::fs::write(self.layout.proxy_pid(), format!("{pid}\n"))
                .map_err(|e| Error::io("cannot write the proxy pid file", e))?;
            // Reap it if it exits while we wait (otherwise a zombie looks alive).
            let mut child = child;
            let ready = wait_for(Duration::from_secs(30), || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false);
                }
                ready().then_some(true)
            });
            match ready {
                Some(true) => {}
                Some(false) => {
                    return Err(Error::StartFailed {
                        what: "mtm-proxy".into(),
                        reason: last_log_line(&log_path),
                        log: log_path,
                    })
                }
                None => {
                    return Err(Error::StartFailed {
                        what: "mtm-proxy".into(),
                        reason: "no answer to `select 1` through it within 30 s".into(),
                        log: log_path,
                    })
                }
            }
        } else if wait_for(Duration::from_secs(30), || ready().then_some(())).is_none() {
            return Err(Error::StartFailed {
                what: "mtm-proxy".into(),
                reason: "it runs but does not answer `select 1`".into(),
                log: log_path,
            });
        }
        Ok(())
    }

    /// Whether `select 1` through the proxy answers.
    pub fn answers(&self) -> bool {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            self.layout.proxy_port
        );
        match postgres::Client::connect(&conninfo, postgres::NoTls) {
            Ok(mut c) => c.simple_query("select 1").is_ok(),
            Err(_) => false,
        }
    }

    /// Whether the proxy answers an SSLRequest (with 'S' or 'N'): it is up,
    /// whatever its authentication settings.
    pub fn listening(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.layout.proxy_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut req = [0u8; 8];
        req[..4].copy_from_slice(&8u32.to_be_bytes());
        req[4..].copy_from_slice(&mtm_proxy::startup::SSL_REQUEST.to_be_bytes());
        let mut answer = [0u8; 1];
        s.write_all(&req).is_ok() && s.read_exact(&mut answer).is_ok() && matches!(answer[0], b'S' | b'N')
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        if let Some(pid) = self.pid() {
            let p = Pid::from_raw(pid);
            let _ = kill(p, Signal::SIGTERM);
            if wait_for(grace, || (!pid_alive(pid)).then_some(())).is_none() {
                let _ = kill(p, Signal::SIGKILL);
                wait_for(Duration::from_secs(5), || (!pid_alive(pid)).then_some(()));
            }
        }
        let _ = std::fs::remove_file(self.layout.proxy_pid());
        // Its listening sockets can outlive the pid by a moment; a restart
        // right after must not trip over them.
        let ports = [self.layout.proxy_port, self.layout.metrics_port];
        wait_for(Duration::from_secs(10), || {
            ports.iter().all(|p| crate::host::check_port_free(*p, "").is_ok()).then_some(())
        });
    }
}

/// Whether `postgres` can log in through the proxy without a password or
/// TLS, so that readiness can be checked with a query.
fn plain_login(cfg: &mtm_proxy::config::Config) -> bool {
    use mtm_proxy::config::{AuthMethod, ClientTlsMode};
    matches!(cfg.auth.method, AuthMethod::Passthrough | AuthMethod::Trust) && cfg.tls.mode != ClientTlsMode::Require
}

/// A TOML error draws the offending line over several lines; launcher
/// errors are one line, so keep where (the first line) and what (the last).
fn one_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_string();
    match lines.next_back() {
        Some(last) => format!("{first}: {last}"),
        None => first,
    }
}

fn last_log_line(path: &PathBuf) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "it exited".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_error_becomes_one_line_with_place_and_cause() {
        let err = mtm_proxy::config::Config::parse("this is not toml").unwrap_err().to_string();
        assert!(err.lines().count() > 1, "{err}");
        let line = one_line(&err);
        assert_eq!(line.lines().count(), 1);
        assert!(line.starts_with("TOML parse error at line 1"), "{line}");
        assert_eq!(one_line("no [[nodes]] configured"), "no [[nodes]] configured");
    }

    #[test]
    fn readiness_by_query_only_when_postgres_logs_in_without_password_or_tls() {
        use mtm_proxy::config::{AuthMethod, ClientTlsMode, Config};
        let mut cfg = Config::example();
        assert!(plain_login(&cfg));
        cfg.auth.method = AuthMethod::ScramSha256;
        assert!(!plain_login(&cfg));
        cfg.auth.method = AuthMethod::Trust;
        cfg.tls.mode = ClientTlsMode::Require;
        assert!(!plain_login(&cfg));
    }
}
