//! Facts about this machine the launcher depends on: where PostgreSQL's
//! server binaries are, whether we run as root (then servers run as the
//! `postgres` system user, since PostgreSQL refuses root), which ports are
//! free, and where `mtm-proxy` is.

use crate::error::{Error, Result};
use nix::unistd::{Gid, Uid, User};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

/// The machine-level context every node operation needs.
#[derive(Debug, Clone)]
pub struct Host {
    pub bindir: PathBuf,
    pub pkglibdir: PathBuf,
    /// Set when running as root: servers run as this user, and the data
    /// directory is handed to it.
    pub run_as: Option<(String, Uid, Gid)>,
}

impl Host {
    /// Finds PostgreSQL 15 (`MTM_PG_BINDIR`, then `pg_config --bindir`, then
    /// Debian's path) and the user to run servers as.
    pub fn detect() -> Result<Host> {
        let bindir = match std::env::var_os("MTM_PG_BINDIR") {
            Some(d) => PathBuf::from(d),
            None => pg_config("--bindir").unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin")),
        };
        for bin in ["initdb", "pg_ctl", "postgres"] {
            if !bindir.join(bin).is_file() {
                return Err(Error::MissingBinary {
                    what: format!("PostgreSQL's {bin}"),
                    detail: format!(
                        "no {} (install postgresql-15, or set MTM_PG_BINDIR)",
                        bindir.join(bin).display()
                    ),
                });
            }
        }
        let pkglibdir = pg_config("--pkglibdir").unwrap_or_else(|| bindir.join("../lib"));
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name("postgres").ok().flatten().ok_or_else(|| Error::MissingBinary {
                what: "the postgres system user".into(),
                detail: "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as (install postgresql-15)".into(),
            })?;
            Some((user.name, user.uid, user.gid))
        } else {
            None
        };
        Ok(Host { bindir, pkglibdir, run_as })
    }

    /// The `multimaster` library must be installed for nodes to start
    /// (it is in `shared_preload_libraries`).
    pub fn check_extension(&self) -> Result<()> {
        let so = self.pkglibdir.join("multimaster.so");
        if so.is_file() {
            Ok(())
        } else {
            Err(Error::MissingBinary {
                what: "the multimaster extension".into(),
                detail: format!("no {} (build and install it: scripts/install.sh)", so.display()),
            })
        }
    }

    /// A fingerprint of the extension's install script as installed now
    /// (SHA-256 of `multimaster--<default_version>.sql`, 16 hex digits):
    /// it changes with every build that changes the extension's SQL
    /// objects. None if the script cannot be read.
    pub fn extension_fingerprint(&self) -> Option<String> {
        use sha2::Digest;
        let dir = pg_config("--sharedir")?.join("extension");
        let control = std::fs::read_to_string(dir.join("multimaster.control")).ok()?;
        let version = control.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "default_version").then(|| v.trim().trim_matches('\'').to_string())
        })?;
        let script = std::fs::read_to_string(dir.join(format!("multimaster--{version}.sql"))).ok()?;
        // Comments left out: the generated script names the source line of
        // each function, which moves with edits that change no object.
        let mut hasher = sha2::Sha256::new();
        for line in script.lines().filter(|l| !l.trim_start().starts_with("--") && !l.trim_start().starts_with("/*")) {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        let digest = hasher.finalize();
        Some(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
    }

    /// A command for a PostgreSQL binary, run as the server user when we are root.
    pub fn pg_command(&self, bin: &str) -> Command {
        let path = self.bindir.join(bin);
        let mut c = match &self.run_as {
            Some((name, _, _)) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(name).arg("--").arg(path);
                c
            }
            None => Command::new(path),
        };
        // With these set, the extension (pgrx) appends a Rust backtrace to
        // the DETAIL of every error a client gets.
        c.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
        c
    }

    /// The uid that must own data directories.
    pub fn owner_uid(&self) -> Uid {
        self.run_as.as_ref().map(|(_, uid, _)| *uid).unwrap_or_else(Uid::effective)
    }

    pub fn owner_name(&self) -> String {
        match &self.run_as {
            Some((name, _, _)) => name.clone(),
            None => User::from_uid(Uid::effective())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| Uid::effective().to_string()),
        }
    }

    /// Hands `path` to the server user (no-op unless root).
    pub fn give(&self, path: &Path) -> Result<()> {
        if let Some((_, uid, gid)) = &self.run_as {
            std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))
                .map_err(|e| Error::io(format!("cannot chown {}", path.display()), e))?;
        }
        Ok(())
    }
}

fn pg_config(flag: &str) -> Option<PathBuf> {
    let out = Command::new("pg_config").arg(flag).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(s.trim());
    p.is_dir().then_some(p)
}

/// Fails with [`Error::PortInUse`] if something listens on 127.0.0.1:`port`.
pub fn check_port_free(port: u16, what: &str) -> Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(Error::PortInUse { port, what: what.to_string() })
        }
        Err(e) => Err(Error::io(format!("cannot check port {port} ({what})"), e)),
    }
}

/// Picks `n` free ports for a throw-away cluster. Ports come from a range
/// below Linux's ephemeral range (so outgoing connections do not take them
/// meanwhile), spread by pid so parallel test processes rarely collide, and
/// each is checked by binding it.
pub fn free_ports(n: usize) -> Vec<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u32 = 16_000;
    const SPAN: u32 = 16_000;
    let seed = (std::process::id() * 97) % SPAN;
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let k = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
        let port = (LOW + (seed + k) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// `mtm-proxy`: `MTM_PROXY_BIN`, else beside the running executable (or
/// one level up, where cargo puts binaries next to its test executables),
/// else on `PATH`.
pub fn find_proxy_binary() -> Result<PathBuf> {
    find_binary("mtm-proxy", "MTM_PROXY_BIN")
}

/// A binary of this workspace: `$env_var`, else beside the running
/// executable or one level up (cargo's test executables live in
/// `target/<profile>/deps`), else on `PATH`.
pub fn find_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let beside_exe = std::env::current_exe().ok().map(|exe| {
        exe.ancestors().skip(1).take(2).map(Path::to_path_buf).collect::<Vec<_>>()
    });
    let on_path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    beside_exe
        .into_iter()
        .flatten()
        .chain(on_path.into_iter().flatten())
        .map(|d| d.join(name))
        .find(|cand| cand.is_file())
        .ok_or_else(|| Error::MissingBinary {
            what: name.to_string(),
            detail: format!("not beside this program nor on PATH (build it: cargo build --release, or set {env_var})"),
        })
}

/// Whether a process with this pid exists and has not exited. A child of
/// ours that exited is reaped here (a test process starts the proxy as its
/// child); anyone else's zombie counts as gone.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    if nix::sys::signal::kill(p, None).is_err() {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may contain spaces.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z')),
        Err(_) => false,
    }
}
