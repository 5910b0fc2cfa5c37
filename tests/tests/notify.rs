//! LISTEN/NOTIFY through the proxy of a 3-node cluster: listeners on
//! every node hear every NOTIFY sent from a session on any node, when its
//! transaction commits, and nothing of one that rolled back.

use mtm_tests::cluster::{client, nothing_prepared, schema, spread_sessions, wait_connected};
use mtmctl::testing::TestCluster;
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use std::time::Duration;

fn one_per_node(c: &TestCluster) -> Vec<Client> {
    spread_sessions(c, 3).into_iter().map(|(_, cl)| cl).collect()
}

/// Up to `n` payloads heard on channel `chan`, each waited for at most `wait`.
fn payloads(l: &mut Client, n: usize, wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let mut notes = l.notifications();
    let mut it = notes.timeout_iter(wait);
    while out.len() < n {
        match it.next() {
            Ok(Some(note)) => {
                assert_eq!(note.channel(), "chan");
                out.push(note.payload().to_string());
            }
            Ok(None) => break,
            Err(e) => panic!("{e}"),
        }
    }
    out
}

/// A 3-node cluster with table `t`, a session on each node listening on
/// `chan`, and another session on each node to send from.
fn listeners_and_senders() -> (TestCluster, Vec<Client>, Vec<Client>) {
    let c = TestCluster::start(3);
    schema(&c, "create table t(id int primary key)");
    wait_connected(&c);
    let mut listeners = one_per_node(&c);
    for l in &mut listeners {
        l.batch_execute("listen chan").unwrap();
    }
    let senders = one_per_node(&c);
    (c, listeners, senders)
}

#[test]
fn a_listener_on_any_node_hears_a_notify_from_any_node_once_it_commits() {
    let (c, mut listeners, mut senders) = listeners_and_senders();
    senders[0].batch_execute("notify chan, 'autocommit'").unwrap();
    senders[1].batch_execute("begin; insert into t values (1); notify chan, 'with a write'; commit").unwrap();
    senders[2].batch_execute("begin; notify chan, 'rolled back'; rollback").unwrap();
    senders[2]
        .batch_execute("begin; savepoint s; notify chan, 'undone'; rollback to s; notify chan, 'kept'; commit")
        .unwrap();
    senders[0].batch_execute("do $$ begin execute 'notify chan, ''from plpgsql'''; end $$").unwrap();
    let err = senders[1].batch_execute("notify chan, ''").map(|_| ());
    assert!(err.is_ok(), "an empty payload is a payload: {err:?}");
    let err = senders[1].batch_execute(&format!("notify chan, '{}'", "x".repeat(8000))).unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "payload too long, as PostgreSQL says: {err:?}");

    for (i, l) in listeners.iter_mut().enumerate() {
        let heard = payloads(l, 5, Duration::from_secs(10));
        assert_eq!(heard, ["autocommit", "with a write", "kept", "from plpgsql", ""], "listener {i}");
        let more = payloads(l, 1, Duration::from_millis(500));
        assert!(more.is_empty(), "listener {i} heard more: {more:?}");
    }
    nothing_prepared(&c, Duration::from_secs(10));
    for id in 1..=3 {
        let left: i64 = client(&c, id).query_one("select count(*) from mtm.notifications", &[]).unwrap().get(0);
        assert_eq!(left, 0, "node{id} keeps no delivered notification");
        let rows: i64 = client(&c, id).query_one("select count(*) from t", &[]).unwrap().get(0);
        assert_eq!(rows, 1, "node{id}");
    }
}

/// `pg_notify()` — the form triggers and applications use — reaches the
/// listeners of every node like the NOTIFY statement: called in a query,
/// from a trigger's PL/pgSQL, and not when its transaction rolls back.
#[test]
fn pg_notify_from_a_query_or_a_trigger_is_heard_on_every_node() {
    let c = TestCluster::start(3);
    schema(&c, "create table t(id int primary key)");
    schema(
        &c,
        "create function t_notify() returns trigger language plpgsql as \
         $$ begin perform pg_notify('chan', 'row ' || new.id); return new; end $$; \
         create trigger t_notify after insert on t for each row execute function t_notify()",
    );
    wait_connected(&c);
    let mut listeners = one_per_node(&c);
    for l in &mut listeners {
        l.batch_execute("listen chan").unwrap();
    }
    let mut senders = one_per_node(&c);
    senders[0].batch_execute("select pg_notify('chan', 'called')").unwrap();
    senders[1].batch_execute("insert into t values (7)").unwrap();
    senders[2].batch_execute("begin; select pg_notify('chan', 'rolled back'); insert into t values (8); rollback").unwrap();
    senders[2].batch_execute("begin; insert into t values (9); select PG_NOTIFY('chan', 'in a block'); commit").unwrap();
    for (i, l) in listeners.iter_mut().enumerate() {
        let heard = payloads(l, 4, Duration::from_secs(10));
        assert_eq!(heard, ["called", "row 7", "row 9", "in a block"], "listener {i}");
        let more = payloads(l, 1, Duration::from_millis(500));
        assert!(more.is_empty(), "listener {i} heard more: {more:?}");
    }
    nothing_prepared(&c, Duration::from_secs(10));
}

/// The pid a client is given at login (`PQbackendPID`, psycopg's
/// `info.backend_pid`, asyncpg's `get_server_pid()`) is its backend's on
/// its node, as on one PostgreSQL: `pg_backend_pid()` says the same, a
/// client knows its own notifications by it — in autocommit and from a
/// transaction that wrote — and a notification from another session of
/// its node carries that session's pid. (One from another node carries
/// the pid of the process that delivered it there.)
#[test]
fn a_sessions_pid_is_its_backends_and_names_its_notifications() {
    let c = TestCluster::start(3);
    schema(&c, "create table t(id int primary key)");
    wait_connected(&c);
    let script = r#"
import sys, psycopg
dsn = sys.argv[1]
me = psycopg.connect(dsn, autocommit=True)
node = lambda cn: cn.execute("select current_setting('port')").fetchone()[0]
others = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
far = next(o for o in others if node(o) != node(me))
near = next(o for o in others if node(o) == node(me))
me.execute("listen chan")
me.execute("notify chan, 'autocommit'")
with me.transaction():
    me.execute("insert into t values (1)")
    me.execute("notify chan, 'wrote'")
near.execute("notify chan, 'near'")
far.execute("notify chan, 'far'")
heard = {}
for n in me.notifies(timeout=10, stop_after=4):
    heard[n.payload] = n.pid
mine = me.info.backend_pid
print(sorted(heard),
      me.execute("select pg_backend_pid()").fetchone()[0] == mine,
      heard["autocommit"] == mine, heard["wrote"] == mine,
      heard["near"] == near.info.backend_pid, heard["far"] not in (mine, far.info.backend_pid))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &c.proxy_conninfo("postgres")])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "['autocommit', 'far', 'near', 'wrote'] True True True True True");
}

/// A session cancels or terminates another by the pid that session was
/// given, whichever node each is on (drivers' test suites and job runners
/// do this): PostgreSQL's own functions, run where the pid lives, as the
/// caller's role — same answers, same permission errors.
#[test]
fn a_pid_from_another_node_can_be_cancelled_and_terminated() {
    let c = TestCluster::start(3);
    let mut s = one_per_node(&c);
    let mut far = s.pop().unwrap();
    let mut me = s.remove(0);
    let far_pid: i32 = far.query_one("select pg_backend_pid()", &[]).unwrap().get(0);
    let mine: i32 = me.query_one("select pg_backend_pid()", &[]).unwrap().get(0);
    assert_ne!(far_pid, mine);

    // Cancel: the far session's statement ends with 57014.
    let running = std::thread::spawn(move || {
        let r = far.batch_execute("select pg_sleep(30)");
        (far, r)
    });
    std::thread::sleep(Duration::from_millis(500));
    let cancelled: bool = me.query_one("select pg_cancel_backend($1)", &[&far_pid]).unwrap().get(0);
    assert!(cancelled);
    let (mut far, r) = running.join().unwrap();
    let e = r.expect_err("the far statement was cancelled");
    assert_eq!(mtm_tests::cluster::sqlstate(&e), "57014", "{e:?}");
    assert_eq!(far.query_one("select 1", &[]).unwrap().get::<_, i32>(0), 1, "a cancel leaves the session");

    // A role that may not signal a superuser's backend: PostgreSQL's own
    // refusal, from the node where the backend is.
    schema(&c, "create role plain login");
    let mut plain = postgres::Client::connect(&format!("host=127.0.0.1 port={} user=plain dbname=postgres", c.layout.proxy_port), postgres::NoTls).unwrap();
    let e = plain.query_one("select pg_cancel_backend($1)", &[&far_pid]).expect_err("plain may not cancel a superuser");
    assert_eq!(mtm_tests::cluster::sqlstate(&e), "42501", "{e:?}");

    // A pid no node has: PostgreSQL's warning and false.
    let nobody: bool = me.query_one("select pg_terminate_backend(2147483000)", &[]).unwrap().get(0);
    assert!(!nobody);

    // Terminate, waiting for the backend to exit: the far session is gone.
    let terminated: bool = me.query_one("select pg_terminate_backend($1, 5000)", &[&far_pid]).unwrap().get(0);
    assert!(terminated);
    assert!(far.query_one("select 1", &[]).is_err(), "the far session ended");
    assert_eq!(me.query_one("select 1", &[]).unwrap().get::<_, i32>(0), 1);
}

/// A transaction that LISTENs (or UNLISTENs) and NOTIFYs, as clients'
/// notification tests do (`LISTEN c; NOTIFY c, 'x'`): PostgreSQL cannot
/// PREPARE it, so it commits on its node, and every node's listeners
/// still hear its notifications — its own session included. One that
/// also writes to a replicated table needs the two-phase commit: 0A000,
/// nothing committed.
#[test]
fn a_transaction_that_listens_and_notifies_is_heard_on_every_node() {
    let (c, mut listeners, mut senders) = listeners_and_senders();
    senders[0].batch_execute("listen chan; notify chan, 'listen first'").unwrap();
    senders[1].batch_execute("begin; notify chan, 'notify first'; listen other; commit").unwrap();
    senders[2].batch_execute("begin; unlisten chan; select pg_notify('chan', 'function'); commit").unwrap();
    senders[1].batch_execute("begin; notify chan, 'n1'; notify chan, 'n2'; listen other; commit").unwrap();
    senders[0].batch_execute("begin; notify chan, 'before a savepoint'; savepoint s; listen other; notify chan, 'undone'; rollback to s; commit").unwrap();
    for writes_then_listens in [
        "begin; insert into t values (1); listen other; notify chan, 'with a write'; commit",
        "begin; notify chan, 'notify, write'; insert into t values (2); listen other; commit",
        "begin; select pg_notify('chan', 'pg_notify, write'); insert into t values (3); listen other; commit",
    ] {
        let e = senders[2].batch_execute(writes_then_listens).unwrap_err();
        assert_eq!(mtm_tests::cluster::sqlstate(&e), "0A000", "{writes_then_listens}: {e:?}");
        senders[2].batch_execute("rollback").unwrap();
    }
    for (i, l) in listeners.iter_mut().enumerate() {
        let mut heard = payloads(l, 6, Duration::from_secs(10));
        heard.sort();
        assert_eq!(heard, ["before a savepoint", "function", "listen first", "n1", "n2", "notify first"], "listener {i}");
        let more = payloads(l, 1, Duration::from_millis(500));
        assert!(more.is_empty(), "listener {i} heard more: {more:?}");
    }
    let own = payloads(&mut senders[0], 1, Duration::from_secs(10));
    assert_eq!(own, ["listen first"], "the sender listening on its channel hears itself");
    nothing_prepared(&c, Duration::from_secs(10));
    for id in 1..=3 {
        let rows: i64 = client(&c, id).query_one("select count(*) from t", &[]).unwrap().get(0);
        assert_eq!(rows, 0, "node{id}: the refused transaction wrote nothing");
    }
}
