//! The launcher (`mtmctl` and its library) against real PostgreSQL nodes.

use mtm_tests::{psql_ok, workspace_bin};
use mtmctl::cluster::{Cluster, UpOptions};
use mtmctl::testing::TestCluster;
use std::net::TcpListener;
use std::process::Command;

fn mtmctl(args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("mtmctl")).args(args).output().expect("run mtmctl")
}

#[test]
fn cluster_answers_through_the_proxy_and_keeps_data_across_down_up() {
    let cluster = TestCluster::start(3);
    let proxy_port = cluster.layout.proxy_port;
    assert_eq!(psql_ok(proxy_port, "select 1"), "1");

    // Every node runs with the extension created.
    let status = cluster.status();
    assert_eq!(status.len(), 4);
    for m in &status[..3] {
        assert!(m.pid.is_some(), "{} not running: {}", m.name, m.detail);
        assert!(m.detail.contains("multimaster 0.1.0, node "), "{}: {}", m.name, m.detail);
    }
    assert!(status[3].pid.is_some() && status[3].detail.starts_with("running"), "{:?}", status[3]);

    // The table and the row through the proxy (committed on all three).
    psql_ok(proxy_port, "create table kept(id int primary key, v text)");
    psql_ok(proxy_port, "insert into kept values (1, 'one')");
    cluster.down("fast").unwrap();
    assert!(cluster.status().iter().all(|m| m.pid.is_none()), "{:?}", cluster.status());

    let again = Cluster::up(&cluster.layout.data_dir, &UpOptions::default()).unwrap();
    assert_eq!(again.layout, cluster.layout, "ports come from cluster.toml, not from the options");
    assert_eq!(psql_ok(proxy_port, "select v from kept where id = 1"), "one");
}

#[test]
fn mtmctl_status_lists_every_node_and_the_proxy() {
    let cluster = TestCluster::start(2);
    let dir = cluster.layout.data_dir.to_str().unwrap().to_string();
    let out = mtmctl(&["status", "--data-dir", &dir]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (i, line) in lines.iter().enumerate().take(2) {
        assert!(line.starts_with(&format!("node{}", i + 1)), "{line}");
        assert!(line.contains(&cluster.layout.node_ports[i].to_string()) && line.contains("running"), "{line}");
    }
    assert!(lines[2].starts_with("mtm-proxy") && lines[2].contains("running"), "{}", lines[2]);

    // A frozen node (its connections accepted, never answered) is said to
    // be so, without hiding the others.
    mtm_tests::cluster::signal_node(&cluster, 1, "-STOP");
    let asked = std::time::Instant::now();
    let out = mtmctl(&["status", "--data-dir", &dir]);
    mtm_tests::cluster::signal_node(&cluster, 1, "-CONT");
    assert!(asked.elapsed() < std::time::Duration::from_secs(30), "status waited {:?}", asked.elapsed());
    assert_eq!(out.status.code(), Some(3), "a node not answering makes status exit 3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap().contains("not answering"), "{text}");
    assert!(text.lines().nth(1).unwrap().contains("multimaster"), "{text}");

    cluster.node(2).stop(&cluster.host, "fast").unwrap();
    let out = mtmctl(&["status", "--data-dir", &dir]);
    assert_eq!(out.status.code(), Some(3), "a stopped node makes status exit 3");
    assert!(String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().contains("stopped"));
}

#[test]
fn a_taken_port_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::Builder::new().prefix("mtm-test-").tempdir().unwrap();
    let free = mtmctl::host::free_ports(2);
    let out = mtmctl(&[
        "up",
        "--nodes",
        "1",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--base-port",
        &port,
        "--proxy-port",
        &free[0].to_string(),
        "--metrics-port",
        &free[1].to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&format!("port {port} (node1) is already in use")), "{err}");
    // Nothing was left running by the failed attempt.
    let c = Cluster::open(dir.path()).unwrap();
    assert!(c.status().iter().all(|m| m.pid.is_none()));
}

#[test]
fn a_node_that_cannot_start_names_its_log() {
    let cluster = TestCluster::start(1);
    cluster.down("fast").unwrap();
    let conf = cluster.layout.node_dir(1).join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nshared_buffers = 'lots'\n");
    std::fs::write(&conf, text).unwrap();
    let out = mtmctl(&["up", "--data-dir", cluster.layout.data_dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("node1 failed to start"), "{err}");
    assert!(err.contains("shared_buffers"), "the reason comes from the server log: {err}");
    assert!(err.contains(cluster.layout.node_log(1).to_str().unwrap()), "{err}");
}

#[test]
fn a_data_dir_owned_by_someone_else_is_refused() {
    let dir = tempfile::Builder::new().prefix("mtm-test-").tempdir().unwrap();
    std::fs::write(dir.path().join("precious"), "not ours").unwrap();
    let expected_owner = if nix::unistd::Uid::effective().is_root() {
        // As root the data directory must belong to postgres; give it to nobody.
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        "nobody"
    } else {
        "root"
    };
    let target = if expected_owner == "root" { std::path::PathBuf::from("/") } else { dir.path().to_path_buf() };
    let out = mtmctl(&["up", "--data-dir", target.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("is owned by {expected_owner}")), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("precious")).unwrap(), "not ours");
}

#[test]
fn up_initialises_the_cluster_on_every_node() {
    let cluster = TestCluster::start(3);
    for node in cluster.nodes() {
        let mut c = node.connect().unwrap();
        let rows: Vec<(i32, bool)> = c
            .query("select id, is_self from mtm.cluster_nodes order by id", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let expected: Vec<(i32, bool)> = (1..=3).map(|i| (i, i as usize == node.id)).collect();
        assert_eq!(rows, expected, "{}", node.name());
        let me: i32 = c.query_one("select mtm.my_node_id()", &[]).unwrap().get(0);
        assert_eq!(me as usize, node.id);
        let peers: Vec<usize> = (1..=3).filter(|j| *j != node.id).collect();
        let slots: Vec<(String, String, bool)> = c
            .query("select slot_name::text, plugin::text, two_phase from pg_replication_slots order by 1", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let expected: Vec<(String, String, bool)> =
            peers.iter().map(|j| (format!("mtm_slot_{j}"), "multimaster".to_string(), true)).collect();
        assert_eq!(slots, expected, "{}", node.name());
        let origins: Vec<String> = c
            .query("select roname from pg_replication_origin order by 1", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut expected: Vec<String> = peers.iter().flat_map(|j| [format!("mtm_node_{j}"), format!("mtm_finish_{j}")]).collect();
        expected.sort();
        assert_eq!(origins, expected, "{}", node.name());
    }
    // Once is enough: a second call is refused, and `up` again leaves it alone.
    let mut c = cluster.node(1).connect().unwrap();
    let err = c.batch_execute("select mtm.init_cluster('host=x', '{}')").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "55006");
    Cluster::up(&cluster.layout.data_dir, &UpOptions::default()).unwrap();
    let n: i64 = c.query_one("select count(*) from mtm.cluster_nodes", &[]).unwrap().get(0);
    assert_eq!(n, 3);
    assert!(cluster.status()[1].detail.contains("node 2 of 3"), "{}", cluster.status()[1].detail);
}

#[test]
fn up_keeps_the_users_proxy_configuration() {
    let cluster = TestCluster::start(1);
    let dir = cluster.layout.data_dir.to_str().unwrap().to_string();
    let path = cluster.layout.proxy_config();
    let mut cfg = mtm_proxy::config::Config::load(&path).unwrap();
    cfg.proxy.pause_timeout = std::time::Duration::from_secs(7);
    let edited = format!("# edited by hand\n{}", cfg.to_toml());
    std::fs::write(&path, &edited).unwrap();

    let out = mtmctl(&["down", "--data-dir", &dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = mtmctl(&["up", "--data-dir", &dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(std::fs::read_to_string(&path).unwrap(), edited, "`up` rewrote {}", path.display());
    // The proxy runs with the edit, not with a regenerated file.
    let mut admin = postgres::Client::connect(&cluster.proxy_conninfo("mtm"), postgres::NoTls).unwrap();
    let timeout = admin.simple_query("show config").unwrap().iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("proxy.pause_timeout") => r.get(1).map(str::to_string),
        _ => None,
    });
    assert_eq!(timeout.as_deref(), Some("7s"));

    // A file that does not parse stops `up` with one line naming it.
    cluster.down("fast").unwrap();
    std::fs::write(&path, "this is not toml").unwrap();
    let out = mtmctl(&["up", "--data-dir", &dir]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
}

/// A data directory created with another build of the extension's SQL
/// (the nodes keep its objects; there are no upgrade scripts): `up`
/// still starts it, and says so once, with what to do.
#[test]
fn up_warns_when_the_extension_changed_since_the_cluster_was_created() {
    let cluster = TestCluster::start(1);
    let dir = cluster.layout.data_dir.to_str().unwrap().to_string();
    let created = std::fs::read_to_string(cluster.layout.file()).unwrap();
    let fingerprint = created.lines().find_map(|l| l.strip_prefix("extension_script = ")).map(str::to_string);
    assert!(fingerprint.as_ref().is_some_and(|f| f.len() == 18), "recorded at creation: {created}");

    let out = mtmctl(&["down", "--data-dir", &dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = mtmctl(&["up", "--data-dir", &dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"), "same build: no warning");

    let out = mtmctl(&["down", "--data-dir", &dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let older = created.replace(fingerprint.as_deref().unwrap(), "\"0000000000000000\"");
    std::fs::write(cluster.layout.file(), older).unwrap();
    let out = mtmctl(&["up", "--data-dir", &dir]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: the multimaster extension installed now is not the build"), "{err}");
    assert!(err.contains("create the cluster anew"), "{err}");
}

/// `mtmctl up --database app`: the cluster replicates `app` (created on
/// every node, the extension installed there); sessions through the
/// proxy to `app` on different nodes write to every node; `postgres` is
/// then an ordinary database local to each node.
#[test]
fn a_cluster_replicates_the_database_it_was_created_for() {
    use postgres::{Client, NoTls};
    let c = TestCluster::start_for(3, "app");
    assert_eq!(c.layout.database, "app");
    let connect = |db: &str| Client::connect(&c.proxy_conninfo(db), NoTls).expect("through the proxy");
    let mut s: Vec<Client> = (0..3).map(|_| connect("app")).collect();
    let ports: std::collections::BTreeSet<i32> =
        s.iter_mut().map(|cl| cl.query_one("select current_setting('port')::int", &[]).unwrap().get(0)).collect();
    assert_eq!(ports.len(), 3, "sessions on three nodes");
    s[0].batch_execute("create table t(id int primary key, v text)").unwrap();
    for (i, cl) in s.iter_mut().enumerate() {
        cl.execute("insert into t values ($1, 'x')", &[&(i as i32)]).unwrap();
    }
    for id in 1..=3 {
        let mut node = Client::connect(&c.node(id).admin_conninfo("app"), NoTls).unwrap();
        let n: i64 = node.query_one("select count(*) from t", &[]).unwrap().get(0);
        assert_eq!(n, 3, "node{id}: every row in app");
        let setting: String = node.query_one("show multimaster.database", &[]).unwrap().get(0);
        assert_eq!(setting, "app");
    }
    // Another database is each node's own: a table made there through the
    // proxy exists on the session's node only.
    let mut other = connect("postgres");
    let port: i32 = other.query_one("select current_setting('port')::int", &[]).unwrap().get(0);
    other.batch_execute("create table local_only(id int)").unwrap();
    for id in 1..=3 {
        let mut node = Client::connect(&c.node(id).admin_conninfo("postgres"), NoTls).unwrap();
        let exists: bool = node.query_one("select to_regclass('local_only') is not null", &[]).unwrap().get(0);
        assert_eq!(exists, c.node(id).port as i32 == port, "node{id}");
    }
}

/// `mtmctl up` right after a node's postmaster was killed with kill -9
/// starts it again: PostgreSQL refuses to start while the old postmaster
/// (until it is reaped) or its children linger, and `up` waits for them
/// rather than failing.
#[test]
fn up_right_after_a_kill_9_starts_the_node_again() {
    let cluster = TestCluster::start(3);
    let pid = cluster.node(2).pid().expect("node2 runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let dir = cluster.layout.data_dir.to_str().unwrap().to_string();
    let out = mtmctl(&["up", "--data-dir", &dir]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(cluster.node(2).pid().is_some_and(|p| p != pid));
    assert_eq!(psql_ok(cluster.node(2).port, "select 1"), "1");
}
