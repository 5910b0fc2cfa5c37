//! The hops mtm-proxy is measured against, each in front of one node on a
//! free 127.0.0.1 port and stopped on drop: PgBouncer (session pooling)
//! and HAProxy in TCP mode, which parses nothing and so is the floor any
//! hop pays. Also the CPU time a process has used, to put a price per
//! transaction on each hop.

use mtmctl::host::Host;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

/// CPU seconds (user + system, all threads) process `pid` has used so
/// far, from /proc/<pid>/stat; None once it is gone.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses; the fields after
    // its closing parenthesis start at field 3, so utime (14) is index 11.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    Some(ticks as f64 / per_second as f64)
}

/// `cmd` as the server user when we are root (PgBouncer refuses root).
fn as_server_user(host: &Host, program: &str) -> Command {
    match &host.run_as {
        Some((user, _, _)) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", program]);
            c
        }
        None => Command::new(program),
    }
}

/// PgBouncer from Debian's package, session pooling, trust auth.
pub struct PgBouncer {
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Reaching the node through its unix socket in `socket_dir`, as
    /// mtm-proxy does for local nodes.
    pub fn start(host: &Host, socket_dir: &std::path::Path, node_port: u16, port: u16) -> PgBouncer {
        let dir = tempfile::Builder::new().prefix("mtm-bench-pgbouncer-").tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host={} port={node_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n\
                 auth_file = {d}/users.txt\npool_mode = session\nmax_client_conn = 500\ndefault_pool_size = 100\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\nunix_socket_dir =\n",
                socket_dir.display()
            ),
        )
        .unwrap();
        for f in ["", "users.txt", "pgbouncer.ini"] {
            host.give(&dir.path().join(f)).unwrap();
        }
        let out = as_server_user(host, "pgbouncer")
            .arg("-d")
            .arg(dir.path().join("pgbouncer.ini"))
            .output()
            .expect("pgbouncer must be installed (scripts/lib.sh installs it)");
        assert!(out.status.success(), "pgbouncer: {}", String::from_utf8_lossy(&out.stderr));
        wait_listening(port, "pgbouncer", &dir.path().join("pgbouncer.log"));
        PgBouncer { dir }
    }

    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.pid")).ok()?.trim().parse().ok()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// HAProxy from Debian's package in TCP mode with one thread, relaying
/// bytes to one node: what a hop costs when it understands nothing.
pub struct HaProxy {
    child: KilledOnDrop,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// Relaying to the node's unix socket in `socket_dir`, as mtm-proxy
    /// does for local nodes.
    pub fn start(socket_dir: &std::path::Path, node_port: u16, port: u16) -> HaProxy {
        let dir = tempfile::Builder::new().prefix("mtm-bench-haproxy-").tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        // Client/server timeouts are required in TCP mode; long ones, so
        // no session of a run is ever cut.
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread 1\n  maxconn 1000\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
                 listen pg\n  bind 127.0.0.1:{port}\n  server node {}/.s.PGSQL.{node_port}\n",
                socket_dir.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("haproxy.log");
        // Foreground (no -D), so the child is the one process doing the work.
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("haproxy must be installed (scripts/lib.sh installs it)");
        wait_listening(port, "haproxy", &log);
        HaProxy { child: KilledOnDrop(child), _dir: dir }
    }

    pub fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }
}

/// A child process killed (and reaped) when this is dropped.
struct KilledOnDrop(Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One of `relay-floor`'s relays (`engine`: tokio or uring), the least a
/// hop written in Rust costs (see `src/relay_floor.rs`).
pub struct Floor {
    child: KilledOnDrop,
}

impl Floor {
    pub fn start(engine: &str, socket_dir: &std::path::Path, node_port: u16, port: u16) -> Floor {
        // Built next to the benchmark that starts it.
        let exe = std::env::current_exe().unwrap().with_file_name("relay-floor");
        let child = Command::new(&exe)
            .args(["--engine", engine, "--port", &port.to_string(), "--node-socket"])
            .arg(socket_dir.join(format!(".s.PGSQL.{node_port}")))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (cargo build --release -p mtm-bench)", exe.display()));
        wait_listening(port, "relay-floor", Path::new("/dev/null"));
        Floor { child: KilledOnDrop(child) }
    }

    pub fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }
}

fn wait_listening(port: u16, what: &str, log: &Path) {
    let up = mtmctl::node::wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    assert!(up.is_some(), "{what} does not listen on {port}: {}", std::fs::read_to_string(log).unwrap_or_default());
}
