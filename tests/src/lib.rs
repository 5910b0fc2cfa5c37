//! Helpers shared by the integration tests in `tests/tests/`. The clusters
//! themselves come from [`mtmctl::testing::TestCluster`].

use std::path::PathBuf;
use std::process::{Command, Output};

/// A binary of this workspace (`mtmctl`, `mtm-proxy`) as the launcher
/// finds it: beside the test executable's directory, where cargo builds
/// them (`scripts/test.sh` builds them first).
pub fn workspace_bin(name: &str) -> PathBuf {
    let env_var = format!("MTM_{}_BIN", name.to_uppercase().replace('-', "_"));
    mtmctl::host::find_binary(name, &env_var).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the system `psql` with `args`; panics if psql is missing.
pub fn psql(port: u16, args: &[&str]) -> Output {
    Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(args)
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql must be installed (postgresql-client-15)")
}

/// `psql -tAc sql`, asserting success; returns trimmed stdout.
pub fn psql_ok(port: u16, sql: &str) -> String {
    let out = psql(port, &["-v", "ON_ERROR_STOP=1", "-tAc", sql]);
    assert!(
        out.status.success(),
        "psql -c {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `pgbench` against `port` with `args`; returns (success, stdout+stderr).
pub fn pgbench(port: u16, args: &[&str]) -> (bool, String) {
    pgbench_with(port, args, None)
}

/// [`pgbench`] on a node directly, as an administrator: the node refuses
/// writes from sessions that do not come through the proxy unless they
/// opt in (tests of the replication mesh itself).
pub fn pgbench_on_node(port: u16, args: &[&str]) -> (bool, String) {
    pgbench_with(port, args, Some("-c multimaster.direct_writes=on"))
}

fn pgbench_with(port: u16, args: &[&str], options: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("pgbench");
    if let Some(o) = options {
        cmd.env("PGOPTIONS", o);
    }
    let out = cmd
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("pgbench must be installed (postgresql-15)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// pgbench's tables at `scale` on a multimaster cluster, made the way a
/// user makes them: `pgbench -i` through the proxy (tables, rows and keys
/// reach every node in its transactions). Panics with pgbench's output on
/// failure.
pub fn pgbench_tables(c: &mtmctl::testing::TestCluster, scale: u32) {
    let (ok, out) = pgbench(c.layout.proxy_port, &["-i", "-q", "-s", &scale.to_string()]);
    assert!(ok, "pgbench -i through the proxy: {out}");
}

/// Connections to a test cluster's nodes and proxy, and the checks every
/// multi-node test makes: are the nodes equal?
pub mod cluster {
    use mtmctl::testing::TestCluster;
    use postgres::{Client, NoTls};
    use std::time::{Duration, Instant};

    /// `n` proxy sessions held open together (the router spreads them),
    /// each with the id of the node it landed on, in node order; asserts
    /// that they landed on min(n, nodes) different nodes.
    pub fn spread_sessions(c: &TestCluster, n: usize) -> Vec<(usize, Client)> {
        let mut out: Vec<(usize, Client)> = (0..n)
            .map(|_| {
                let mut cl = proxy_client(c);
                let port: i32 = cl.query_one("select current_setting('port')::int", &[]).unwrap().get(0);
                let id = c.layout.node_ports.iter().position(|&p| p as i32 == port).expect("a node's port") + 1;
                (id, cl)
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        let nodes: std::collections::BTreeSet<usize> = out.iter().map(|(id, _)| *id).collect();
        assert_eq!(nodes.len(), n.min(c.layout.node_ports.len()), "sessions spread over the nodes");
        out
    }

    /// A session on node `id` directly (not through the proxy).
    pub fn client(c: &TestCluster, id: usize) -> Client {
        Client::connect(&c.node(id).admin_conninfo("postgres"), NoTls).expect("connect to node")
    }

    /// A session through the proxy.
    pub fn proxy_client(c: &TestCluster) -> Client {
        Client::connect(&c.proxy_conninfo("postgres"), NoTls).expect("connect through the proxy")
    }

    /// Runs schema changes (and anything else in `sql`) through the proxy:
    /// when it returns, they are committed on every node.
    pub fn schema(c: &TestCluster, sql: &str) {
        proxy_client(c).batch_execute(sql).unwrap_or_else(|e| panic!("through the proxy: {sql}: {e:?}"));
    }

    /// Runs `sql` on every node directly.
    pub fn on_every_node(c: &TestCluster, sql: &str) {
        for id in 1..=c.layout.node_ports.len() {
            client(c, id).batch_execute(sql).unwrap_or_else(|e| panic!("node{id}: {sql}: {e:?}"));
        }
    }

    /// md5 of a table's rows in key order, per node.
    pub fn digests(c: &TestCluster, table: &str) -> Vec<String> {
        (1..=c.layout.node_ports.len())
            .map(|id| {
                client(c, id)
                    .query_one(&format!("select coalesce(md5(string_agg(t::text, '|' order by t::text)), 'empty') from {table} t"), &[])
                    .unwrap()
                    .get(0)
            })
            .collect()
    }

    /// Waits until every node has the same content for each table; panics
    /// with the digests if they do not converge within 60 s.
    pub fn converge(c: &TestCluster, tables: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let all: Vec<Vec<String>> = tables.iter().map(|t| digests(c, t)).collect();
            if all.iter().all(|d| d.windows(2).all(|w| w[0] == w[1])) {
                return;
            }
            if Instant::now() > deadline {
                let errors: Vec<String> = c
                    .nodes()
                    .iter()
                    .flat_map(|n| {
                        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                        let errs: Vec<String> = log.lines().filter(|l| l.contains("ERROR")).map(str::to_string).collect();
                        errs.into_iter().rev().take(3).map(|l| format!("{}: {l}", n.name())).collect::<Vec<_>>()
                    })
                    .collect();
                panic!("nodes did not converge: {tables:?} {all:?}\nlast errors:\n{}", errors.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every node receives from and sends to every peer (so
    /// votes can flow); panics after 60 s.
    pub fn wait_connected(c: &TestCluster) {
        let n = c.layout.node_ports.len() as i64;
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in 1..=c.layout.node_ports.len() {
            loop {
                // A node starting or in crash recovery refuses connections
                // for a while (57P03): wait for it as well.
                let linked: i64 = match Client::connect(&c.node(id).admin_conninfo("postgres"), NoTls).and_then(|mut cl| {
                    cl.query_one("select count(*) from mtm.nodes() where not is_self and receiver_pid is not null and sender_pid is not null", &[])
                }) {
                    Ok(row) => row.get(0),
                    Err(e) => {
                        assert!(Instant::now() < deadline, "node{id} does not answer: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if linked == n - 1 {
                    break;
                }
                assert!(Instant::now() < deadline, "node{id} is linked to {linked} of {} peers", n - 1);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Waits until no node has a transaction still prepared (every commit
    /// and rollback has reached every node); panics with what is left
    /// after `within`.
    pub fn nothing_prepared(c: &TestCluster, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = prepared(c);
            if left.iter().all(Vec::is_empty) {
                return;
            }
            assert!(Instant::now() < deadline, "prepared transactions left behind: {left:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every process of node `id` (the postmaster and its children) gets
    /// `sig`, e.g. `-STOP`, which freezes the node: connections to it are
    /// accepted by the kernel and then never answered.
    pub fn signal_node(c: &TestCluster, id: usize, sig: &str) {
        let pm = c.node(id).pid().expect("node running");
        let children = std::process::Command::new("pgrep").args(["-P", &pm.to_string()]).output().unwrap();
        // A child may have exited since pgrep listed it (a backend whose
        // client left): only the postmaster must be there.
        for pid in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            let _ = std::process::Command::new("kill").args([sig, pid]).stderr(std::process::Stdio::null()).status();
        }
        let status = std::process::Command::new("kill").args([sig, &pm.to_string()]).status().unwrap();
        assert!(status.success(), "kill {sig} {pm}");
    }

    /// The SQLSTATE of a failed statement.
    pub fn sqlstate(e: &postgres::Error) -> String {
        e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
    }

    /// The gids prepared on each node.
    pub fn prepared(c: &TestCluster) -> Vec<Vec<String>> {
        (1..=c.layout.node_ports.len())
            .map(|id| client(c, id).query("select gid from pg_prepared_xacts order by gid", &[]).unwrap().iter().map(|r| r.get(0)).collect())
            .collect()
    }
}

/// A self-signed certificate and key for 127.0.0.1/localhost, made with
/// the openssl command in `dir`; returns (cert, key).
pub fn self_signed_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("proxy.crt");
    let key = dir.join("proxy.key");
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed");
    assert!(status.status.success(), "openssl: {}", String::from_utf8_lossy(&status.stderr));
    (cert, key)
}

/// An HTTP GET on 127.0.0.1 returning the body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics endpoint");
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "{head}");
    body.to_string()
}
