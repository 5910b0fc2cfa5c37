//! Real drivers through the proxy of a 3-node cluster with TLS and SCRAM:
//! psycopg 3, asyncpg, node-postgres and the PostgreSQL JDBC driver each
//! run a short script (tests/clients/) covering prepared statements,
//! chunked portals, COPY, errors in transactions, LISTEN on one node and
//! NOTIFY from another, two sessions on different nodes updating one row
//! (exactly one 40001) and cancel. Each script asserts its sessions landed
//! where it needs them; the test then reads every node directly.

use mtm_proxy::config::{AuthMethod, ClientTlsMode};
use mtm_tests::cluster::{client, converge, nothing_prepared};
use mtm_tests::self_signed_cert;
use mtmctl::testing::TestCluster;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Secured {
    cluster: TestCluster,
    _dir: tempfile::TempDir,
}

fn secured_cluster() -> Secured {
    let cluster = TestCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_cert(dir.path());
    let users = dir.path().join("users.txt");
    let verifier = postgres_protocol::password::scram_sha_256(b"drivers-pw");
    std::fs::write(&users, format!("\"postgres\" \"{verifier}\"\n")).unwrap();
    cluster.reconfigure_proxy(|cfg| {
        cfg.tls.mode = ClientTlsMode::Require;
        cfg.tls.cert_file = Some(cert);
        cfg.tls.key_file = Some(key);
        cfg.auth.method = AuthMethod::ScramSha256;
        cfg.auth.users_file = Some(users);
    });
    Secured { cluster, _dir: dir }
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Runs a driver's script through the proxy, then checks that every node
/// has the same rows in each of `tables`, `rows` rows in the first, the
/// committed value of the row both writers updated, and nothing prepared.
fn run_and_check(s: &Secured, cmd: Command, expect: &str, tables: &[&str], rows: i64) {
    run(cmd, s.cluster.layout.proxy_port, expect);
    let c = &s.cluster;
    converge(c, tables);
    nothing_prepared(c, Duration::from_secs(10));
    let acc = tables.iter().find(|t| t.ends_with("_acc")).expect("a conflict table");
    for id in 1..=3 {
        let mut node = client(c, id);
        let n: i64 = node.query_one(&format!("select count(*) from {}", tables[0]), &[]).unwrap().get(0);
        assert_eq!(n, rows, "node{id}: rows of {}", tables[0]);
        let v: i32 = node.query_one(&format!("select v from {acc} where id = 1"), &[]).unwrap().get(0);
        assert_eq!(v, 3, "node{id}: three rounds, one of two updates committed in each");
    }
}

fn run(mut cmd: Command, port: u16, expect: &str) {
    let out = cmd
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", port.to_string())
        .env("PGUSER", "postgres")
        .env("PGPASSWORD", "drivers-pw")
        .env("PGDATABASE", "postgres")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/test.sh installs the drivers)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(expect),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn psycopg3() {
    let s = secured_cluster();
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("psycopg_check.py"));
    run_and_check(&s, cmd, "OK psycopg", &["psy", "psy_pipe", "psy_acc"], 1050);
}

#[test]
fn asyncpg() {
    let s = secured_cluster();
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("asyncpg_check.py"));
    run_and_check(&s, cmd, "OK asyncpg", &["apg", "apg_acc"], 1150);
}

#[test]
fn node_postgres() {
    let s = secured_cluster();
    let mut cmd = Command::new("node");
    cmd.arg("node_pg_check.js").current_dir(clients_dir());
    run_and_check(&s, cmd, "OK node-postgres", &["npg", "npg_acc", "npg_pool"], 1050);
}

#[test]
fn jdbc() {
    let s = secured_cluster();
    let jar = "/usr/share/java/postgresql.jar";
    let classes = tempfile::tempdir().unwrap();
    let javac = Command::new("javac")
        .args(["-cp", jar, "-d"])
        .arg(classes.path())
        .arg(clients_dir().join("JdbcCheck.java"))
        .output()
        .expect("javac must be installed");
    assert!(javac.status.success(), "{}", String::from_utf8_lossy(&javac.stderr));
    let mut cmd = Command::new("java");
    cmd.arg("-cp").arg(format!("{}:{jar}", classes.path().display())).arg("JdbcCheck");
    run_and_check(&s, cmd, "OK jdbc", &["jdb", "jdb_acc"], 1150);
}
