//! Helpers shared by the integration tests in `tests/tests/`. The clusters
//! themselves come from [`mtmctl::testing::TestCluster`].

use std::path::PathBuf;
use std::process::{Command, Output};

/// A binary of this workspace (`mtmctl`, `mtm-proxy`), found next to the
/// test executable's directory, where cargo builds them.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let cand = d.join(name);
        if cand.is_file() {
            return cand;
        }
        dir = d.parent();
    }
    panic!("{name} is not built; run `cargo build --release` before the tests (scripts/test.sh does)");
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
