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
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("pgbench must be installed (postgresql-15)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// pgbench's tables at `scale` on a multimaster cluster whose nodes
/// listen on `ports`: DDL is not replicated yet, so tables and keys are
/// created on every node; the rows are loaded on the first node only and
/// replicate. Panics with pgbench's output on failure.
pub fn pgbench_tables(ports: &[u16], scale: u32) {
    let scale = scale.to_string();
    for &p in ports {
        let (ok, out) = pgbench(p, &["-i", "-q", "-I", "dtp", "-s", &scale]);
        assert!(ok, "pgbench -i on port {p}: {out}");
    }
    let (ok, out) = pgbench(ports[0], &["-i", "-q", "-I", "g", "-s", &scale]);
    assert!(ok, "pgbench -i -I g on port {}: {out}", ports[0]);
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
