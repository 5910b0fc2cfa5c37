//! Stock PostgreSQL servers as baselines, in a temporary directory on free
//! ports, removed on drop: one server alone, or a primary whose commits
//! wait until every one of its standbys has applied them
//! (`synchronous_commit = remote_apply`) — the established way to have
//! every committed transaction on three servers, which multimaster is
//! measured against. Run as the `postgres` user when we are root, like the
//! launcher's nodes.

use mtmctl::host::{free_ports, Host};
use mtmctl::node::{wait_for, Node};
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

pub struct PlainServers {
    host: Host,
    /// The primary (or the lone server) first, then the standbys.
    servers: Vec<Node>,
    // Held for its Drop: removed after the servers stop.
    _dir: tempfile::TempDir,
}

impl PlainServers {
    /// A primary with `standbys` synchronous standbys, named s1, s2, ...
    /// (`FIRST n`: a commit waits for all of them); a lone server with 0.
    pub fn start(standbys: usize) -> PlainServers {
        let host = Host::detect().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new().prefix("mtm-bench-plain-").tempdir().unwrap();
        host.give(dir.path()).unwrap();
        let ports = free_ports(standbys + 1);
        let servers: Vec<Node> = ports
            .iter()
            .enumerate()
            .map(|(i, &port)| Node {
                id: i + 1,
                port,
                dir: dir.path().join(format!("pg{i}")),
                log: dir.path().join(format!("pg{i}.log")),
                socket_dir: dir.path().to_path_buf(),
                database: "postgres".into(),
            })
            .collect();
        let me = PlainServers { host, servers, _dir: dir };
        // Dropping `me` on a panic below stops whatever did start.
        let primary = me.servers[0].clone();
        me.initdb(&primary);
        let names: Vec<String> = (1..=standbys).map(|i| format!("s{i}")).collect();
        let sync = if standbys == 0 {
            String::new()
        } else {
            format!("synchronous_commit = remote_apply\nsynchronous_standby_names = 'FIRST {standbys} ({})'\n", names.join(", "))
        };
        append(&primary.dir.join("postgresql.conf"), &format!("{}{sync}", me.settings(&primary)));
        primary.start(&me.host).unwrap_or_else(|e| panic!("{e}"));
        for (standby, name) in me.servers[1..].to_vec().iter().zip(&names) {
            me.base_backup(&primary, standby, name);
            standby.start(&me.host).unwrap_or_else(|e| panic!("{e}"));
        }
        if standbys > 0 {
            let mut c = primary.connect().unwrap();
            let synced = wait_for(Duration::from_secs(60), || {
                let n: i64 = c.query_one("select count(*) from pg_stat_replication where sync_state = 'sync'", &[]).ok()?.get(0);
                (n == standbys as i64).then_some(())
            });
            assert!(synced.is_some(), "the standbys did not become synchronous (logs in {})", primary.socket_dir.display());
        }
        me
    }

    /// Where clients connect: the primary.
    pub fn port(&self) -> u16 {
        self.servers[0].port
    }

    fn initdb(&self, node: &Node) {
        let out = self
            .host
            .pg_command("initdb")
            .arg("-D")
            .arg(&node.dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-instructions"])
            .stdin(Stdio::null())
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn base_backup(&self, primary: &Node, standby: &Node, name: &str) {
        let out = self
            .host
            .pg_command("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres", "-X", "stream", "-c", "fast", "-D"])
            .arg(&standby.dir)
            .stdin(Stdio::null())
            .output()
            .expect("pg_basebackup");
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        // The copy has the primary's settings; the later lines win. The
        // application_name is what synchronous_standby_names lists.
        append(
            &standby.dir.join("postgresql.conf"),
            &format!(
                "{}primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={name}'\n",
                self.settings(standby),
                primary.port
            ),
        );
        let signal = standby.dir.join("standby.signal");
        std::fs::write(&signal, "").unwrap();
        self.host.give(&signal).unwrap();
    }

    fn settings(&self, node: &Node) -> String {
        format!(
            "\n# ---- mtm-bench ----\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n",
            node.port,
            node.socket_dir.display()
        )
    }
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

impl Drop for PlainServers {
    fn drop(&mut self) {
        for s in &self.servers {
            if let Err(e) = s.stop(&self.host, "immediate") {
                eprintln!("warning: stopping {}: {e}", s.dir.display());
            }
        }
    }
}
