//! mtm-proxy in front of real PostgreSQL nodes, driven by real clients
//! (psql, pgbench, the postgres crate) and by raw sockets for bad input.

use mtm_proxy::config::{AuthMethod, ClientTlsMode};
use mtm_tests::cluster::{converge, nothing_prepared, spread_sessions};
use mtm_tests::{http_get, pgbench, psql, psql_ok, self_signed_cert};
use mtmctl::testing::TestCluster;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn connect(port: u16, db: &str) -> Client {
    Client::connect(&format!("host=127.0.0.1 port={port} user=postgres dbname={db} connect_timeout=10"), NoTls)
        .expect("connect through the proxy")
}

/// Reads backend messages until one with `tag`; returns its body.
fn read_until(s: &mut TcpStream, tag: u8) -> Vec<u8> {
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).expect("read message header");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).unwrap();
        if head[0] == tag {
            return body;
        }
    }
}

/// What the proxy sent before it closed `s` (a close with bytes of ours
/// unread is a reset, as from PostgreSQL).
fn closed_unanswered(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    got
}

fn sqlstate(body: &[u8]) -> String {
    mtm_proxy::net::scan::sqlstate(body).unwrap_or_default()
}

fn startup_packet(user: &str) -> Vec<u8> {
    startup_packet_with(196608, &format!("user\0{user}\0database\0postgres\0\0"))
}

/// A startup packet of protocol `version` with `params` (`name\0value\0…\0`).
fn startup_packet_with(version: u32, params: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(params.as_bytes());
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// Reads one backend message: (tag, body).
fn read_message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("read message header");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).unwrap();
    (head[0], body)
}

/// pgbench in each query mode through the proxy of a 3-node cluster, its
/// clients spread over the nodes; TPC-B's writes (retried on 40001, as
/// pgbench does with --max-tries) leave every node with the same tables
/// and balances that add up.
#[test]
fn pgbench_simple_extended_prepared_and_tpcb_through_the_proxy() {
    let c = TestCluster::start(3);
    let port = c.layout.proxy_port;
    let (ok, out) = pgbench(port, &["-i", "-q", "-s", "1"]);
    assert!(ok, "{out}");
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out) = pgbench(port, &["-S", "-M", mode, "-c", "4", "-j", "2", "-t", "200"]);
        assert!(ok, "{mode}: {out}");
        assert!(out.contains("number of transactions actually processed: 800/800"), "{mode}: {out}");
        assert!(out.contains("number of failed transactions: 0"), "{mode}: {out}");
    }
    // One branch row updated from three nodes: conflicts are certain, and
    // pgbench retries the transactions refused with 40001.
    let (ok, out) = pgbench(port, &["-M", "prepared", "-c", "3", "-t", "40", "--max-tries=1000"]);
    assert!(ok && out.contains("processed: 120/120"), "{out}");
    converge(&c, &["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]);
    nothing_prepared(&c, Duration::from_secs(10));
    for id in 1..=3 {
        let sums = psql_ok(
            c.node(id).port,
            "select count(*), (select sum(delta) from pgbench_history), (select sum(abalance) from pgbench_accounts), \
             (select sum(bbalance) from pgbench_branches), (select sum(tbalance) from pgbench_tellers) from pgbench_history",
        );
        let f: Vec<&str> = sums.split('|').collect();
        assert_eq!(f[0], "120", "node{id}: every committed transaction once: {sums}");
        assert!(f[1..].iter().all(|v| *v == f[1]), "node{id}: balances add up: {sums}");
    }
}

#[test]
fn psql_features_copy_errors_and_large_rows() {
    let c = TestCluster::start(3);
    let port = c.layout.proxy_port;
    psql_ok(port, "create table t(id int primary key, v text)");
    // COPY FROM STDIN / TO STDOUT through psql.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("in.csv");
    std::fs::write(&csv, (1..=1000).map(|i| format!("{i},row {i}\n")).collect::<String>()).unwrap();
    psql_ok(port, &format!("\\copy t from '{}' csv", csv.display()));
    assert_eq!(psql_ok(port, "select count(*), sum(id) from t"), "1000|500500");
    let out = psql_ok(port, "copy (select * from t order by id limit 3) to stdout");
    assert_eq!(out, "1\trow 1\n2\trow 2\n3\trow 3");

    // COPY FROM STDIN in the extended protocol with its Sync sent before
    // the data, as tokio-postgres sends it (the node ignores that Sync):
    // committed through the cluster, the session goes on.
    let mut cl = connect(port, "postgres");
    let mut w = cl.copy_in("copy t from stdin").unwrap();
    w.write_all((2001..=2010).map(|i| format!("{i}\tcopied {i}\n")).collect::<String>().as_bytes()).unwrap();
    assert_eq!(w.finish().unwrap(), 10);
    assert_eq!(cl.query_one("select count(*) from t where id > 2000", &[]).unwrap().get::<_, i64>(0), 10);
    cl.batch_execute("delete from t where id > 2000").unwrap();

    // An error inside a transaction, then ROLLBACK: the session goes on.
    cl.batch_execute("begin; insert into t values (5000, 'x')").unwrap();
    let err = cl.batch_execute("insert into t values (1, 'dup')").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505");
    assert_eq!(cl.batch_execute("select 1").unwrap_err().code().unwrap().code(), "25P02");
    cl.batch_execute("rollback").unwrap();
    assert_eq!(cl.query_one("select count(*) from t where id = 5000", &[]).unwrap().get::<_, i64>(0), 0);

    // Portal fetched in chunks (Execute with a row limit → PortalSuspended).
    let mut tx = cl.transaction().unwrap();
    let portal = tx.bind("select id from t order by id", &[]).unwrap();
    let mut seen = 0;
    loop {
        let rows = tx.query_portal(&portal, 300).unwrap();
        if rows.is_empty() {
            break;
        }
        seen += rows.len();
    }
    assert_eq!(seen, 1000);
    tx.commit().unwrap();

    // A 100 MB value in both directions.
    let big = "x".repeat(100 * 1024 * 1024);
    cl.execute("insert into t values ($1, $2)", &[&9999i32, &big]).unwrap();
    let row = cl.query_one("select v from t where id = 9999", &[]).unwrap();
    let back: String = row.get(0);
    assert_eq!(back.len(), big.len());
    assert!(back == big);

    // LISTEN/NOTIFY across two sessions on different nodes.
    let mut listener = connect(port, "postgres");
    assert_ne!(node_port(&mut listener), node_port(&mut cl), "listener and notifier on different nodes");
    listener.batch_execute("listen chan").unwrap();
    cl.batch_execute("notify chan, 'hello'").unwrap();
    let mut n = listener.notifications();
    let note = n.timeout_iter(Duration::from_secs(10)).next().unwrap().expect("a notification");
    assert_eq!((note.channel(), note.payload()), ("chan", "hello"));
    drop(n);
    // Every node has the same rows, the 100 MB one included.
    converge(&c, &["t"]);
    assert_eq!(psql_ok(c.node(3).port, "select count(*), max(length(v)) from t"), "1001|104857600");
}

/// The node port a session landed on.
fn node_port(cl: &mut Client) -> i32 {
    cl.query_one("select current_setting('port')::int", &[]).unwrap().get(0)
}

/// Three sessions, one on each node, each in a pg_sleep: a CancelRequest
/// with one session's key ends that session's statement alone.
#[test]
fn cancel_reaches_the_right_backend() {
    let c = TestCluster::start(3);
    let sessions = spread_sessions(&c, 3);
    let tokens: Vec<_> = sessions.iter().map(|(_, cl)| cl.cancel_token()).collect();
    let start = Instant::now();
    let running: Vec<_> = sessions
        .into_iter()
        .map(|(id, mut cl)| {
            std::thread::spawn(move || {
                let r = cl.batch_execute("select pg_sleep(4)");
                (id, cl, r, start.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    tokens[1].cancel_query(NoTls).unwrap();
    for t in running {
        let (id, mut cl, r, took) = t.join().unwrap();
        if id == 2 {
            let err = r.unwrap_err();
            assert_eq!(err.code().unwrap().code(), "57014", "{err}");
            assert!(took < Duration::from_secs(3), "node2's statement cancelled at once: {took:?}");
        } else {
            r.unwrap_or_else(|e| panic!("node{id}'s session was not the one cancelled: {e}"));
            assert!(took >= Duration::from_secs(4), "node{id} slept in full: {took:?}");
        }
        // Every session survives.
        assert_eq!(cl.query_one("select 2", &[]).unwrap().get::<_, i32>(0), 2);
    }
}

#[test]
fn bad_input_is_refused_and_other_sessions_do_not_notice() {
    let c = TestCluster::start(3);
    let port = c.layout.proxy_port;
    let mut bystander = connect(port, "postgres");
    bystander.batch_execute("begin; create temp table keep(x int); insert into keep values (1)").unwrap();

    // Truncated startup packet, then close.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[0, 0, 0, 40, 0, 3, 0]).unwrap();
    drop(s);

    // Absurd startup length, or a Terminate before the startup packet (a
    // node-postgres client ended while connecting): closed without an
    // answer, as PostgreSQL does (it only logs it) — an orderly close, not
    // a reset.
    for junk in [&[0x7f, 0, 0, 0, 0, 3, 0, 0][..], &[b'X', 0, 0, 0, 4][..]] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(junk).unwrap();
        let mut got = Vec::new();
        let closed = s.read_to_end(&mut got);
        assert!(closed.is_ok(), "closed with a reset after {junk:?}: {closed:?}");
        assert_eq!(got, Vec::<u8>::new(), "no answer to {junk:?}");
    }

    // Garbage after SSLRequest (TLS disabled: 'N', then junk).
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], b'N');
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(closed_unanswered(&mut s), Vec::<u8>::new());

    // A client asking for protocol 3.2 with a protocol option (a newer
    // libpq with max_protocol_version=latest): PostgreSQL 15 answers
    // NegotiateProtocolVersion (3.0, the option unknown) before anything
    // else, and the session goes on in 3.0.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup_packet_with(196610, "user\0postgres\0_pq_.test_option\0x\0database\0postgres\0\0")).unwrap();
    let (tag, body) = read_message(&mut s);
    assert_eq!(tag, b'v', "NegotiateProtocolVersion first: {}", String::from_utf8_lossy(&body));
    assert_eq!(body, [&196608u32.to_be_bytes()[..], &1u32.to_be_bytes(), b"_pq_.test_option\0"].concat());
    assert_eq!(read_message(&mut s).0, b'R');
    read_until(&mut s, b'Z');
    s.write_all(&[b'Q', 0, 0, 0, 14, b's', b'e', b'l', b'e', b'c', b't', b' ', b'4', b'2', 0]).unwrap();
    let row = read_until(&mut s, b'D');
    assert_eq!(&row[6..], b"42");

    // No user: 28000, as from PostgreSQL.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup_packet_with(196608, "database\0postgres\0\0")).unwrap();
    let body = read_until(&mut s, b'E');
    assert_eq!(sqlstate(&body), "28000", "{}", String::from_utf8_lossy(&body));

    // A replication connection (pg_basebackup, pg_receivewal through the
    // proxy): refused with what to do instead.
    for value in ["database", "true"] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&startup_packet_with(196608, &format!("user\0postgres\0replication\0{value}\0\0"))).unwrap();
        let body = read_until(&mut s, b'E');
        assert_eq!(sqlstate(&body), "0A000", "{}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains("Connect to a node directly"));
    }

    // A malformed message after login: length word below 4.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup_packet("postgres")).unwrap();
    read_until(&mut s, b'Z');
    s.write_all(&[b'Q', 0, 0, 0, 2]).unwrap();
    let body = read_until(&mut s, b'E');
    assert_eq!(sqlstate(&body), "08P01");
    assert!(String::from_utf8_lossy(&body).contains("invalid message length"));

    // A Query without its terminator.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup_packet("postgres")).unwrap();
    read_until(&mut s, b'Z');
    s.write_all(&[b'Q', 0, 0, 0, 7, b'a', b'b', b'c']).unwrap();
    let body = read_until(&mut s, b'E');
    assert_eq!(sqlstate(&body), "08P01");

    // Oversized message: limit lowered to 64 KiB.
    c.reconfigure_proxy(|cfg| cfg.limits.max_message_size = 64 * 1024);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup_packet("postgres")).unwrap();
    read_until(&mut s, b'Z');
    s.write_all(&[b'Q', 0, 0x10, 0, 0]).unwrap();
    let body = read_until(&mut s, b'E');
    assert_eq!(sqlstate(&body), "08P01");
    assert!(String::from_utf8_lossy(&body).contains("exceeds the limit"), "{}", String::from_utf8_lossy(&body));

    // psql sees the same limit as a clear error.
    let big = format!("select '{}'", "y".repeat(100_000));
    let out = psql(port, &["-c", &big]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the limit"), "{}", String::from_utf8_lossy(&out.stderr));

    // The proxy restarted for the new limit, so the bystander is gone; but
    // sessions opened now work, and nothing above crashed the proxy.
    drop(bystander);
    assert_eq!(psql_ok(port, "select 41 + 1"), "42");
}

#[test]
fn tls_and_scram_at_the_proxy() {
    let c = TestCluster::start(1);
    let port = c.layout.proxy_port;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_cert(dir.path());
    let users = dir.path().join("users.txt");
    let verifier = postgres_protocol::password::scram_sha_256(b"s3cret");
    std::fs::write(&users, format!("\"postgres\" \"{verifier}\"\n")).unwrap();
    c.reconfigure_proxy(|cfg| {
        cfg.tls.mode = ClientTlsMode::Require;
        cfg.tls.cert_file = Some(cert.clone());
        cfg.tls.key_file = Some(key.clone());
        cfg.auth.method = AuthMethod::ScramSha256;
        cfg.auth.users_file = Some(users.clone());
    });
    let run = |password: &str, sslmode: &str| {
        std::process::Command::new("psql")
            .args(["-X", "-tAc", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"])
            .arg(format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={sslmode}"))
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
    };
    let ok = run("s3cret", "require");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // The node sees the proxy's own connection (plain TCP here).
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "f");

    let wrong = run("nope", "require");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed for user \"postgres\""),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let plain = run("s3cret", "disable");
    assert!(!plain.status.success());
    assert!(String::from_utf8_lossy(&plain.stderr).contains("TLS"), "{}", String::from_utf8_lossy(&plain.stderr));

    // An unknown user fails the same way as a wrong password.
    let out = std::process::Command::new("psql")
        .args(["-X", "-c", "select 1"])
        .arg(format!("host=127.0.0.1 port={port} user=mallory dbname=postgres sslmode=require"))
        .env("PGPASSWORD", "x")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed for user \"mallory\""));

    // SIGHUP reloads the users file: the new password works at once.
    std::fs::write(&users, "\"postgres\" \"changed\"\n").unwrap();
    let pid = c.proxy().pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP).unwrap();
    let ok = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        run("changed", "require").status.success()
    });
    assert!(ok, "new password accepted after SIGHUP");
    assert!(!run("s3cret", "require").status.success());
}

#[test]
fn admin_console_pause_resume_and_show() {
    let c = TestCluster::start(2);
    let port = c.layout.proxy_port;
    c.reconfigure_proxy(|cfg| {
        cfg.proxy.pause_timeout = Duration::from_secs(2);
        // Unused by trust-auth nodes; here only so SHOW CONFIG has a secret to hide.
        cfg.backend.password = Some("do-not-show-me".into());
    });
    let mut admin = connect(port, "mtm");
    let nodes = admin.simple_query("show nodes").unwrap();
    let rows: Vec<_> = nodes
        .iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => Some((r.get(0).unwrap().to_string(), r.get(3).unwrap().to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec![("node1".into(), "up".into()), ("node2".into(), "up".into())]);

    // PAUSE does not wait for a session idle in a transaction that wrote...
    mtm_tests::cluster::schema(&c, "create table paused(id int primary key)");
    let mut writer = connect(port, "postgres");
    writer.batch_execute("begin; insert into paused values (1)").unwrap();
    let t = Instant::now();
    admin.simple_query("pause").unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "PAUSE waited for an open transaction ({:?})", t.elapsed());

    // ...which is held at its COMMIT instead, as a new transaction is held
    // at its start, until RESUME.
    let committer = std::thread::spawn(move || {
        let start = Instant::now();
        writer.batch_execute("commit").unwrap();
        (start.elapsed(), writer)
    });
    let mut fresh = connect(port, "postgres");
    let newcomer = std::thread::spawn(move || {
        let start = Instant::now();
        fresh.batch_execute("select 1").unwrap();
        (start.elapsed(), fresh)
    });
    std::thread::sleep(Duration::from_millis(700));
    let stat = |admin: &mut Client, name: &str| {
        admin
            .simple_query("show stats")
            .unwrap()
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(name) => r.get(1).map(str::to_string),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(stat(&mut admin, "sessions_waiting"), "2");
    assert_eq!(stat(&mut admin, "paused_by"), "admin console");
    for node in [1, 2] {
        let n: i64 = mtm_tests::cluster::client(&c, node).query_one("select count(*) from paused", &[]).unwrap().get(0);
        assert_eq!(n, 0, "the commit has not run (node {node})");
    }
    let sessions = admin.simple_query("show sessions").unwrap();
    let waiting = sessions.iter().filter(|m| matches!(m, postgres::SimpleQueryMessage::Row(r) if r.get(5) == Some("waiting"))).count();
    assert_eq!(waiting, 2);
    // A second PAUSE stacks on nothing: one RESUME releases the console's pause.
    admin.simple_query("pause").unwrap();
    admin.simple_query("resume").unwrap();
    let (waited, mut writer) = committer.join().unwrap();
    assert!(waited >= Duration::from_millis(500), "the COMMIT waited for RESUME ({waited:?})");
    let (waited, _) = newcomer.join().unwrap();
    assert!(waited >= Duration::from_millis(500), "the new transaction waited for RESUME ({waited:?})");
    assert_eq!(writer.query_one("select count(*) from paused", &[]).unwrap().get::<_, i64>(0), 1);
    assert_eq!(stat(&mut admin, "paused"), "0");
    // RESUME releases only the console's own pause; there is none now.
    let err = admin.simple_query("resume").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "55000");

    let cfg = admin.simple_query("show config").unwrap();
    let cfg: Vec<(String, String)> = cfg
        .iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => Some((r.get(0).unwrap().to_string(), r.get(1).unwrap().to_string())),
            _ => None,
        })
        .collect();
    assert!(cfg.iter().any(|(k, _)| k == "limits.max_message_size"), "{cfg:?}");
    assert!(cfg.iter().all(|(_, v)| !v.contains("do-not-show-me")), "the password leaks: {cfg:?}");
    let pw = cfg.iter().find(|(k, _)| k == "backend.password").map(|(_, v)| v.as_str());
    assert_eq!(pw, Some("********"), "the key is listed, its value hidden");
    admin.simple_query("reload").unwrap();
    let err = admin.simple_query("drop everything").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42601");
}

#[test]
fn metrics_follow_prometheus_conventions() {
    let c = TestCluster::start(1);
    let port = c.layout.proxy_port;
    psql_ok(port, "create table m(x int); insert into m values (1); select * from m");
    let _ = psql(port, &["-c", "select * from no_such_table"]);
    let body = http_get(c.layout.metrics_port, "/metrics");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    let names: std::collections::BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in [
        "mtm_proxy_client_connections_total",
        "mtm_proxy_queries_total",
        "mtm_proxy_transactions_total",
        "mtm_proxy_client_bytes_received_total",
        "mtm_proxy_client_bytes_sent_total",
        "mtm_proxy_errors_total",
        "mtm_proxy_node_up",
        "mtm_proxy_server_connections",
        "mtm_proxy_query_duration_seconds",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    let ddl = scrape
        .samples
        .iter()
        .find(|s| s.metric == "mtm_proxy_queries_total" && s.labels.get("class") == Some("ddl"))
        .expect("DDL counted by class");
    assert!(matches!(ddl.value, prometheus_parse::Value::Counter(v) if v >= 1.0));
    let err = scrape
        .samples
        .iter()
        .find(|s| s.metric == "mtm_proxy_errors_total" && s.labels.get("sqlstate_class") == Some("42"))
        .expect("the undefined-table error counted under class 42");
    assert!(matches!(err.value, prometheus_parse::Value::Counter(v) if v >= 1.0));
    let hist = scrape.samples.iter().find(|s| s.metric == "mtm_proxy_query_duration_seconds").unwrap();
    assert!(matches!(hist.value, prometheus_parse::Value::Histogram(_)), "latency is a histogram");
}

#[test]
fn routing_spreads_sessions_and_refuses_clearly_when_no_node_is_up() {
    let c = TestCluster::start(2);
    let port = c.layout.proxy_port;
    // least_sessions: two concurrent sessions land on different nodes.
    let mut a = connect(port, "postgres");
    let mut b = connect(port, "postgres");
    let pa: i32 = a.query_one("select current_setting('port')::int", &[]).unwrap().get(0);
    let pb: i32 = b.query_one("select current_setting('port')::int", &[]).unwrap().get(0);
    assert_ne!(pa, pb);
    drop((a, b));
    // Sessions one after another (psql runs, a script's connections) take
    // turns too, rather than all landing on the first node.
    let ports: std::collections::BTreeSet<String> =
        (0..4).map(|_| psql_ok(port, "select current_setting('port')")).collect();
    assert_eq!(ports.len(), 2, "{ports:?}");

    c.node(1).stop(&c.host, "immediate").unwrap();
    c.node(2).stop(&c.host, "immediate").unwrap();
    let t = Instant::now();
    let out = psql(port, &["-c", "select 1"]);
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(15), "no hang: {:?}", t.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cluster node is available"), "{err}");
}

#[test]
fn unix_socket_and_graceful_sigterm() {
    let c = TestCluster::start(1);
    let port = c.layout.proxy_port;
    let sock = tempfile::tempdir().unwrap();
    let sock_dir = sock.path().to_str().unwrap().to_string();
    c.reconfigure_proxy(|cfg| {
        cfg.proxy.unix_socket_dir = sock_dir.clone();
        cfg.proxy.shutdown_timeout = Duration::from_secs(20);
    });
    let out = std::process::Command::new("psql")
        .args(["-X", "-h", &sock_dir, "-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-tAc", "select 7"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7", "{}", String::from_utf8_lossy(&out.stderr));

    // SIGTERM with a transaction open: no new sessions, the open one finishes.
    let mut open = connect(port, "postgres");
    open.batch_execute("begin; create table during_shutdown(x int)").unwrap();
    let pid = c.proxy().pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the proxy stops accepting at SIGTERM"
    );
    open.batch_execute("insert into during_shutdown values (1); commit").unwrap();
    drop(open);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        c.proxy().pid().is_none()
    });
    assert!(gone, "the proxy exits once its last session ends");
    assert_eq!(psql_ok(c.node(1).port, "select count(*) from during_shutdown"), "1");
}

#[test]
fn scram_and_tls_towards_the_node() {
    let c = TestCluster::start(1);
    let node = c.node(1);
    let dir = c.layout.data_dir.join("node-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed_cert(&dir);
    for f in [&dir, &cert, &key] {
        c.host.give(f).unwrap();
    }
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The node: TLS on, SCRAM for every TCP connection.
    for sql in [
        "alter system set ssl = on".to_string(),
        format!("alter system set ssl_cert_file = '{}'", cert.display()),
        format!("alter system set ssl_key_file = '{}'", key.display()),
        // (On the node directly: a schema change there needs the opt-in.)
        "set multimaster.direct_writes = on; set password_encryption = 'scram-sha-256'; alter role postgres password 'node-pw'".to_string(),
    ] {
        psql_ok(node.port, &sql);
    }
    let hba = node.dir.join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n").unwrap();
    node.stop(&c.host, "fast").unwrap();
    node.start(&c.host).unwrap();

    c.reconfigure_proxy(|cfg| {
        cfg.auth.method = AuthMethod::Trust;
        cfg.backend.password = Some("node-pw".into());
        cfg.backend.tls = mtm_proxy::config::BackendTlsMode::Require;
        // TLS needs TCP (mtmctl's configuration uses the unix sockets).
        for n in &mut cfg.nodes {
            n.host = "127.0.0.1".into();
        }
    });
    let port = c.layout.proxy_port;
    // The proxy logs in with SCRAM over TLS; the client needs neither.
    assert_eq!(psql_ok(port, "select ssl from pg_stat_ssl where pid = pg_backend_pid()"), "t");
    // Health checks use the same path, so the node stays up.
    std::thread::sleep(Duration::from_millis(1500));
    let mut admin = connect(port, "mtm");
    let rows = admin.simple_query("show nodes").unwrap();
    assert!(rows.iter().any(|m| matches!(m, postgres::SimpleQueryMessage::Row(r) if r.get(3) == Some("up"))));

    // A wrong node password is the node's own 28P01, passed on.
    c.reconfigure_proxy(|cfg| {
        cfg.auth.method = AuthMethod::Trust;
        cfg.backend.password = Some("wrong".into());
        cfg.backend.tls = mtm_proxy::config::BackendTlsMode::Require;
        // TLS needs TCP (mtmctl's configuration uses the unix sockets).
        for n in &mut cfg.nodes {
            n.host = "127.0.0.1".into();
        }
    });
    let out = psql(port, &["-c", "select 1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(c.layout.proxy_log()).unwrap_or_default();
    assert!(err.contains("password authentication failed for user \"postgres\""), "{err}\nproxy log:\n{log}");
}

#[test]
fn pipelines_function_calls_and_limits() {
    let c = TestCluster::start(3);
    let port = c.layout.proxy_port;
    psql_ok(port, "create table p(id int primary key)");
    // A pipeline with an error in the middle: pgbench \startpipeline.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("pipe.sql");
    std::fs::write(
        &script,
        "\\startpipeline\nselect 1;\nselect 2;\nselect 3;\n\\endpipeline\n",
    )
    .unwrap();
    let (ok, out) = pgbench(port, &["-n", "-M", "extended", "-c", "2", "-t", "50", "-f", script.to_str().unwrap()]);
    assert!(ok && out.contains("processed: 100/100"), "{out}");
    let mut cl = connect(port, "postgres");
    cl.batch_execute("insert into p values (1)").unwrap();
    // Several statements in one simple Query with a failure in the middle:
    // the rest is skipped and the session is usable afterwards.
    let err = cl.batch_execute("insert into p values (2); insert into p values (1); insert into p values (3)").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505");
    assert_eq!(cl.query_one("select count(*) from p", &[]).unwrap().get::<_, i64>(0), 1);

    // FunctionCall ('F'): psql's \lo_import uses libpq's fast-path calls.
    // Large objects are not replicated: refused in the replicated
    // database (the refusal comes back through the same path), fine in
    // another one, which is local to the node.
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, vec![42u8; 200_000]).unwrap();
    let import = format!("\\lo_import '{}'", file.display());
    let out = psql(port, &["-c", &import]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("large objects are not replicated"), "{stderr}");
    psql_ok(port, "create database blobs");
    let out = std::process::Command::new("psql")
        .args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "blobs"])
        .args(["-c", &import, "-c", "select current_setting('port')"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The large object is on the node that session was on, and only there.
    let home: u16 = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().parse().unwrap();
    for n in c.nodes() {
        let out = std::process::Command::new("psql")
            .args(["-X", "-At", "-h", "127.0.0.1", "-p", &n.port.to_string(), "-U", "postgres", "-d", "blobs"])
            .args(["-c", "select coalesce(sum(length(data)), 0) from pg_largeobject"])
            .output()
            .unwrap();
        let want = if n.port == home { "200000" } else { "0" };
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{}", n.name());
    }

    // Client limits: the third connection is refused with 53300, and an
    // idle session is closed with 57P05.
    c.reconfigure_proxy(|cfg| {
        cfg.limits.max_client_connections = 2;
        cfg.limits.client_idle_timeout = Duration::from_secs(1);
    });
    let a = connect(port, "postgres");
    let b = connect(port, "postgres");
    let third = Client::connect(&format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"), NoTls);
    assert_eq!(third.err().and_then(|e| e.code().cloned()).map(|c| c.code().to_string()).as_deref(), Some("53300"));
    drop(b);
    let mut a = a;
    std::thread::sleep(Duration::from_millis(1800));
    let err = a.batch_execute("select 1").unwrap_err();
    let code = err.code().map(|c| c.code().to_string());
    assert!(code.as_deref() == Some("57P05") || a.is_closed(), "{err:?}");
}

/// A simple-protocol Query message.
fn query_message(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

#[test]
fn reload_reaches_sessions_already_open() {
    let c = TestCluster::start(3);
    let port = c.layout.proxy_port;
    let open = || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(&startup_packet("postgres")).unwrap();
        read_until(&mut s, b'Z');
        s
    };
    let query = |s: &mut TcpStream| {
        s.write_all(&query_message("select 1")).unwrap();
        read_until(s, b'Z');
    };
    // Rewrites the proxy's file and reloads it through the admin console;
    // the proxy keeps running.
    let reload = |edit: &dyn Fn(&mut mtm_proxy::config::Config)| {
        let path = c.layout.proxy_config();
        let mut cfg = mtm_proxy::config::Config::load(&path).unwrap();
        edit(&mut cfg);
        std::fs::write(&path, cfg.to_toml()).unwrap();
        connect(port, "mtm").simple_query("reload").unwrap();
    };
    let mut small = open();
    let mut idle = open();
    query(&mut small);
    query(&mut idle);
    let started = mtm_proxy::config::Config::load(&c.layout.proxy_config()).unwrap();
    assert!(started.limits.client_idle_timeout.is_zero(), "the sessions start without an idle timeout");

    // limits.max_message_size: an open session is held to it from the
    // read it starts after the reload (within a second).
    reload(&|cfg| cfg.limits.max_message_size = 4096);
    std::thread::sleep(Duration::from_millis(1200));
    small.write_all(&query_message(&format!("select '{}'", "x".repeat(10_000)))).unwrap();
    assert_eq!(sqlstate(&read_until(&mut small, b'E')), "08P01");

    // limits.client_idle_timeout: an open session that has run queries is
    // closed once it has been idle for the new timeout, not before.
    reload(&|cfg| cfg.limits.client_idle_timeout = Duration::from_secs(2));
    query(&mut idle);
    std::thread::sleep(Duration::from_millis(1200));
    query(&mut idle);
    let since = Instant::now();
    let body = read_until(&mut idle, b'E');
    let waited = since.elapsed();
    assert_eq!(sqlstate(&body), "57P05");
    assert!(waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4), "closed after {waited:?}");
}

/// TCP keepalive is on, with the configured time, on the proxy's client
/// connections and on its connections to nodes it reaches over TCP
/// (`limits.tcp_keepalive`): a peer whose host vanished without closing
/// the connection is noticed instead of being waited for forever. Read
/// from the kernel's own socket table (`ss`), as an operator would.
#[test]
fn client_and_node_connections_are_kept_alive() {
    let c = TestCluster::start(3);
    c.reconfigure_proxy(|cfg| {
        cfg.limits.tcp_keepalive = Duration::from_secs(37);
        for n in &mut cfg.nodes {
            n.host = "127.0.0.1".into();
        }
    });
    let port = c.layout.proxy_port;
    let mut sessions: Vec<Client> = (0..3).map(|_| connect(port, "postgres")).collect();
    let homes: std::collections::BTreeSet<i32> =
        sessions.iter_mut().map(|s| s.query_one("select current_setting('port')::int", &[]).unwrap().get(0)).collect();
    assert_eq!(homes.len(), 3, "one session on each node: {homes:?}");
    let proxy = c.proxy().pid().expect("the proxy runs");
    // Columns: Recv-Q Send-Q local peer process timer.
    let ports = |line: &str| -> (u16, u16) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |a: &str| a.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (port(f[2]), port(f[3]))
    };
    // A socket with data in flight shows its retransmission timer instead:
    // look again until the idle sessions' sockets all show theirs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("ss").args(["-tnopH", "state", "established"]).output().expect("ss (iproute2)");
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let proxys: Vec<&str> = table.lines().filter(|l| l.contains(&format!("pid={proxy},"))).collect();
        let clients: Vec<&&str> = proxys.iter().filter(|l| ports(l).0 == port).collect();
        let nodes: Vec<&&str> = proxys.iter().filter(|l| homes.contains(&(ports(l).1 as i32))).collect();
        assert!(clients.len() >= 3 && nodes.len() >= 3, "the proxy's client and node connections:\n{}", proxys.join("\n"));
        // The time left to the first probe: within the configured 37 s,
        // above the default 10 s.
        let probe_in = |l: &str| {
            let t = l.split("timer:(keepalive,").nth(1)?.split(',').next()?;
            t.strip_suffix("sec")?.parse::<f64>().ok()
        };
        if clients.iter().chain(&nodes).all(|l| probe_in(l).is_some()) {
            for l in clients.iter().chain(&nodes) {
                let t = probe_in(l).unwrap();
                assert!(t > 10.0 && t <= 37.0, "keepalive not as configured (37 s):\n{l}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "a connection of the proxy without keepalive:\n{}", proxys.join("\n"));
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(sessions);
}

/// Errors raised inside statements the extension's hooks wrap (COPY, DO,
/// functions, DDL) reach the client whole, as one PostgreSQL sends them:
/// their CONTEXT lines (the COPY line, the PL/pgSQL call stack) and their
/// schema, table and constraint names, through the proxy and on a node
/// directly.
#[test]
fn errors_keep_their_context_and_fields() {
    let c = TestCluster::start(3);
    let port = c.layout.proxy_port;
    psql_ok(port, "create table ctx(id int primary key, v int)");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, "1,1\n2,2\n3,bad\n").unwrap();
    let out = psql(port, &["-c", &format!("\\copy ctx from '{}' csv", csv.display())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CONTEXT:  COPY ctx, line 3, column v: \"bad\""), "{stderr}");
    let out = psql(port, &["-c", "do $$ begin perform 1/0; end $$"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CONTEXT:  SQL statement \"SELECT 1/0\"") && stderr.contains("PL/pgSQL function inline_code_block line 1 at PERFORM"), "{stderr}");
    // The same on a node directly (the hooks run there too).
    let out = psql(c.node(2).port, &["-c", "do $$ begin perform 1/0; end $$"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("PL/pgSQL function inline_code_block"), "{}", String::from_utf8_lossy(&out.stderr));

    // A unique violation inside COPY and inside a function called by a
    // utility statement (CALL) keep their schema, table and constraint.
    let mut cl = connect(port, "postgres");
    cl.batch_execute("insert into ctx values (1, 1); create procedure dup() language sql as $$ insert into ctx values (1, 1) $$").unwrap();
    for sql in ["copy ctx from stdin", "call dup()"] {
        let e = if sql.starts_with("copy") {
            let mut w = cl.copy_in(sql).unwrap();
            w.write_all(b"1\t1\n").unwrap();
            w.finish().unwrap_err()
        } else {
            cl.batch_execute(sql).unwrap_err()
        };
        let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
        assert_eq!((db.code().code(), db.schema(), db.table(), db.constraint()), ("23505", Some("public"), Some("ctx"), Some("ctx_pkey")), "{sql}: {db:?}");
        assert!(db.where_().is_some(), "{sql}: the context of the error: {db:?}");
    }
}

#[test]
fn new_sessions_go_to_another_node_while_one_cannot_take_them() {
    let c = TestCluster::start(3);
    mtm_tests::cluster::wait_connected(&c);
    // A smart shutdown of node 1 while a session of its own stays open:
    // until that session ends the node refuses new ones (57P03, as while it
    // starts up or recovers from a crash), before any authentication.
    let held = mtm_tests::cluster::client(&c, 1);
    std::thread::scope(|scope| {
        let stopping = scope.spawn(|| c.node(1).stop(&c.host, "smart"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let refused = mtm_tests::psql(c.layout.node_ports[0], &["-c", "select 1"]);
            if String::from_utf8_lossy(&refused.stderr).contains("shutting down") {
                break;
            }
            assert!(Instant::now() < deadline, "node 1 does not refuse sessions");
            std::thread::sleep(Duration::from_millis(20));
        }
        // New sessions through the proxy land on the other nodes.
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..12 {
            let mut cl = Client::connect(&c.proxy_conninfo("postgres"), NoTls).unwrap_or_else(|e| panic!("session {i}: {e:?}"));
            let port: i32 = cl.query_one("select current_setting('port')::int", &[]).unwrap().get(0);
            ports.insert(port);
        }
        assert!(!ports.contains(&(c.layout.node_ports[0] as i32)), "{ports:?}");
        assert_eq!(ports.len(), 2, "{ports:?}");
        drop(held);
        stopping.join().unwrap().expect("node 1 stops");
    });
    c.node(1).start(&c.host).unwrap();
    mtm_tests::cluster::wait_connected(&c);
}
