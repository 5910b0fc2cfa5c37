//! Real drivers through the proxy with TLS and SCRAM: psycopg 3, asyncpg,
//! node-postgres and the PostgreSQL JDBC driver each run a short script
//! (tests/clients/) covering prepared statements, chunked portals, COPY,
//! errors in transactions, LISTEN/NOTIFY and cancel.

use mtm_proxy::config::{AuthMethod, ClientTlsMode};
use mtm_tests::self_signed_cert;
use mtmctl::testing::TestCluster;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Secured {
    cluster: TestCluster,
    _dir: tempfile::TempDir,
}

fn secured_cluster() -> Secured {
    let cluster = TestCluster::start(1);
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
    run(cmd, s.cluster.layout.proxy_port, "OK psycopg");
}

#[test]
fn asyncpg() {
    let s = secured_cluster();
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("asyncpg_check.py"));
    run(cmd, s.cluster.layout.proxy_port, "OK asyncpg");
}

#[test]
fn node_postgres() {
    let s = secured_cluster();
    let mut cmd = Command::new("node");
    cmd.arg("node_pg_check.js").current_dir(clients_dir());
    run(cmd, s.cluster.layout.proxy_port, "OK node-postgres");
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
    run(cmd, s.cluster.layout.proxy_port, "OK jdbc");
}
