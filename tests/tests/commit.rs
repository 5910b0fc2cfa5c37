//! The synchronous commit path through the proxy of a 3-node cluster:
//! sessions spread over the nodes (the test asserts they are), every
//! outcome checked on every node directly. Tables are created and rows
//! written through the proxy.

use mtm_tests::cluster::{client, converge, nothing_prepared, prepared, proxy_client, schema, signal_node, sqlstate, wait_connected};
use mtmctl::testing::TestCluster;
use postgres::Client;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn port_of(cl: &mut Client) -> i32 {
    cl.query_one("select current_setting('port')::int", &[]).unwrap().get(0)
}

/// `n` proxy sessions, held open together so the router spreads them.
fn sessions(c: &TestCluster, n: usize) -> Vec<Client> {
    (0..n).map(|_| proxy_client(c)).collect()
}

fn commits(c: &TestCluster, outcome: &str) -> f64 {
    let text = mtm_tests::http_get(c.layout.metrics_port, "/metrics");
    text.lines()
        .find(|l| l.starts_with(&format!("mtm_proxy_commits_total{{outcome=\"{outcome}\"}}")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn no_gid_left(c: &TestCluster) {
    nothing_prepared(c, Duration::from_secs(10));
}

/// Runs `sql` on `cl` in a thread (a COMMIT that waits for votes, a
/// statement that keeps an open transaction busy); join for the session
/// and the result.
fn run_in_thread(mut cl: Client, sql: &'static str) -> std::thread::JoinHandle<(Client, Result<(), postgres::Error>)> {
    std::thread::spawn(move || {
        let r = cl.batch_execute(sql);
        (cl, r)
    })
}

/// `open`, inside a transaction, runs `busy` while `other` runs `sql`,
/// which commits; the open transaction gives way (its statement fails
/// with 40001). Returns `open`, rolled back.
fn gives_way(open: Client, busy: &'static str, other: &mut Client, sql: &str) -> Client {
    let running = run_in_thread(open, busy);
    std::thread::sleep(Duration::from_millis(300));
    other.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: it commits: {e:?}"));
    let (mut open, r) = running.join().unwrap();
    let e = r.expect_err("the open transaction gave way");
    assert_eq!(sqlstate(&e), "40001", "{e:?}");
    assert!(format!("{e:?}").contains("gives way"), "{e:?}");
    open.batch_execute("rollback").unwrap();
    open
}

#[test]
fn a_commit_is_visible_on_every_node_when_it_returns() {
    let c = TestCluster::start(3);
    schema(&c, "create table seen(id int primary key, v int)");
    let mut s = sessions(&c, 3);
    let mut nodes: Vec<Client> = (1..=3).map(|id| client(&c, id)).collect();
    for i in 0..60 {
        let writer = &mut s[i % 3];
        writer.batch_execute(&format!("insert into seen values ({i}, 0)")).unwrap();
        writer.batch_execute(&format!("begin; update seen set v = {i} where id = {i}; commit")).unwrap();
        // Read at once on every node directly: no waiting, no retry.
        for (id, n) in nodes.iter_mut().enumerate() {
            let v: Option<i32> = n.query_opt("select v from seen where id = $1", &[&(i as i32)]).unwrap().map(|r| r.get(0));
            assert_eq!(v, Some(i as i32), "node{} right after COMMIT of row {i}", id + 1);
        }
    }
    assert_eq!(commits(&c, "committed"), 120.0 + 1.0, "every write through the 2PC (and the CREATE TABLE)");
    // Writes that change no row still go through the 2PC; the peers
    // acknowledge their commit like any other.
    for writer in &mut s {
        writer.batch_execute("update seen set v = v where id = -1").unwrap();
        writer.batch_execute("delete from seen where id = -2").unwrap();
        writer.batch_execute("insert into seen values (0, 0) on conflict do nothing").unwrap();
    }
    assert_eq!(commits(&c, "committed"), 121.0 + 9.0, "writes of no row through the 2PC too");
    let text = mtm_tests::http_get(c.layout.metrics_port, "/metrics");
    assert!(!text.lines().any(|l| l.starts_with("mtm_proxy_commits_unconfirmed_total") && !l.ends_with(" 0")), "{text}");
}

#[test]
fn a_transaction_bigger_than_the_vote_timeout_allows_still_commits() {
    // With a 3 s vote timeout, a transaction whose decoding and streaming
    // take longer (about 10 s here): the wait runs from the moment each
    // peer has been sent it, not from the PREPARE. (The peer still applies
    // what sits in its buffers after that: a few MB.)
    let c = TestCluster::start(3);
    c.reconfigure_proxy(|cfg| cfg.commit.vote_timeout = Duration::from_secs(3));
    schema(&c, "create table bulk(id int primary key, pad text)");
    let t = Instant::now();
    proxy_client(&c)
        .batch_execute("insert into bulk select g, repeat(md5(g::text), 4) from generate_series(1, 600000) g")
        .unwrap();
    eprintln!("600 000 rows committed through the proxy in {:?}", t.elapsed());
    assert!(t.elapsed() > Duration::from_secs(3), "the transaction took longer than one vote timeout, or it proves nothing");
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from bulk", &[]).unwrap().get(0);
        assert_eq!(n, 600_000, "node{id}, right after COMMIT");
    }
}

#[test]
fn commit_and_chain_commits_everywhere_and_keeps_the_transaction_like_it() {
    let c = TestCluster::start(3);
    schema(&c, "create table chained(id int primary key)");
    let mut s = sessions(&c, 3);
    let before = commits(&c, "committed");
    s[1].batch_execute("begin isolation level repeatable read; insert into chained values (1)").unwrap();
    s[1].batch_execute("commit and chain").unwrap();
    let iso: String = s[1].query_one("show transaction_isolation", &[]).unwrap().get(0);
    assert_eq!(iso, "repeatable read", "the chained transaction is like the first");
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from chained", &[]).unwrap().get(0);
        assert_eq!(n, 1, "node{id}: the first part is committed everywhere");
    }
    s[1].batch_execute("insert into chained values (2)").unwrap();
    s[1].batch_execute("commit").unwrap();
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from chained", &[]).unwrap().get(0);
        assert_eq!(n, 2, "node{id}");
    }
    assert_eq!(commits(&c, "committed") - before, 2.0, "both parts through the cluster's commit");

    // The same in the extended protocol (execute() sends Parse/Bind/
    // Execute/Sync), from a session on another node.
    s[2].batch_execute("begin isolation level serializable").unwrap();
    s[2].execute("insert into chained values (3)", &[]).unwrap();
    s[2].execute("commit and chain", &[]).unwrap();
    let iso: String = s[2].query_one("show transaction_isolation", &[]).unwrap().get(0);
    assert_eq!(iso, "serializable", "the chained transaction is like the first");
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from chained", &[]).unwrap().get(0);
        assert_eq!(n, 3, "node{id}: the first part is committed everywhere");
    }
    s[2].execute("insert into chained values (4)", &[]).unwrap();
    s[2].execute("commit", &[]).unwrap();
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from chained", &[]).unwrap().get(0);
        assert_eq!(n, 4, "node{id}");
    }
    assert_eq!(commits(&c, "committed") - before, 4.0, "every part through the cluster's commit");
}

#[test]
fn conflicting_updates_on_two_nodes_abort_with_40001_and_nodes_agree() {
    let c = TestCluster::start(3);
    schema(&c, "create table acc(id int primary key, v int)");
    proxy_client(&c).batch_execute("insert into acc select g, 100 from generate_series(1, 10) g").unwrap();
    converge(&c, &["acc"]);

    let mut s = sessions(&c, 3);
    let ports: BTreeSet<i32> = s.iter_mut().map(port_of).collect();
    assert_eq!(ports.len(), 3, "three sessions through the proxy are on three nodes");
    let (mut a, mut b) = {
        let mut it = s.drain(..2);
        (it.next().unwrap(), it.next().unwrap())
    };
    for round in 0..3 {
        a.batch_execute("begin; update acc set v = v + 1 where id = 1").unwrap();
        b.batch_execute("begin; update acc set v = v + 10 where id = 1").unwrap();
        let ta = run_in_thread(a, "commit");
        let tb = run_in_thread(b, "commit");
        let (na, ra) = ta.join().unwrap();
        let (nb, rb) = tb.join().unwrap();
        a = na;
        b = nb;
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert_eq!(sqlstate(e), "40001", "round {round}: {e:?}");
                let text = format!("{e:?}");
                assert!(text.contains("node"), "the error names the node: {text}");
            }
        }
        assert!(
            ra.is_err() != rb.is_err(),
            "round {round}: exactly one of two conflicting transactions commits: {ra:?} {rb:?}"
        );
        converge(&c, &["acc"]);
        no_gid_left(&c);
    }
    // The sessions are usable after a 40001.
    assert_eq!(a.query_one("select count(*) from acc", &[]).unwrap().get::<_, i64>(0), 10);
    // Each node has the value the committed updates produced.
    let v: Vec<i32> = (1..=3).map(|id| client(&c, id).query_one("select v from acc where id = 1", &[]).unwrap().get(0)).collect();
    assert!(v.windows(2).all(|w| w[0] == w[1]), "{v:?}");
    assert!((103..=130).contains(&v[0]), "three rounds each committed one update: {v:?}");
}

/// `PREPARE TRANSACTION` sent in the extended protocol (as JDBC's XA
/// support and other transaction managers send it) collects every node's
/// vote like the simple-protocol one: when it returns the gid is prepared
/// on every node, and of two conflicting ones exactly one is refused with
/// 40001 and prepared nowhere.
#[test]
fn a_clients_prepare_transaction_in_the_extended_protocol_is_voted_on() {
    let c = TestCluster::start(3);
    schema(&c, "create table x(id int primary key, v int)");
    proxy_client(&c).batch_execute("insert into x values (1, 0)").unwrap();
    converge(&c, &["x"]);
    let mut s = sessions(&c, 3);
    let ports: BTreeSet<i32> = s.iter_mut().map(port_of).collect();
    assert_eq!(ports.len(), 3, "three sessions through the proxy are on three nodes");

    // execute() sends Parse/Bind/Execute/Sync.
    s[0].batch_execute("begin").unwrap();
    s[0].execute("insert into x values (2, 0)", &[]).unwrap();
    assert_eq!(s[0].execute("prepare transaction 'xa-1'", &[]).unwrap(), 0);
    for gids in prepared(&c) {
        assert_eq!(gids, ["xa-1"], "prepared on every node when PREPARE TRANSACTION returns");
    }

    let mut b = s.pop().unwrap();
    let mut a = s.pop().unwrap();
    a.batch_execute("begin; update x set v = 1 where id = 1").unwrap();
    b.batch_execute("begin; update x set v = 2 where id = 1").unwrap();
    let ta = std::thread::spawn(move || {
        let r = a.execute("prepare transaction 'xa-a'", &[]);
        (a, r)
    });
    let tb = std::thread::spawn(move || {
        let r = b.execute("prepare transaction 'xa-b'", &[]);
        (b, r)
    });
    let (mut a, ra) = ta.join().unwrap();
    let (_b, rb) = tb.join().unwrap();
    assert!(ra.is_err() != rb.is_err(), "exactly one of two conflicting prepares is refused: {ra:?} {rb:?}");
    let (winner, refused) = if ra.is_ok() { ("xa-a", rb) } else { ("xa-b", ra) };
    let e = refused.unwrap_err();
    assert_eq!(sqlstate(&e), "40001", "{e:?}");
    let mut expected = vec!["xa-1".to_string(), winner.to_string()];
    expected.sort();
    for gids in prepared(&c) {
        assert_eq!(gids, expected, "the refused gid is prepared nowhere");
    }

    // Finished from any session, in the extended protocol too.
    a.execute(&format!("commit prepared '{winner}'"), &[]).unwrap();
    a.execute("commit prepared 'xa-1'", &[]).unwrap();
    converge(&c, &["x"]);
    no_gid_left(&c);
    let v = if winner == "xa-a" { 1 } else { 2 };
    for id in 1..=3 {
        let rows: Vec<(i32, i32)> = client(&c, id).query("select id, v from x order by id", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(rows, vec![(1, v), (2, 0)], "node{id}");
    }
}

/// A transaction prepared on one node wins over a conflicting one still
/// open on another that runs a statement or waits for a lock: the open
/// one gives way at once with 40001, instead of the prepared one waiting
/// for a lock timeout and being refused.
/// A cross-node deadlock: three sessions, one on each node, each holding
/// one row on its node and then taking the next session's row (1→2, 2→3,
/// 3→1), all committing at once — each commit needs a row another node's
/// transaction holds. It ends within seconds: any two of the three share
/// a row, so exactly one commits and the others get 40001, and every node
/// has the same rows.
#[test]
fn a_deadlock_across_three_nodes_ends_in_seconds_with_40001() {
    let c = TestCluster::start(3);
    schema(&c, "create table ring(id int primary key, v int)");
    proxy_client(&c).batch_execute("insert into ring select g, 0 from generate_series(1, 3) g").unwrap();
    converge(&c, &["ring"]);
    let mut s: Vec<Client> = mtm_tests::cluster::spread_sessions(&c, 3).into_iter().map(|(_, cl)| cl).collect();
    let mut committed = 0;
    for round in 0..5 {
        for (i, cl) in s.iter_mut().enumerate() {
            cl.batch_execute(&format!("begin; update ring set v = v + 1 where id = {}", i + 1)).unwrap();
        }
        for (i, cl) in s.iter_mut().enumerate() {
            cl.batch_execute(&format!("update ring set v = v + 1 where id = {}", (i + 1) % 3 + 1)).unwrap();
        }
        let start = Instant::now();
        let running: Vec<_> = s
            .drain(..)
            .map(|cl| run_in_thread(cl, "commit"))
            .collect();
        let mut ok = 0;
        for t in running {
            let (cl, r) = t.join().unwrap();
            match &r {
                Ok(()) => ok += 1,
                Err(e) => assert_eq!(sqlstate(e), "40001", "round {round}: {e:?}"),
            }
            s.push(cl);
        }
        let took = start.elapsed();
        assert!(took < Duration::from_secs(10), "round {round}: the deadlock lasted {took:?}");
        assert_eq!(ok, 1, "round {round}: exactly one transaction of the ring commits");
        committed += ok;
        converge(&c, &["ring"]);
        no_gid_left(&c);
    }
    for id in 1..=3 {
        let sum: i64 = client(&c, id).query_one("select sum(v) from ring", &[]).unwrap().get(0);
        assert_eq!(sum, 2 * committed, "node{id}: two rows per committed transaction");
    }
}

#[test]
fn an_open_transaction_gives_way_to_a_conflicting_one_prepared_on_another_node() {
    let c = TestCluster::start(3);
    schema(&c, "create table acc(id int primary key, v int)");
    proxy_client(&c).batch_execute("insert into acc select g, 100 from generate_series(1, 3) g").unwrap();
    converge(&c, &["acc"]);
    // Two sessions on each node, in node order.
    let mut s: Vec<Client> = mtm_tests::cluster::spread_sessions(&c, 6).into_iter().map(|(_, cl)| cl).collect();
    let mut nodes_of = |i: usize| port_of(&mut s[i]);
    assert_eq!(nodes_of(0), nodes_of(1), "two sessions on the first node");
    assert_ne!(nodes_of(0), nodes_of(2));
    let mut b = s.remove(2);
    let mut a2 = s.remove(1);
    let mut a1 = s.remove(0);

    // An open transaction holding row 1 on the first node, busy with a
    // long statement. Row 1 from the second node: its apply on the first
    // node finds that transaction in its way, which gives way.
    a1.batch_execute("begin; update acc set v = v + 1 where id = 1").unwrap();
    let mut a1 = gives_way(a1, "select pg_sleep(30)", &mut b, "update acc set v = v + 10 where id = 1");

    // An open transaction that waits for a lock (row 2, held by a1) while
    // holding row 3, which the second node changes: its wait is cancelled
    // and reported as 40001.
    a1.batch_execute("begin; update acc set v = v + 1 where id = 2").unwrap();
    a2.batch_execute("begin; update acc set v = v + 1 where id = 3").unwrap();
    gives_way(a2, "update acc set v = v + 1 where id = 2", &mut b, "update acc set v = v + 10 where id = 3");
    a1.batch_execute("rollback").unwrap();

    converge(&c, &["acc"]);
    no_gid_left(&c);
    for id in 1..=3 {
        let rows: Vec<(i32, i32)> =
            client(&c, id).query("select id, v from acc order by id", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(rows, vec![(1, 110), (2, 100), (3, 110)], "node{id}");
    }
}

#[test]
fn a_child_row_and_the_delete_of_its_parent_on_two_nodes_never_both_commit() {
    let c = TestCluster::start(3);
    schema(
        &c,
        "create table parent(id int primary key);
         create table child(id int primary key, parent int not null references parent);
         create table tree(id int primary key, up int references tree)",
    );
    proxy_client(&c).batch_execute("insert into parent select generate_series(1, 3)").unwrap();
    converge(&c, &["parent"]);
    let mut s: Vec<Client> = mtm_tests::cluster::spread_sessions(&c, 3).into_iter().map(|(_, cl)| cl).collect();
    let mut b = s.remove(1);
    let mut a = s.remove(0);

    // The parent is deleted on the first node (no child there yet), and
    // while that transaction is open a child of it is inserted on the
    // second node. The child's apply on the first node looks its parent up
    // and waits for the delete's lock: the open delete gives way, instead
    // of both committing and leaving the child without its parent.
    a.batch_execute("begin; delete from parent where id = 1").unwrap();
    let mut a = gives_way(a, "select pg_sleep(30)", &mut b, "insert into child values (1, 1)");

    // The other order: the child's transaction is open on the second node
    // (its parent locked FOR KEY SHARE there) when the first node deletes
    // the parent; the delete's apply on the second node waits for that lock
    // and the open transaction gives way.
    b.batch_execute("begin; insert into child values (2, 2)").unwrap();
    let mut b = gives_way(b, "select pg_sleep(30)", &mut a, "delete from parent where id = 2");

    // A child that its own statement's parent follows: checked at the end
    // of the statement at home, and at the PREPARE on the peers, so it
    // commits everywhere.
    a.batch_execute("insert into tree values (2, 1), (1, null)").expect("one statement, checked at its end");
    // A parent already gone everywhere: refused at home, as always.
    let e = b.batch_execute("insert into child values (3, 2)").expect_err("no parent 2");
    assert_eq!(sqlstate(&e), "23503", "{e:?}");

    // A migration: rows of a child table, then a schema change or a
    // TRUNCATE of it in the same transaction (PostgreSQL refuses those on a
    // table with checks still pending; at home they ran at each statement).
    a.batch_execute("create table child2(id int primary key, parent int references parent)").unwrap();
    a.batch_execute("begin; insert into child2 values (1, 3); alter table child2 add column n text; create index on child2(n); insert into child2 values (2, 3, 'x'); commit")
        .expect("rows, then a schema change of their table");
    b.batch_execute("begin; insert into child2 values (3, 3); truncate child2; insert into child2 values (4, 1, 'y'); commit").expect("rows, then a TRUNCATE");

    // A superuser's repair on a node directly, as a replica (no checks
    // there): the peers apply it as it was made, and go on applying.
    let mut direct = client(&c, 1);
    direct.batch_execute("set session_replication_role = replica; insert into child values (9, 999)").unwrap();
    converge(&c, &["child"]);
    direct.batch_execute("delete from child where id = 9").unwrap();
    converge(&c, &["parent", "child", "tree", "child2"]);
    no_gid_left(&c);
    for id in 1..=3 {
        let mut cl = client(&c, id);
        let parents: Vec<i32> = cl.query("select id from parent order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(parents, vec![1, 3], "node{id}");
        let children: Vec<(i32, i32)> = cl.query("select id, parent from child order by id", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(children, vec![(1, 1)], "node{id}");
        let orphans: i64 = cl.query_one("select count(*) from child where parent not in (select id from parent)", &[]).unwrap().get(0);
        assert_eq!(orphans, 0, "node{id}");
        let tree: i64 = cl.query_one("select count(*) from tree", &[]).unwrap().get(0);
        assert_eq!(tree, 2, "node{id}");
        let child2: Vec<(i32, String)> = cl.query("select id, n from child2", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(child2, vec![(4, "y".to_string())], "node{id}");
    }
}

#[test]
fn locks_are_each_nodes_own_and_what_they_guard_still_conflicts() {
    let c = TestCluster::start(3);
    schema(&c, "create table job(id int primary key, owner text)");
    proxy_client(&c).batch_execute("insert into job values (1, null)").unwrap();
    converge(&c, &["job"]);
    let mut s: Vec<Client> = mtm_tests::cluster::spread_sessions(&c, 2).into_iter().map(|(_, cl)| cl).collect();
    let mut b = s.pop().unwrap();
    let mut a = s.pop().unwrap();
    // On two nodes, neither waits for the other (the README says so)...
    for cl in [&mut a, &mut b] {
        cl.batch_execute("set lock_timeout = '2s'; begin").unwrap();
        let got: bool = cl.query_one("select pg_try_advisory_xact_lock(42)", &[]).unwrap().get(0);
        assert!(got, "an advisory lock is the node's own");
        let rows = cl.query("select id from job where owner is null for update skip locked", &[]).unwrap();
        assert_eq!(rows.len(), 1, "the row lock is the node's own");
        cl.batch_execute("update job set owner = current_setting('port') where id = 1").unwrap();
    }
    // ...but the rows they change conflict: one commits, one gets 40001.
    let ta = run_in_thread(a, "commit");
    let tb = run_in_thread(b, "commit");
    let results = [ta.join().unwrap().1, tb.join().unwrap().1];
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    let e = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert_eq!(sqlstate(e), "40001", "{e:?}");
    converge(&c, &["job"]);
    no_gid_left(&c);
}

#[test]
fn bank_transfers_keep_the_total_on_every_node() {
    const ACCOUNTS: i32 = 100;
    const WRITERS: usize = 12;
    const READERS: usize = 4;
    let c = Arc::new(TestCluster::start(3));
    schema(&c, "create table bank(id int primary key, balance bigint not null)");
    proxy_client(&c)
        .batch_execute(&format!("insert into bank select g, 1000 from generate_series(1, {ACCOUNTS}) g"))
        .unwrap();
    converge(&c, &["bank"]);
    let total = ACCOUNTS as i64 * 1000;

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let aborted = Arc::new(AtomicU64::new(0));
    // Open every session first, so the router spreads them over the nodes.
    let mut clients = sessions(&c, WRITERS + READERS);
    let ports: BTreeSet<i32> = clients.iter_mut().map(port_of).collect();
    assert_eq!(ports.len(), 3, "sessions on every node");
    let mut threads = Vec::new();
    for (i, mut cl) in clients.drain(..WRITERS).enumerate() {
        let (stop, committed, aborted) = (stop.clone(), committed.clone(), aborted.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = i as i32;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(1103515245).wrapping_add(12345) & 0x7fff_ffff;
                let from = n % ACCOUNTS + 1;
                let to = (n / ACCOUNTS) % ACCOUNTS + 1;
                if from == to {
                    continue;
                }
                let amount = (n % 50 + 1) as i64;
                let r = (|| {
                    let mut t = cl.transaction()?;
                    t.execute("update bank set balance = balance - $1 where id = $2", &[&amount, &from])?;
                    t.execute("update bank set balance = balance + $1 where id = $2", &[&amount, &to])?;
                    t.commit()
                })();
                match r {
                    Ok(()) => committed.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        let code = sqlstate(&e);
                        assert!(["40001", "40P01", "0A000"].contains(&code.as_str()), "transfer failed: {e:?}");
                        aborted.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let wrong_totals = Arc::new(AtomicU64::new(0));
    for mut cl in clients.drain(..) {
        let (stop, wrong) = (stop.clone(), wrong_totals.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let sum: i64 = cl.query_one("select sum(balance)::bigint from bank", &[]).unwrap().get(0);
                if sum != total {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(15));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a client thread failed");
    }
    let (ok, failed) = (committed.load(Ordering::Relaxed), aborted.load(Ordering::Relaxed));
    eprintln!("bank: {ok} transfers committed, {failed} aborted (40001/40P01)");
    assert!(ok > 50, "too few transfers committed: {ok} (aborted {failed})");
    assert_eq!(wrong_totals.load(Ordering::Relaxed), 0, "a reader saw a total other than {total}");
    converge(&c, &["bank"]);
    no_gid_left(&c);
    for id in 1..=3 {
        let sum: i64 = client(&c, id).query_one("select sum(balance)::bigint from bank", &[]).unwrap().get(0);
        assert_eq!(sum, total, "node{id}");
    }
    assert!(commits(&c, "committed") >= ok as f64, "every committed transfer went through the cluster's commit");
}

/// Minimal raw-protocol client for what the postgres crate cannot send:
/// pipelines with an error in the middle, COMMIT as an extended-protocol
/// statement (as pgjdbc sends it).
struct Raw {
    s: TcpStream,
}

/// What a new user runs first: `pgbench -i` and then `pgbench -c 8`
/// through the proxy, at scale 1, where every transaction updates the
/// one branch row, with sessions on all three nodes. Most transactions
/// conflict with one prepared on another node and abort with 40001; the
/// nodes must end equal, with the balances of accounts, tellers and
/// branches in agreement and nothing left prepared. Before the peers
/// finished prepared transactions out of commit order and dropped those
/// rolled back at home unapplied, their pools fell behind under this load
/// (every rolled-back transaction applied and prepared on every peer,
/// every decision queued behind a lock wait) and about one transaction a
/// second committed; both shortcuts must be seen taken here, and the
/// third: a peer commits as soon as it promised to (its promise and the
/// home node's are a majority of three), before the home node's COMMIT
/// PREPARED reaches it.
#[test]
fn pgbench_on_one_branch_from_every_node_keeps_the_nodes_equal() {
    let c = TestCluster::start(3);
    mtm_tests::pgbench_tables(&c, 1);
    wait_connected(&c);
    let (ok, out) =
        mtm_tests::pgbench(c.layout.proxy_port, &["-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", "10", "--max-tries=1", "--failures-detailed"]);
    assert!(ok, "pgbench through the proxy: {out}");
    converge(&c, &["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]);
    nothing_prepared(&c, Duration::from_secs(30));
    let mut finished = 0;
    let mut dropped = 0;
    let mut on_promise = 0;
    for id in 1..=3 {
        let mut cl = client(&c, id);
        let row = cl
            .query_one(
                "select (select sum(abalance) from pgbench_accounts)::bigint, (select sum(tbalance) from pgbench_tellers)::bigint,
                        (select sum(bbalance) from pgbench_branches)::bigint, (select coalesce(sum(delta), 0) from pgbench_history)::bigint,
                        (select count(*) from pgbench_history)",
                &[],
            )
            .unwrap();
        let (a, t, b, h, n): (i64, i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert!(a == t && t == b && b == h, "node{id}: accounts {a}, tellers {t}, branches {b}, history {h}");
        assert!(n > 0, "node{id}: no transaction committed: {out}");
        for r in cl.query("select finished_out_of_order, dropped_before_prepare, committed_on_promise from mtm.apply_shortcuts()", &[]).unwrap() {
            finished += r.get::<_, i64>(0);
            dropped += r.get::<_, i64>(1);
            on_promise += r.get::<_, i64>(2);
        }
    }
    assert!(finished > 0, "no COMMIT/ROLLBACK PREPARED was run out of commit order");
    assert!(dropped > 0, "no transaction rolled back at home was dropped unapplied");
    assert!(on_promise > 0, "no peer committed as it promised to");
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

impl Raw {
    fn connect(port: u16) -> Raw {
        Raw::connect_keyed(port).0
    }

    /// A session and the key (pid, secret) its BackendKeyData gave.
    fn connect_keyed(port: u16) -> (Raw, [u8; 8]) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut body = 196608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        s.write_all(&p).unwrap();
        let mut r = Raw { s };
        let hello = r.until_ready();
        let key = hello.iter().find(|(t, _)| *t == b'K').map(|(_, b)| b[..8].try_into().unwrap()).expect("BackendKeyData");
        (r, key)
    }

    /// Sends a CancelRequest for `key` as libpq's PQcancel does: returns
    /// once the other end has closed the connection.
    fn cancel(port: u16, key: [u8; 8]) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut req = 16u32.to_be_bytes().to_vec();
        req.extend_from_slice(&80877102u32.to_be_bytes());
        req.extend_from_slice(&key);
        s.write_all(&req).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }

    /// Reads messages up to and including ReadyForQuery: (tag, body) each.
    fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut head = [0u8; 5];
            self.s.read_exact(&mut head).expect("read a message");
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0; len - 4];
            self.s.read_exact(&mut body).unwrap();
            let done = head[0] == b'Z';
            out.push((head[0], body));
            if done {
                return out;
            }
        }
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = cstr(name);
        b.extend(cstr(sql));
        b.extend_from_slice(&0i16.to_be_bytes());
        msg(b'P', &b)
    }

    /// Parse of `sql` as the unnamed statement, Bind and Execute of it.
    fn statement(sql: &str) -> Vec<u8> {
        let mut out = Raw::parse("", sql);
        out.extend(Raw::bind_execute(""));
        out
    }

    fn bind_execute(statement: &str) -> Vec<u8> {
        let mut b = cstr("");
        b.extend(cstr(statement));
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut out = msg(b'B', &b);
        let mut e = cstr("");
        e.extend_from_slice(&0i32.to_be_bytes());
        out.extend(msg(b'E', &e));
        out
    }

    fn sync() -> Vec<u8> {
        msg(b'S', &[])
    }

    /// The port of the node serving this session.
    fn node_port(&mut self) -> u16 {
        self.s.write_all(&Raw::query("select current_setting('port')")).unwrap();
        let msgs = self.until_ready();
        let (_, row) = msgs.iter().find(|(t, _)| *t == b'D').unwrap().clone();
        String::from_utf8_lossy(&row[6..]).parse().unwrap()
    }

    /// The id of the node serving this session in `c`.
    fn node_id(&mut self, c: &TestCluster) -> usize {
        let port = self.node_port();
        1 + c.layout.node_ports.iter().position(|&p| p == port).expect("a node's port")
    }

    /// Reads `n` messages (the client sent Flush, not Sync).
    fn read_n(&mut self, n: usize) -> Vec<(u8, Vec<u8>)> {
        (0..n)
            .map(|_| {
                let mut head = [0u8; 5];
                self.s.read_exact(&mut head).expect("read a message");
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                let mut body = vec![0; len - 4];
                self.s.read_exact(&mut body).unwrap();
                (head[0], body)
            })
            .collect()
    }

    fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', &cstr(sql))
    }

    /// Everything the client hears until the proxy closes the session:
    /// (SQLSTATE, message) of each ErrorResponse.
    fn errors_until_closed(&mut self) -> Vec<(String, String)> {
        let mut heard = Vec::new();
        let _ = self.s.read_to_end(&mut heard);
        let mut errors = Vec::new();
        let mut rest = &heard[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if rest[0] == b'E' {
                let body = &rest[5..(1 + len).min(rest.len())];
                let field = |f| mtm_proxy::net::scan::error_field(body, f).unwrap_or_default();
                errors.push((field(b'C'), field(b'M')));
            }
            rest = &rest[(1 + len).min(rest.len())..];
        }
        errors
    }
}

/// Starts node `id` again after it was killed (its postmaster may take a
/// moment to be gone).
fn start_again(c: &TestCluster, id: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = c.node(id).start(&c.host) {
        assert!(Instant::now() < deadline, "node{id} did not start again: {e}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Tags of the messages, with CommandComplete tags and ErrorResponse
/// SQLSTATEs spelled out, e.g. `C:INSERT 0 1`, `E:23505`, `Z:I`.
fn summary(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .map(|(t, b)| match t {
            b'C' => format!("C:{}", String::from_utf8_lossy(&b[..b.len() - 1])),
            b'E' => format!("E:{}", mtm_proxy::net::scan::sqlstate(b).unwrap_or_default()),
            b'Z' => format!("Z:{}", b[0] as char),
            other => (*other as char).to_string(),
        })
        .collect()
}

#[test]
fn autocommit_pipelines_and_extended_commit_are_coordinated() {
    let c = TestCluster::start(3);
    schema(
        &c,
        "create table t(id int primary key, src text);
         create function add_row(i int) returns int language sql as $$ insert into t values (i, 'function') returning i $$;
         create function pg_sneaky_write() returns int language sql as $$ insert into t values (98, 'sneaky') returning 1 $$;",
    );
    let port = c.layout.proxy_port;
    let mut s = sessions(&c, 3);
    let ports: BTreeSet<i32> = s.iter_mut().map(port_of).collect();
    assert_eq!(ports.len(), 3);
    let before = commits(&c, "committed");

    // Simple protocol: one statement, several in one Query, a SELECT
    // calling a writing function; extended protocol (the postgres crate).
    s[0].batch_execute("insert into t values (1, 'simple')").unwrap();
    s[1].batch_execute("insert into t values (2, 'multi'); insert into t values (3, 'multi')").unwrap();
    s[2].batch_execute("select add_row(4)").unwrap();
    s[0].execute("insert into t values ($1, 'extended')", &[&5i32]).unwrap();
    // COPY FROM STDIN in autocommit, through psql.
    let mut copy = std::process::Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-c", "copy t from stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    copy.stdin.take().unwrap().write_all(b"6\tcopy\n7\tcopy\n").unwrap();
    let out = copy.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after_writes = commits(&c, "committed");
    assert_eq!(after_writes - before, 5.0, "each writing autocommit unit went through the cluster's commit");

    // Reads and read-only transactions commit locally.
    s[1].query("select * from t", &[]).unwrap();
    s[1].batch_execute("begin; select count(*) from t; commit").unwrap();
    let mut t = s[2].transaction().unwrap();
    t.query("select * from t where id = $1", &[&1i32]).unwrap();
    t.commit().unwrap();
    assert_eq!(commits(&c, "committed"), after_writes, "reads do not use two-phase commit");

    // A write the keyword check takes for a read is refused by the node,
    // not committed there alone.
    let err = s[2].batch_execute("select pg_sneaky_write()").unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    assert!(format!("{err:?}").contains("two-phase commit"), "{err:?}");

    // Temporary tables stay local and commit without 2PC; mixing them
    // with replicated writes is refused before anything is lost.
    s[1].batch_execute("create temp table tmp(x int); insert into tmp values (1)").unwrap();
    s[1].batch_execute("begin").unwrap();
    s[1].batch_execute("insert into tmp values (2)").unwrap();
    s[1].batch_execute("insert into t values (99, 'temp')").unwrap();
    let err = s[1].batch_execute("commit").unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    s[1].batch_execute("select 1").unwrap();

    // A pipeline of three autocommit segments, the second failing: the
    // first and third commit everywhere, the client sees what PostgreSQL
    // would send.
    let mut raw = Raw::connect(port);
    let mut pipe = Vec::new();
    for (i, id) in [10, 1, 11].iter().enumerate() {
        pipe.extend(Raw::statement(&format!("insert into t values ({id}, 'pipeline {i}')")));
        pipe.extend(Raw::sync());
    }
    raw.s.write_all(&pipe).unwrap();
    let replies: Vec<Vec<String>> = (0..3).map(|_| summary(&raw.until_ready())).collect();
    assert_eq!(replies[0], ["1", "2", "C:INSERT 0 1", "Z:I"]);
    assert_eq!(replies[1], ["1", "2", "E:23505", "Z:I"]);
    assert_eq!(replies[2], ["1", "2", "C:INSERT 0 1", "Z:I"]);

    // COMMIT as a named extended-protocol statement (pgjdbc's way).
    raw.s.write_all(&Raw::parse("commit_stmt", "COMMIT")).unwrap();
    raw.s.write_all(&Raw::sync()).unwrap();
    assert_eq!(summary(&raw.until_ready()), ["1", "Z:I"]);
    raw.s.write_all(&Raw::query("begin")).unwrap();
    raw.until_ready();
    let mut unit = Raw::statement("insert into t values (12, 'extended commit')");
    unit.extend(Raw::sync());
    raw.s.write_all(&unit).unwrap();
    assert_eq!(summary(&raw.until_ready()), ["1", "2", "C:INSERT 0 1", "Z:T"]);
    let mut commit = Raw::bind_execute("commit_stmt");
    commit.extend(Raw::sync());
    let before_commit = commits(&c, "committed");
    raw.s.write_all(&commit).unwrap();
    assert_eq!(summary(&raw.until_ready()), ["2", "C:COMMIT", "Z:I"]);
    assert_eq!(commits(&c, "committed"), before_commit + 1.0);

    converge(&c, &["t"]);
    let ids: Vec<i32> = client(&c, 3).query("select id from t order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7, 10, 11, 12]);
    no_gid_left(&c);
}

/// A COMMIT, ROLLBACK or COMMIT AND CHAIN in the middle of one Query
/// string ends its transaction there, and PostgreSQL runs the rest of the
/// string in a transaction of its own; through the proxy each committed
/// part goes through the cluster's commit. Sessions on every node; the
/// client sees what one PostgreSQL sends (checked against a node run
/// without the cluster's commit: the same tags, notices and errors).
/// Transactions sent as pipelines, as psycopg's pipeline mode and
/// pgbench's `\startpipeline` send them: BEGIN, writes and COMMIT in one
/// unit (no Sync between them) commit through the cluster, on every node;
/// an error in such a unit skips the rest of it as PostgreSQL does; so do
/// two transactions in one unit; a unit that arrives in pieces (a Flush
/// between them) inside a transaction block is decided again when a later
/// piece brings its COMMIT. Sessions on all three nodes, each checked on
/// every node.
#[test]
fn pipelined_transactions_commit_through_the_cluster() {
    let c = TestCluster::start(3);
    schema(&c, "create table pl(id int primary key)");
    wait_connected(&c);
    let port = c.layout.proxy_port;
    let mut raws: Vec<Raw> = (0..3).map(|_| Raw::connect(port)).collect();
    let mut homes = BTreeSet::new();
    for r in &mut raws {
        r.s.write_all(&Raw::query("select current_setting('port')")).unwrap();
        let answer = r.until_ready();
        homes.insert(answer.iter().find(|(t, _)| *t == b'D').map(|(_, b)| b.clone()).unwrap());
    }
    assert_eq!(homes.len(), 3, "one session on each node");
    let before = commits(&c, "committed");
    let unit = |sqls: &[&str]| -> Vec<u8> {
        let mut out = Vec::new();
        for sql in sqls {
            out.extend(Raw::statement(sql));
        }
        out
    };
    let flush = || msg(b'H', &[]);
    for (n, r) in raws.iter_mut().enumerate() {
        let id = |k: usize| (n * 10 + k).to_string();
        // BEGIN, INSERT, COMMIT and Sync in one write.
        let mut m = unit(&["begin", &format!("insert into pl values ({})", id(1)), "commit"]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        assert_eq!(summary(&r.until_ready()), ["1", "2", "C:BEGIN", "1", "2", "C:INSERT 0 1", "1", "2", "C:COMMIT", "Z:I"]);

        // A failed INSERT in such a unit: the rest, COMMIT included, is
        // skipped up to the Sync and the block stays failed, as on one
        // PostgreSQL; ROLLBACK ends it.
        let mut m = unit(&["begin", &format!("insert into pl values ({})", id(2)), &format!("insert into pl values ({})", id(1)), "commit"]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        assert_eq!(summary(&r.until_ready()), ["1", "2", "C:BEGIN", "1", "2", "C:INSERT 0 1", "1", "2", "E:23505", "Z:E"]);
        r.s.write_all(&Raw::query("rollback")).unwrap();
        assert_eq!(summary(&r.until_ready()), ["C:ROLLBACK", "Z:I"]);

        // Two transactions in one unit, each committed through the cluster.
        let mut m = unit(&["begin", &format!("insert into pl values ({})", id(5)), "commit", "begin", &format!("insert into pl values ({})", id(6)), "commit"]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        let twice = ["1", "2", "C:BEGIN", "1", "2", "C:INSERT 0 1", "1", "2", "C:COMMIT"];
        assert_eq!(summary(&r.until_ready()), [&twice[..], &twice[..], &["Z:I"]].concat());

        // A write after the COMMIT in the same unit runs in an implicit
        // transaction of its own, committed at the Sync: with the BEGIN in
        // the unit, and with it sent before (psycopg's pipeline outside
        // autocommit).
        let mut m = unit(&["begin", &format!("insert into pl values ({})", id(4)), "commit", &format!("insert into pl values ({})", id(8))]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        let then_insert = ["1", "2", "C:INSERT 0 1", "Z:I"];
        assert_eq!(summary(&r.until_ready()), [&twice[..], &then_insert[..]].concat());
        r.s.write_all(&Raw::query("begin")).unwrap();
        r.until_ready();
        let mut m = unit(&[&format!("insert into pl values ({})", id(9)), "commit", &format!("insert into pl values ({})", id(0))]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        assert_eq!(summary(&r.until_ready()), [&twice[3..], &then_insert[..]].concat());

        // Without a BEGIN, a COMMIT ends the unit's implicit transaction
        // (with PostgreSQL's warning that no block is open): the writes
        // before it commit there, those after it at the Sync.
        let big = |k: usize| (100 + n * 10 + k).to_string();
        let mut m = unit(&[&format!("insert into pl values ({})", big(1)), "commit", &format!("insert into pl values ({})", big(2))]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        let implicit = ["1", "2", "C:INSERT 0 1", "1", "2", "N", "C:COMMIT"];
        assert_eq!(summary(&r.until_ready()), [&implicit[..], &then_insert[..]].concat());
        let mut m = unit(&[&format!("insert into pl values ({})", big(3)), "commit"]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        assert_eq!(summary(&r.until_ready()), [&implicit[..], &["Z:I"]].concat());

        // In pieces: an INSERT then, later, its COMMIT in a block opened
        // before.
        r.s.write_all(&Raw::query("begin")).unwrap();
        r.until_ready();
        let mut m = unit(&[&format!("insert into pl values ({})", id(3))]);
        m.extend(flush());
        r.s.write_all(&m).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut m = unit(&["commit"]);
        m.extend(Raw::sync());
        r.s.write_all(&m).unwrap();
        assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "1", "2", "C:COMMIT", "Z:I"]);
    }
    // A COPY FROM STDIN that fails before it starts, then the CopyFail and
    // Sync tokio-postgres sends after it: the node answers that Sync too
    // (it never was in COPY), and the session stays in step.
    let r = &mut raws[0];
    let mut m = unit(&["copy no_such_table from stdin"]);
    m.extend(Raw::sync());
    r.s.write_all(&m).unwrap();
    assert_eq!(summary(&r.until_ready()), ["1", "2", "E:42P01", "Z:I"]);
    // (With the next unit, a write, in the same write to the socket.)
    let mut m = msg(b'f', &cstr("gave up"));
    m.extend(Raw::sync());
    m.extend(unit(&["insert into pl values (7)"]));
    m.extend(Raw::sync());
    r.s.write_all(&m).unwrap();
    assert_eq!(summary(&r.until_ready()), ["Z:I"]);
    assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "Z:I"]);
    r.s.write_all(&Raw::query("select 42")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["T", "D", "C:SELECT 1", "Z:I"]);

    assert_eq!(commits(&c, "committed") - before, 34.0, "eleven writing transactions per session and one more through the cluster's commit");
    no_gid_left(&c);
    for id in 1..=3 {
        let rows: Vec<i32> = client(&c, id).query("select id from pl order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        let mut expected = vec![0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19, 20, 21, 23, 24, 25, 26, 28, 29];
        expected.extend([101, 102, 103, 111, 112, 113, 121, 122, 123]);
        assert_eq!(rows, expected, "node{id}");
    }

    // pgbench's pipelines of whole transactions, clients on every node.
    schema(&c, "create table plb(id int primary key, n int); insert into plb select g, 0 from generate_series(1, 20) g");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("pipe.sql");
    std::fs::write(&script, "\\set id random(1, 20)\n\\startpipeline\nbegin;\nupdate plb set n = n + 1 where id = :id;\nend;\n\\endpipeline\n").unwrap();
    let (ok, out) = mtm_tests::pgbench(port, &["-n", "-M", "extended", "-c", "3", "-t", "50", "--max-tries=1000", "-f", script.to_str().unwrap()]);
    assert!(ok && out.contains("processed: 150/150"), "{out}");
    converge(&c, &["plb"]);
    no_gid_left(&c);
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select sum(n) from plb", &[]).unwrap().get(0);
        assert_eq!(n, 150, "node{id}: every pipelined transaction once");
    }
}

#[test]
fn a_commit_inside_a_query_string_commits_there_and_the_rest_runs() {
    let c = TestCluster::start(3);
    schema(&c, "create table m(id int primary key)");
    let port = c.layout.proxy_port;
    let mut raws: Vec<Raw> = (0..3).map(|_| Raw::connect(port)).collect();
    let ports: BTreeSet<u16> = raws.iter_mut().map(Raw::node_port).collect();
    assert_eq!(ports.len(), 3, "one session per node");
    let before = commits(&c, "committed");
    let cases: [(&str, &[&str]); 9] = [
        ("begin; insert into m values (1); commit; insert into m values (2)", &["C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "C:INSERT 0 1", "Z:I"]),
        ("begin; insert into m values (3); commit; begin; insert into m values (4); commit", &["C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "Z:I"]),
        ("begin; insert into m values (90); rollback; insert into m values (5)", &["C:BEGIN", "C:INSERT 0 1", "C:ROLLBACK", "C:INSERT 0 1", "Z:I"]),
        ("insert into m values (6); commit; insert into m values (7)", &["C:INSERT 0 1", "N", "C:COMMIT", "C:INSERT 0 1", "Z:I"]),
        ("begin; insert into m values (8); commit and chain; insert into m values (9); commit", &["C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "C:INSERT 0 1", "C:COMMIT", "Z:I"]),
        ("select 1; begin; insert into m values (10); commit; select 2", &["T", "D", "C:SELECT 1", "C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "T", "D", "C:SELECT 1", "Z:I"]),
        // An error skips the rest of the string: 11 commits, 12 and 91 do not.
        ("begin; insert into m values (11); commit; insert into m values (1); insert into m values (91); commit; insert into m values (12)", &["C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "E:23505", "Z:I"]),
        ("begin; insert into m values (2); commit; insert into m values (92)", &["C:BEGIN", "E:23505", "Z:E"]),
        ("rollback; begin; insert into m values (13); commit and chain", &["N", "C:ROLLBACK", "C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "Z:T"]),
    ];
    for (i, (sql, expected)) in cases.iter().enumerate() {
        let r = &mut raws[i % 3];
        r.s.write_all(&Raw::query(sql)).unwrap();
        assert_eq!(summary(&r.until_ready()), *expected, "{sql}");
    }
    // Case 8 left its session in a failed block, case 9 in a chained one.
    for r in &mut raws[1..] {
        r.s.write_all(&Raw::query("rollback")).unwrap();
        r.until_ready();
    }
    // A client's own PREPARE TRANSACTION inside a string is voted on like
    // one of its own: prepared everywhere when it answers, so another
    // node's session can commit it at once.
    raws[0].s.write_all(&Raw::query("begin; insert into m values (14); prepare transaction 'in-a-string'; select 1")).unwrap();
    assert_eq!(summary(&raws[0].until_ready()), ["C:BEGIN", "C:INSERT 0 1", "C:PREPARE TRANSACTION", "T", "D", "C:SELECT 1", "Z:I"]);
    raws[1].s.write_all(&Raw::query("commit prepared 'in-a-string'")).unwrap();
    assert_eq!(summary(&raws[1].until_ready()), ["C:COMMIT PREPARED", "Z:I"]);
    // The same with the client's next messages already behind the string
    // (pipelined, in one write): they wait until its last part committed,
    // and each gets its own answers.
    let mut pipelined = Raw::query("begin; insert into m values (15); commit; insert into m values (16)");
    pipelined.extend(Raw::query("select 1/0"));
    pipelined.extend(Raw::statement("select 42"));
    pipelined.extend(Raw::sync());
    raws[2].s.write_all(&pipelined).unwrap();
    assert_eq!(summary(&raws[2].until_ready()), ["C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "C:INSERT 0 1", "Z:I"]);
    assert_eq!(summary(&raws[2].until_ready()), ["E:22012", "Z:I"]);
    assert_eq!(summary(&raws[2].until_ready()), ["1", "2", "D", "C:SELECT 1", "Z:I"]);
    // 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 16: fourteen commits of
    // the cluster (14 is the client's own).
    let expected: Vec<i32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16];
    assert_eq!(commits(&c, "committed") - before, 14.0, "each committed part went through the cluster's commit");
    converge(&c, &["m"]);
    for i in 1..=3 {
        let ids: Vec<i32> = client(&c, i).query("select id from m order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, expected, "node {i}");
    }
    no_gid_left(&c);
}

/// A failed block that a ROLLBACK TO restores commits when COMMIT is
/// sent with it (one Query string, or one Sync of the extended protocol),
/// as on one PostgreSQL; a COMMIT of a block left failed rolls back.
#[test]
fn a_rollback_to_sent_with_the_commit_restores_the_block_and_it_commits() {
    let c = TestCluster::start(3);
    schema(&c, "create table m(id int primary key)");
    let port = c.layout.proxy_port;
    let mut raws: Vec<Raw> = (0..3).map(|_| Raw::connect(port)).collect();
    let failed_block = |r: &mut Raw, id: i32| {
        r.s.write_all(&Raw::query(&format!("begin; insert into m values ({id}); savepoint s"))).unwrap();
        assert_eq!(summary(&r.until_ready()), ["C:BEGIN", "C:INSERT 0 1", "C:SAVEPOINT", "Z:T"]);
        r.s.write_all(&Raw::query(&format!("insert into m values ({id})"))).unwrap();
        assert_eq!(summary(&r.until_ready()), ["E:23505", "Z:E"]);
    };
    failed_block(&mut raws[0], 1);
    raws[0].s.write_all(&Raw::query("rollback to s; commit")).unwrap();
    assert_eq!(summary(&raws[0].until_ready()), ["C:ROLLBACK", "C:COMMIT", "Z:I"]);
    failed_block(&mut raws[1], 2);
    raws[1].s.write_all(&Raw::query("rollback to s; insert into m values (3); commit")).unwrap();
    assert_eq!(summary(&raws[1].until_ready()), ["C:ROLLBACK", "C:INSERT 0 1", "C:COMMIT", "Z:I"]);
    failed_block(&mut raws[2], 4);
    let mut unit = Raw::statement("rollback to savepoint s");
    unit.extend(Raw::statement("commit"));
    unit.extend(Raw::sync());
    raws[2].s.write_all(&unit).unwrap();
    assert_eq!(summary(&raws[2].until_ready()), ["1", "2", "C:ROLLBACK", "1", "2", "C:COMMIT", "Z:I"]);
    // Left failed: the statement before the COMMIT fails, the COMMIT is
    // skipped; a COMMIT of its own then rolls back.
    failed_block(&mut raws[0], 90);
    raws[0].s.write_all(&Raw::query("insert into m values (91); commit")).unwrap();
    assert_eq!(summary(&raws[0].until_ready()), ["E:25P02", "Z:E"]);
    raws[0].s.write_all(&Raw::query("commit")).unwrap();
    assert_eq!(summary(&raws[0].until_ready()), ["C:ROLLBACK", "Z:I"]);
    converge(&c, &["m"]);
    for i in 1..=3 {
        let ids: Vec<i32> = client(&c, i).query("select id from m order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [1, 2, 3, 4], "node {i}");
    }
    no_gid_left(&c);
}

/// In autocommit, a writing statement whose portal the client binds and
/// flushes first and executes later (pg-cursor for node-postgres): the
/// portal lives until the client's Sync, and the write commits through
/// the cluster then.
#[test]
fn a_portal_bound_before_its_writing_execute_commits_in_autocommit() {
    let c = TestCluster::start(3);
    schema(&c, "create table cur(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    let named_portal = |tag: u8, portal: &str, tail: &[u8]| {
        let mut b = cstr(portal);
        b.extend_from_slice(tail);
        msg(tag, &b)
    };
    for round in 0..2 {
        let mut piece = Raw::parse("", &format!("insert into cur select g from generate_series({0}, {0} + 4) g returning id", round * 10));
        let mut bind = cstr("C_1");
        bind.extend(cstr(""));
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        piece.extend(msg(b'B', &bind));
        let mut describe = vec![b'P'];
        describe.extend(cstr("C_1"));
        piece.extend(msg(b'D', &describe));
        piece.extend(msg(b'H', &[]));
        r.s.write_all(&piece).unwrap();
        assert_eq!(summary(&r.read_n(3)), ["1", "2", "T"]);
        // Two rows at a time, as a cursor reads.
        r.s.write_all(&[named_portal(b'E', "C_1", &2i32.to_be_bytes()), msg(b'H', &[])].concat()).unwrap();
        assert_eq!(summary(&r.read_n(3)), ["D", "D", "s"]);
        r.s.write_all(&[named_portal(b'E', "C_1", &0i32.to_be_bytes()), msg(b'H', &[])].concat()).unwrap();
        // (PostgreSQL's tag counts the rows of this fetch.)
        assert_eq!(summary(&r.read_n(4)), ["D", "D", "D", "C:INSERT 0 3"]);
        let mut close = vec![b'P'];
        close.extend(cstr("C_1"));
        r.s.write_all(&[msg(b'C', &close), Raw::sync()].concat()).unwrap();
        assert_eq!(summary(&r.until_ready()), ["3", "Z:I"]);
    }
    converge(&c, &["cur"]);
    for i in 1..=3 {
        let n: i64 = client(&c, i).query_one("select count(*) from cur", &[]).unwrap().get(0);
        assert_eq!(n, 10, "node {i}");
    }
    no_gid_left(&c);
}

/// In autocommit, a pipeline segment (one Sync) whose reads have already
/// run when its write arrives (the client flushed and read their results
/// first, as psycopg's pipeline does when a result is fetched) is one
/// transaction, as on one PostgreSQL: committed through the cluster at
/// its Sync. If a read failed, the node skips the rest up to the Sync
/// and nothing is written.
/// An autocommit write in the extended protocol is answered only when the
/// client asks (Flush or Sync), as by one PostgreSQL: the proxy's BEGIN
/// goes in front of the client's messages, without a Sync of its own that
/// would make the node answer them early (psycopg's pipeline traces them).
#[test]
fn an_autocommit_write_is_answered_only_when_the_client_asks() {
    let c = TestCluster::start(3);
    schema(&c, "create table asked(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    let m = Raw::statement("insert into asked values (1)");
    r.s.write_all(&m).unwrap();
    r.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut byte = [0u8; 1];
    let early = r.s.read(&mut byte);
    assert!(early.is_err(), "nothing before the client asks: {early:?} {byte:?}");
    r.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    r.s.write_all(&msg(b'H', &[])).unwrap();
    assert_eq!(summary(&r.read_n(3)), ["1", "2", "C:INSERT 0 1"]);
    r.s.write_all(&Raw::sync()).unwrap();
    assert_eq!(summary(&r.until_ready()), ["Z:I"]);
    // The same with the Parse sent on its own first (psycopg's pipeline):
    // still nothing before the client's Sync.
    r.s.write_all(&Raw::parse("", "insert into asked values (2)")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut bind = cstr("");
    bind.extend(cstr(""));
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut m = msg(b'B', &bind);
    m.extend(msg(b'D', b"P\0"));
    let mut execute = cstr("");
    execute.extend_from_slice(&0i32.to_be_bytes());
    m.extend(msg(b'E', &execute));
    r.s.write_all(&m).unwrap();
    r.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let early = r.s.read(&mut byte);
    assert!(early.is_err(), "nothing before the client asks: {early:?} {byte:?}");
    r.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    r.s.write_all(&Raw::sync()).unwrap();
    assert_eq!(summary(&r.until_ready()), ["1", "2", "n", "C:INSERT 0 1", "Z:I"]);
    converge(&c, &["asked"]);
    no_gid_left(&c);
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from asked", &[]).unwrap().get(0);
        assert_eq!(n, 2, "node{id}");
    }
}

/// A write's Parse sent on its own fails (no such table); the Bind,
/// Execute and Sync that follow are skipped, as by one PostgreSQL: the
/// client hears that one error and ReadyForQuery, not a second error for
/// a Bind of the statement that never was.
#[test]
fn a_failed_parse_sent_alone_skips_the_rest_of_its_unit() {
    let c = TestCluster::start(3);
    let mut r = Raw::connect(c.layout.proxy_port);
    r.s.write_all(&Raw::parse("", "insert into no_such_table values (1)")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut m = Raw::bind_execute("");
    m.extend(Raw::sync());
    r.s.write_all(&m).unwrap();
    assert_eq!(summary(&r.until_ready()), ["E:42P01", "Z:I"]);
    r.s.write_all(&Raw::query("select 42")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["T", "D", "C:SELECT 1", "Z:I"]);
}

#[test]
fn a_pipeline_segment_that_reads_before_it_writes_commits_in_autocommit() {
    let c = TestCluster::start(3);
    schema(&c, "create table seg(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    let flush = || msg(b'H', &[]);
    for round in 0..2 {
        let mut reads = Raw::statement("select count(*) from seg");
        let counted = format!("counted{round}");
        reads.extend(Raw::parse(&counted, "select count(*) from seg where id > $1"));
        let mut describe = vec![b'S'];
        describe.extend(cstr(&counted));
        reads.extend(msg(b'D', &describe));
        reads.extend(flush());
        r.s.write_all(&reads).unwrap();
        assert_eq!(summary(&r.read_n(7)), ["1", "2", "D", "C:SELECT 1", "1", "t", "T"]);
        let mut write = Raw::statement(&format!("insert into seg values ({round})"));
        write.extend(Raw::sync());
        r.s.write_all(&write).unwrap();
        assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "Z:I"]);
    }
    // A read that fails: the write after it is skipped.
    let mut failing = Raw::statement("select 1 / (random() * 0)::int");
    failing.extend(flush());
    r.s.write_all(&failing).unwrap();
    assert_eq!(summary(&r.read_n(3)), ["1", "2", "E:22012"]);
    let mut write = Raw::statement("insert into seg values (9)");
    write.extend(Raw::sync());
    r.s.write_all(&write).unwrap();
    assert_eq!(summary(&r.until_ready()), ["Z:I"]);
    // The same with an error too big for the proxy to hold whole (it
    // passes through in pieces): still seen as the unit's failure.
    let mut failing = Raw::statement("select (repeat('x', 300000) || (random() * 0)::int)::int");
    failing.extend(flush());
    r.s.write_all(&failing).unwrap();
    assert_eq!(summary(&r.read_n(3)), ["1", "2", "E:22P02"]);
    let mut write = Raw::statement("insert into seg values (10)");
    write.extend(Raw::sync());
    r.s.write_all(&write).unwrap();
    assert_eq!(summary(&r.until_ready()), ["Z:I"]);
    // The session's prepared statements are the client's own: none of
    // the proxy's (its BEGIN, its commit's statements) is left among them.
    r.s.write_all(&Raw::query("select string_agg(name, ',' order by name) from pg_prepared_statements")).unwrap();
    let answer = r.until_ready();
    let (_, row) = answer.iter().find(|(t, _)| *t == b'D').unwrap();
    assert_eq!(String::from_utf8_lossy(&row[6..]), "counted0,counted1");
    converge(&c, &["seg"]);
    for i in 1..=3 {
        let ids: Vec<i32> = client(&c, i).query("select id from seg order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [0, 1], "node {i}");
    }
    no_gid_left(&c);
}

/// A portal the client left suspended (an Execute with a row limit) in
/// an implicit transaction survives the BEGIN the proxy puts in front of
/// a later write of the same unit: the proxy's own statements run in a
/// portal of their own, not the unnamed one the client is reading from.
#[test]
fn a_suspended_portal_survives_the_begin_before_a_write_in_its_unit() {
    let c = TestCluster::start(3);
    schema(&c, "create table susp(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    let mut read = Raw::parse("", "select generate_series(1, 4)");
    let mut bind = cstr("");
    bind.extend(cstr(""));
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    read.extend(msg(b'B', &bind));
    let mut two = cstr("");
    two.extend_from_slice(&2i32.to_be_bytes());
    read.extend(msg(b'E', &two));
    read.extend(msg(b'H', &[]));
    r.s.write_all(&read).unwrap();
    assert_eq!(summary(&r.read_n(5)), ["1", "2", "D", "D", "s"]);
    let mut write = Raw::parse("w", "insert into susp values (1)");
    let mut bind = cstr("p");
    bind.extend(cstr("w"));
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    write.extend(msg(b'B', &bind));
    let mut execute = cstr("p");
    execute.extend_from_slice(&0i32.to_be_bytes());
    write.extend(msg(b'E', &execute));
    let mut rest = cstr("");
    rest.extend_from_slice(&0i32.to_be_bytes());
    write.extend(msg(b'E', &rest));
    write.extend(Raw::sync());
    r.s.write_all(&write).unwrap();
    let answer = r.until_ready();
    assert_eq!(summary(&answer), ["1", "2", "C:INSERT 0 1", "D", "D", "C:SELECT 2", "Z:I"]);
    let rows: Vec<String> = answer.iter().filter(|(t, _)| *t == b'D').map(|(_, b)| String::from_utf8_lossy(&b[6..]).into_owned()).collect();
    assert_eq!(rows, ["3", "4"]);
    converge(&c, &["susp"]);
    for i in 1..=3 {
        let n: i64 = client(&c, i).query_one("select count(*) from susp", &[]).unwrap().get(0);
        assert_eq!(n, 1, "node {i}");
    }
    no_gid_left(&c);
}

/// A session that hears its own NOTIFY gets the notification where
/// PostgreSQL puts it: after the answer (the CommandComplete of the NOTIFY
/// or of the COMMIT the cluster ran), just before ReadyForQuery — not
/// ahead of the answer, as it comes from the node during the proxy's own
/// commit statements.
#[test]
fn a_sessions_own_notification_follows_the_answer_of_its_commit() {
    let c = TestCluster::start(3);
    schema(&c, "create table heard(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    r.s.write_all(&Raw::query("listen chan")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["C:LISTEN", "Z:I"]);
    r.s.write_all(&Raw::query("notify chan, 'autocommit'")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["C:NOTIFY", "A", "Z:I"]);
    r.s.write_all(&Raw::query("begin; insert into heard values (1); notify chan, 'block'; commit")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["C:BEGIN", "C:INSERT 0 1", "C:NOTIFY", "C:COMMIT", "A", "Z:I"]);
    r.s.write_all(&Raw::query("select pg_notify('chan', 'function')")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["T", "D", "C:SELECT 1", "A", "Z:I"]);
    // The extended protocol: the proxy answers the Sync after the COMMIT.
    let mut unit = Raw::statement("begin");
    unit.extend(Raw::statement("notify chan, 'extended'"));
    unit.extend(Raw::statement("insert into heard values (2)"));
    unit.extend(Raw::statement("commit"));
    unit.extend(Raw::sync());
    r.s.write_all(&unit).unwrap();
    let answer = summary(&r.until_ready());
    assert_eq!(answer[answer.len() - 3..], ["C:COMMIT", "A", "Z:I"], "{answer:?}");
    no_gid_left(&c);
}

/// LOCK TABLE and DECLARE CURSOR run only in a transaction block. In a
/// pipeline that writes, outside a block, PostgreSQL refuses them (25P01)
/// and the unit's writes roll back: the proxy, which wraps such a unit in
/// its own block, leaves one with either unwrapped, so they fail the same
/// way. In a Query string PostgreSQL's implicit block allows them, and so
/// does the proxy.
#[test]
fn block_only_statements_in_a_writing_pipeline_fail_as_in_postgresql() {
    let c = TestCluster::start(3);
    schema(&c, "create table bo(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    for (i, second) in ["lock table bo", "declare cc cursor for select 1"].iter().enumerate() {
        let mut unit = Raw::statement(&format!("insert into bo values ({i})"));
        unit.extend(Raw::statement(second));
        unit.extend(Raw::sync());
        r.s.write_all(&unit).unwrap();
        assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "1", "2", "E:25P01", "Z:I"], "{second}");
    }
    // LOCK sent later, after the writes went out in the proxy's block:
    // refused the same, and the writes rolled back.
    let writes = Raw::statement("insert into bo values (5)");
    r.s.write_all(&writes).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut lock = Raw::statement("lock table bo");
    lock.extend(Raw::statement("insert into bo values (6)"));
    lock.extend(Raw::sync());
    r.s.write_all(&lock).unwrap();
    assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "1", "2", "E:25P01", "Z:I"]);
    // After a COMMIT in the unit, LOCK is in a transaction of its own:
    // the writes before the COMMIT commit, LOCK is refused.
    let mut unit = Raw::statement("insert into bo values (8)");
    unit.extend(Raw::statement("commit"));
    unit.extend(Raw::statement("lock table bo"));
    unit.extend(Raw::sync());
    r.s.write_all(&unit).unwrap();
    assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "1", "2", "N", "C:COMMIT", "1", "2", "E:25P01", "Z:I"]);
    r.s.write_all(&Raw::query("insert into bo values (7); lock table bo")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["C:INSERT 0 1", "C:LOCK TABLE", "Z:I"]);
    // The client's BEGIN sent later makes the writes' transaction a block
    // (as in PostgreSQL): LOCK runs in it, and the block is the client's
    // to end.
    let writes = Raw::statement("insert into bo values (9)");
    r.s.write_all(&writes).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut block = Raw::statement("begin");
    block.extend(Raw::statement("lock table bo"));
    block.extend(Raw::sync());
    r.s.write_all(&block).unwrap();
    assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "1", "2", "C:BEGIN", "1", "2", "C:LOCK TABLE", "Z:T"]);
    r.s.write_all(&Raw::query("commit")).unwrap();
    assert_eq!(summary(&r.until_ready()), ["C:COMMIT", "Z:I"]);
    // ROLLBACK AND CHAIN outside a block: refused as by PostgreSQL.
    let mut unit = Raw::statement("insert into bo values (10)");
    unit.extend(Raw::statement("rollback and chain"));
    unit.extend(Raw::sync());
    r.s.write_all(&unit).unwrap();
    assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "1", "2", "E:25P01", "Z:I"]);
    converge(&c, &["bo"]);
    for i in 1..=3 {
        let ids: Vec<i32> = client(&c, i).query("select id from bo order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [7, 8, 9], "node {i}");
    }
    no_gid_left(&c);
}

/// A ROLLBACK sent after the writes of a pipeline in autocommit (in a
/// later piece of the same unit): PostgreSQL rolls the implicit
/// transaction back with a warning that no transaction is in progress;
/// through the proxy, whose BEGIN went in front of the writes, the same.
#[test]
fn a_rollback_after_a_pipelines_writes_rolls_them_back_with_postgresqls_warning() {
    let c = TestCluster::start(3);
    schema(&c, "create table rb(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    let writes = Raw::statement("insert into rb values (1)");
    r.s.write_all(&writes).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut rollback = Raw::statement("rollback");
    rollback.extend(Raw::sync());
    r.s.write_all(&rollback).unwrap();
    let answer = r.until_ready();
    assert_eq!(summary(&answer), ["1", "2", "C:INSERT 0 1", "1", "2", "N", "C:ROLLBACK", "Z:I"]);
    let (_, notice) = answer.iter().find(|(t, _)| *t == b'N').unwrap();
    assert_eq!(mtm_proxy::net::scan::error_field(notice, b'C').as_deref(), Some("25P01"));
    r.s.write_all(&Raw::query("select count(*) from rb")).unwrap();
    let answer = r.until_ready();
    let (_, row) = answer.iter().find(|(t, _)| *t == b'D').unwrap();
    assert_eq!(&row[6..], b"0");
    no_gid_left(&c);
}

/// A simple Query after extended messages with no Sync between (pgjdbc
/// with autosave closes a statement, then sends its savepoint's Query,
/// then the next statement's Parse/Bind/Execute/Sync, in one write): the
/// Query ends their unit, as in PostgreSQL, and a write after it is a
/// unit of its own. The proxy held the Query back behind its BEGIN and
/// then waited for its answer: no reply, ever.
#[test]
fn a_query_after_extended_messages_ends_their_unit() {
    let c = TestCluster::start(3);
    schema(&c, "create table qx(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    let mut close = vec![b'S'];
    close.extend(cstr("S_1"));
    let mut batch = msg(b'C', &close);
    batch.extend(Raw::query("select 2"));
    batch.extend(Raw::parse("S_7", "insert into qx values (1)"));
    batch.extend(Raw::bind_execute("S_7"));
    batch.extend(Raw::sync());
    r.s.write_all(&batch).unwrap();
    assert_eq!(summary(&r.until_ready()), ["3", "T", "D", "C:SELECT 1", "Z:I"]);
    assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "Z:I"]);
    converge(&c, &["qx"]);
    for i in 1..=3 {
        let n: i64 = client(&c, i).query_one("select count(*) from qx", &[]).unwrap().get(0);
        assert_eq!(n, 1, "node {i}");
    }
    no_gid_left(&c);
}

/// A client whose encoding is not UTF-8 (`SET client_encoding TO
/// latin9`) sends its text in that encoding: the proxy passes it on byte
/// for byte — a write in autocommit, a Query string it runs part by
/// part, a prepared statement — and every node stores the same text.
#[test]
fn text_in_a_client_encoding_other_than_utf8_reaches_every_node_intact() {
    let c = TestCluster::start(3);
    schema(&c, "create table enc(id int primary key, v text)");
    let mut r = Raw::connect(c.layout.proxy_port);
    r.s.write_all(&Raw::query("set client_encoding to latin9")).unwrap();
    assert_eq!(summary(&r.until_ready()).last().unwrap(), "Z:I");
    let latin9 = |sql: &str| -> Vec<u8> { sql.chars().map(|ch| if ch == '€' { 0xa4 } else { ch as u32 as u8 }).collect() };
    let query = |text: Vec<u8>| {
        let mut body = text;
        body.push(0);
        msg(b'Q', &body)
    };
    r.s.write_all(&query(latin9("insert into enc values (1, 'café €')"))).unwrap();
    assert_eq!(summary(&r.until_ready()), ["C:INSERT 0 1", "Z:I"]);
    r.s.write_all(&query(latin9("begin; insert into enc values (2, 'crème'); commit; insert into enc values (3, 'à €5')"))).unwrap();
    assert_eq!(summary(&r.until_ready()), ["C:BEGIN", "C:INSERT 0 1", "C:COMMIT", "C:INSERT 0 1", "Z:I"]);
    let mut parse = cstr("");
    parse.extend(latin9("insert into enc values (4, 'où')"));
    parse.extend_from_slice(&[0, 0, 0]);
    let mut unit = msg(b'P', &parse);
    unit.extend(Raw::bind_execute(""));
    unit.extend(Raw::sync());
    r.s.write_all(&unit).unwrap();
    assert_eq!(summary(&r.until_ready()), ["1", "2", "C:INSERT 0 1", "Z:I"]);
    // Read back in latin9 as it was written.
    r.s.write_all(&query(latin9("select v from enc where id = 1"))).unwrap();
    let answer = r.until_ready();
    let (_, row) = answer.iter().find(|(t, _)| *t == b'D').unwrap();
    assert_eq!(row[6..], latin9("café €")[..]);
    converge(&c, &["enc"]);
    for i in 1..=3 {
        let vs: Vec<String> = client(&c, i).query("select v from enc order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(vs, ["café €", "crème", "à €5", "où"], "node {i}");
    }
    no_gid_left(&c);
}

/// A Query string that goes on after its COMMIT: once the commit is
/// answered, the statements after it are the client's again — a cancel
/// reaches them (it is held back only while the cluster commits).
#[test]
fn a_cancel_reaches_a_statement_after_a_commit_in_the_same_query() {
    let c = TestCluster::start(3);
    schema(&c, "create table after(id int primary key)");
    wait_connected(&c);
    let port = c.layout.proxy_port;
    let (mut r, key) = Raw::connect_keyed(port);
    r.s.write_all(&Raw::query("begin; insert into after values (1); commit; select pg_sleep(20)")).unwrap();
    assert_eq!(summary(&r.read_n(3)), ["C:BEGIN", "C:INSERT 0 1", "C:COMMIT"]);
    std::thread::sleep(Duration::from_millis(300));
    Raw::cancel(port, key);
    let rest = summary(&r.until_ready());
    assert_eq!(rest, ["T", "E:57014", "Z:I"], "the sleep after the commit is cancelled");
    converge(&c, &["after"]);
    for i in 1..=3 {
        let n: i64 = client(&c, i).query_one("select count(*) from after", &[]).unwrap().get(0);
        assert_eq!(n, 1, "node {i}: the commit before it stands");
    }
}

/// A cancel acts as on one PostgreSQL: sent while the session is idle
/// it is over when the client hears the cancel connection close, and
/// does not hit the next statement; sent while the cluster commits the
/// session's transaction it does not interrupt the commit (PostgreSQL
/// does not let one), which completes once the votes are in.
#[test]
fn a_cancel_never_hits_the_next_statement_nor_a_commit() {
    let c = TestCluster::start(3);
    schema(&c, "create table cx(id int primary key)");
    wait_connected(&c);
    let port = c.layout.proxy_port;
    let (mut r, key) = Raw::connect_keyed(port);
    for _ in 0..20 {
        r.s.write_all(&Raw::query("select 1")).unwrap();
        r.until_ready();
        Raw::cancel(port, key);
        r.s.write_all(&Raw::query("select pg_sleep(0.05)")).unwrap();
        assert_eq!(summary(&r.until_ready()), ["T", "D", "C:SELECT 1", "Z:I"], "the idle session's cancel hit its next statement");
    }
    // A commit held by a frozen peer, cancelled meanwhile.
    let peer = r.node_id(&c) % 3 + 1;
    r.s.write_all(&Raw::query("begin; insert into cx values (1)")).unwrap();
    r.until_ready();
    signal_node(&c, peer, "-STOP");
    r.s.write_all(&Raw::query("commit")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    Raw::cancel(port, key);
    std::thread::sleep(Duration::from_millis(500));
    signal_node(&c, peer, "-CONT");
    assert_eq!(summary(&r.until_ready()), ["C:COMMIT", "Z:I"], "the cancel did not interrupt the commit");
    converge(&c, &["cx"]);
    for i in 1..=3 {
        let n: i64 = client(&c, i).query_one("select count(*) from cx", &[]).unwrap().get(0);
        assert_eq!(n, 1, "node {i}");
    }
    no_gid_left(&c);
}

/// The value a ParameterStatus message (`S`) in `msgs` reports for
/// `name`, the last one if several.
fn reported(msgs: &[(u8, Vec<u8>)], name: &str) -> Option<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'S')
        .filter_map(|(_, b)| {
            let mut parts = b.split(|&x| x == 0);
            let (n, v) = (parts.next()?, parts.next()?);
            (n == name.as_bytes()).then(|| String::from_utf8_lossy(v).into_owned())
        })
        .last()
}

/// A `SET LOCAL` of a reported setting (TimeZone, client_encoding,
/// DateStyle…) ends with its transaction; the client is told, also when
/// the proxy ends the transaction with the cluster's commit, so a driver
/// goes on decoding with the server's values.
#[test]
fn the_end_of_a_set_local_reaches_the_client_after_a_writing_commit() {
    let c = TestCluster::start(3);
    schema(&c, "create table m(id int primary key)");
    let mut r = Raw::connect(c.layout.proxy_port);
    r.s.write_all(&Raw::query("show timezone")).unwrap();
    let msgs = r.until_ready();
    let (_, row) = msgs.iter().find(|(t, _)| *t == b'D').unwrap().clone();
    let zone = String::from_utf8_lossy(&row[6..]).into_owned();
    assert_ne!(zone, "Asia/Tokyo");
    for (i, commit) in ["commit", "rollback"].iter().enumerate() {
        r.s.write_all(&Raw::query(&format!("begin; set local timezone = 'Asia/Tokyo'; insert into m values ({i})"))).unwrap();
        assert_eq!(reported(&r.until_ready(), "TimeZone").as_deref(), Some("Asia/Tokyo"));
        r.s.write_all(&Raw::query(commit)).unwrap();
        let msgs = r.until_ready();
        assert_eq!(reported(&msgs, "TimeZone"), Some(zone.clone()), "{commit}: {:?}", summary(&msgs));
    }
    // Also when the COMMIT comes in the same string.
    r.s.write_all(&Raw::query("begin; set local timezone = 'Asia/Tokyo'")).unwrap();
    assert_eq!(reported(&r.until_ready(), "TimeZone").as_deref(), Some("Asia/Tokyo"));
    r.s.write_all(&Raw::query("insert into m values (5); commit")).unwrap();
    assert_eq!(reported(&r.until_ready(), "TimeZone"), Some(zone));
    let ids: Vec<i32> = client(&c, 1).query("select id from m order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [0, 5]);
}

/// A client's `statement_timeout` bounds its statements, not the
/// cluster's wait for votes (which has its own timeout), as PostgreSQL's
/// wait for synchronous standbys is not cut short by it: a commit whose
/// peer is frozen for longer than the client's timeout still commits
/// once the peer thaws, on every node.
#[test]
fn a_clients_statement_timeout_does_not_cut_the_commit_short() {
    let c = TestCluster::start(3);
    schema(&c, "create table st(id int primary key)");
    wait_connected(&c);
    let mut s = proxy_client(&c);
    let home = port_of(&mut s);
    s.batch_execute("set statement_timeout = '300ms'").unwrap();
    let peer = (1..=3).find(|&i| i32::from(c.node(i).port) != home).unwrap();
    let pid = c.node(peer).pid().expect("node running").to_string();
    let signal = |sig: &str| {
        std::process::Command::new("pkill").args([sig, "-P", &pid]).status().unwrap();
        std::process::Command::new("kill").args([sig, &pid]).status().unwrap();
    };
    signal("-STOP");
    let started = Instant::now();
    let writer = std::thread::scope(|scope| {
        let w = scope.spawn(|| s.batch_execute("insert into st values (1)"));
        std::thread::sleep(Duration::from_millis(1500));
        signal("-CONT");
        w.join().unwrap()
    });
    writer.expect("the commit waits for the frozen peer's vote past the client's statement_timeout");
    assert!(started.elapsed() >= Duration::from_millis(1000), "the commit did wait for the peer");
    // The timeout still bounds the client's own statements.
    let err = s.batch_execute("select pg_sleep(2)").unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    converge(&c, &["st"]);
    for i in 1..=3 {
        assert_eq!(client(&c, i).query_one("select count(*) from st", &[]).unwrap().get::<_, i64>(0), 1, "node {i}");
    }
    no_gid_left(&c);
}

/// An application's role is rarely a superuser: such a role writes,
/// changes its own schema, notifies and uses two-phase commit through the
/// proxy from sessions on every node, though it may not read the
/// extension's tables (the node reads them for it); also with
/// `default_transaction_read_only` on and `BEGIN READ WRITE`.
#[test]
fn a_role_that_is_not_a_superuser_commits_from_every_node() {
    let c = TestCluster::start(3);
    schema(&c, "create table acct(id int primary key, v int); create role app login password 'secret'; grant select, insert, update on acct to app; grant create on schema public to app");
    wait_connected(&c);
    let conninfo = c.proxy_conninfo("postgres").replace("user=postgres", "user=app password=secret");
    let mut s: Vec<Client> = (0..3).map(|_| Client::connect(&conninfo, postgres::NoTls).unwrap()).collect();
    let ports: BTreeSet<i32> = s.iter_mut().map(port_of).collect();
    assert_eq!(ports.len(), 3, "one session per node");
    let err = s[0].batch_execute("select * from mtm.cluster_nodes").unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "the extension's tables stay closed to it: {err:?}");
    let err = s[0].batch_execute("select mtm.alter_sequences()").unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "and the functions that change the cluster: {err:?}");
    for (i, cl) in s.iter_mut().enumerate() {
        let i = i as i32;
        cl.execute("insert into acct values ($1, 0)", &[&i]).unwrap();
        cl.batch_execute(&format!("begin; update acct set v = v + 1 where id = {i}; notify chan; commit")).unwrap();
        cl.batch_execute(&format!("create table own{i}(id serial primary key, v text); insert into own{i}(v) values ('x')")).unwrap();
    }
    s[1].batch_execute("begin; insert into acct values (10, 10); prepare transaction 'app-gid'").unwrap();
    s[2].batch_execute("commit prepared 'app-gid'").unwrap();
    // Read-only by default, read-write when asked: the cluster's commit
    // (and its NOTIFY) still goes through.
    s[0].batch_execute("set default_transaction_read_only = on").unwrap();
    s[0].batch_execute("begin read write; update acct set v = v + 1 where id = 0; notify chan; commit").unwrap();
    let err = s[0].batch_execute("update acct set v = v + 1 where id = 0").unwrap_err();
    assert_eq!(sqlstate(&err), "25006", "{err:?}");
    let tables = ["acct", "own0", "own1", "own2"];
    converge(&c, &tables);
    for n in 1..=3 {
        let sum: i64 = client(&c, n).query_one("select sum(v) from acct", &[]).unwrap().get(0);
        assert_eq!(sum, 14, "node {n}");
    }
    no_gid_left(&c);
}

#[test]
fn a_clients_own_two_phase_commit_works_from_any_node() {
    let c = TestCluster::start(3);
    schema(&c, "create table x(id int primary key)");
    let mut s = sessions(&c, 2);
    let (p0, p1) = (port_of(&mut s[0]), port_of(&mut s[1]));
    assert_ne!(p0, p1);
    for (id, gid) in [(1, "app-tx-1"), (2, "app-tx-2")] {
        s[0].batch_execute("begin").unwrap();
        s[0].execute("insert into x values ($1)", &[&id]).unwrap();
        s[0].batch_execute(&format!("prepare transaction '{gid}'")).unwrap();
    }
    // Read-only ones too (a transaction manager prepares every branch).
    for gid in ["app-ro-1", "app-ro-2"] {
        s[0].batch_execute(&format!("begin; select count(*) from x; prepare transaction '{gid}'")).unwrap();
    }
    // Prepared on every node before the client hears PREPARE TRANSACTION.
    for gids in prepared(&c) {
        assert_eq!(gids, ["app-ro-1", "app-ro-2", "app-tx-1", "app-tx-2"]);
    }
    // Finished from a session on another node, XA-style: the third node
    // hears of it from that one. Each statement returns once every node
    // has finished the gid, as on one PostgreSQL it is gone for every
    // session (and its rows there) when the statement returns.
    // Even when the stream from that node to another is slow (frozen for
    // a second here, for each statement).
    let finisher = 1 + c.layout.node_ports.iter().position(|&p| p as i32 == p1).unwrap();
    let slow = if finisher == 1 { 2 } else { 1 };
    let walsender: i32 = client(&c, finisher)
        .query_one("select pid from pg_stat_replication where application_name = $1", &[&format!("mtm_receiver_{slow}_from_{finisher}")])
        .unwrap()
        .get(0);
    let mut left = vec!["app-ro-1", "app-ro-2", "app-tx-1", "app-tx-2"];
    for (finish, gid) in [("commit", "app-tx-1"), ("rollback", "app-tx-2"), ("commit", "app-ro-1"), ("rollback", "app-ro-2")] {
        let signal = move |sig: &str| assert!(std::process::Command::new("kill").args([sig, &walsender.to_string()]).status().unwrap().success());
        signal("-STOP");
        let thaw = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            signal("-CONT");
        });
        s[1].batch_execute(&format!("{finish} prepared '{gid}'")).unwrap();
        left.retain(|g| *g != gid);
        for (i, gids) in prepared(&c).into_iter().enumerate() {
            assert_eq!(gids, left, "node {} right after {finish} prepared '{gid}'", i + 1);
        }
        thaw.join().unwrap();
    }
    for i in 1..=3 {
        let ids: Vec<i32> = client(&c, i).query("select id from x", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [1], "node {i}");
    }
    no_gid_left(&c);

    // A session can ask the proxy for its node, by id or by name (what
    // PGOPTIONS or the options keyword send); an unknown node is refused.
    let pinned = |which: &str| postgres::Client::connect(&format!("{} options='-c multimaster.node={which}'", c.proxy_conninfo("postgres")), postgres::NoTls);
    for id in 1..=3 {
        let mut cl = pinned(&id.to_string()).unwrap();
        assert_eq!(port_of(&mut cl), c.node(id).port as i32);
        let mut cl = pinned(&format!("node{id}")).unwrap();
        assert_eq!(port_of(&mut cl), c.node(id).port as i32);
    }
    let err = pinned("node9").err().expect("an unknown node is refused");
    assert_eq!(sqlstate(&err), "22023", "{err:?}");
}

/// A transaction manager prepares read-only branches too, then finishes
/// them from wherever it is connected: PREPARE TRANSACTION of a
/// transaction that only read answers once every node holds the gid,
/// even when one node's stream is slow (here frozen for a second) — so a
/// COMMIT PREPARED sent at once from a session on that node finds it.
/// In a database the cluster does not replicate, such a prepare stays the
/// node's own and answers at once.
#[test]
fn a_read_only_prepare_answers_once_every_node_holds_it() {
    let c = TestCluster::start(3);
    wait_connected(&c);
    let pinned = |node: usize, db: &str| {
        Client::connect(&format!("{} options='-c multimaster.node={node}'", c.proxy_conninfo(db)), postgres::NoTls).unwrap()
    };
    let (mut home, mut other) = (pinned(1, "postgres"), pinned(2, "postgres"));
    let walsender: i32 = client(&c, 1)
        .query_one("select pid from pg_stat_replication where application_name = 'mtm_receiver_2_from_1'", &[])
        .unwrap()
        .get(0);
    let signal = move |sig: &str| assert!(std::process::Command::new("kill").args([sig, &walsender.to_string()]).status().unwrap().success());
    signal("-STOP");
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        signal("-CONT");
    });
    home.batch_execute("begin; select 1; prepare transaction 'ro-branch'").unwrap();
    let on_node2: Vec<String> =
        client(&c, 2).query("select gid from pg_prepared_xacts", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    thaw.join().unwrap();
    assert_eq!(on_node2, ["ro-branch"], "node 2 holds the gid once PREPARE TRANSACTION answered");
    other.batch_execute("commit prepared 'ro-branch'").unwrap();
    // A gid as long as PostgreSQL allows (199 bytes), finished from
    // another node too.
    let long = "g".repeat(199);
    home.batch_execute(&format!("begin; select 1; prepare transaction '{long}'")).unwrap();
    other.batch_execute(&format!("rollback prepared '{long}'")).unwrap();
    no_gid_left(&c);

    proxy_client(&c).batch_execute("create database local_only").unwrap();
    let mut local = pinned(3, "local_only");
    local.batch_execute("begin; select 1; prepare transaction 'ro-local'").unwrap();
    local.batch_execute("commit prepared 'ro-local'").unwrap();
}

/// Transfers through the proxy by writers that reconnect when their
/// session breaks, each recording the ledger ids of the transfers it heard
/// COMMIT for.
struct Transfers {
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::Mutex<Vec<i64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Transfers {
    const ACCOUNTS: i32 = 50;

    fn start(c: &TestCluster, writers: usize) -> Transfers {
        schema(
            c,
            "create table bank(id int primary key, balance bigint not null);
             create table ledger(id bigint primary key, amount bigint not null)",
        );
        wait_connected(c);
        proxy_client(c)
            .batch_execute(&format!("insert into bank select g, 1000 from generate_series(1, {}) g", Self::ACCOUNTS))
            .unwrap();
        converge(c, &["bank"]);
        let conninfo = c.proxy_conninfo("postgres");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
        let mut threads = Vec::new();
        for w in 0..writers {
            let (stop, acked, conninfo) = (stop.clone(), acked.clone(), conninfo.clone());
            threads.push(std::thread::spawn(move || {
                let mut cl: Option<Client> = None;
                let mut n: i64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Some(client) = cl.as_mut() else {
                        cl = postgres::Client::connect(&conninfo, postgres::NoTls).ok();
                        if cl.is_none() {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        continue;
                    };
                    n += 1;
                    let id = (w as i64) << 32 | n;
                    let from = (id % Self::ACCOUNTS as i64) as i32 + 1;
                    let to = ((id / 7) % Self::ACCOUNTS as i64) as i32 + 1;
                    if from == to {
                        continue;
                    }
                    let r = (|| {
                        let mut t = client.transaction()?;
                        t.execute("update bank set balance = balance - 1 where id = $1", &[&from])?;
                        t.execute("update bank set balance = balance + 1 where id = $1", &[&to])?;
                        t.execute("insert into ledger values ($1, 1)", &[&id])?;
                        t.commit()
                    })();
                    match r {
                        Ok(()) => acked.lock().unwrap().push(id),
                        Err(e) if e.code().is_some_and(|c| ["40001", "40P01", "40003"].contains(&c.code())) => {}
                        // The proxy or the session's node went away: reconnect.
                        Err(_) => cl = None,
                    }
                }
            }));
        }
        Transfers { stop, acked, threads }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until 20 more transfers than now were acknowledged.
    fn wait_for_progress(&self) {
        let from = self.acked();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() < from + 20 {
            assert!(Instant::now() < deadline, "no progress: {} transfers acknowledged", self.acked());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the writers; then every node must hold every acknowledged
    /// transfer, the same total, and nothing prepared.
    fn stop_and_check(self, c: &TestCluster) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a writer failed");
        }
        converge(c, &["bank", "ledger"]);
        // Prepared gids are finished by the resolvers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !prepared(c).iter().all(Vec::is_empty) {
            assert!(Instant::now() < deadline, "prepared transactions left behind: {:?}", prepared(c));
            std::thread::sleep(Duration::from_millis(200));
        }
        converge(c, &["bank", "ledger"]);
        let acked = self.acked.lock().unwrap().clone();
        for id in 1..=3 {
            let mut cl = client(c, id);
            let sum: i64 = cl.query_one("select sum(balance)::bigint from bank", &[]).unwrap().get(0);
            assert_eq!(sum, Self::ACCOUNTS as i64 * 1000, "node{id}: the total changed");
            let present: i64 = cl.query_one("select count(*) from ledger where id = any($1)", &[&acked]).unwrap().get(0);
            assert_eq!(present as usize, acked.len(), "node{id}: an acknowledged transfer is missing");
        }
    }
}

/// Transfers through the proxy while the proxy, then a node, is killed
/// with SIGKILL and restarted: every transfer the client heard COMMIT for
/// is on every node, the totals never change, and the resolvers leave no
/// gid prepared — the dead node's ones are finished by the other two
/// before it is back.
#[test]
fn kill_9_of_the_proxy_and_of_a_node_loses_no_acknowledged_commit() {
    let c = Arc::new(TestCluster::start(3));
    c.reconfigure_proxy(|cfg| cfg.commit.vote_timeout = Duration::from_secs(3));
    let transfers = Transfers::start(&c, 6);
    transfers.wait_for_progress();
    // The proxy dies in the middle of commits; a new one takes over.
    let pid = c.proxy().pid().expect("proxy running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let bin = mtm_tests::workspace_bin("mtm-proxy");
    c.proxy().start(&bin).unwrap();
    transfers.wait_for_progress();
    // A node dies in the middle of commits. Its gids prepared on the
    // others are finished by them, a majority, without it; then it comes
    // back.
    c.node(2).kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in [1, 3] {
        let mut cl = client(&c, id);
        loop {
            let left: Vec<String> =
                cl.query("select gid from pg_prepared_xacts where gid like 'mtm-2-%'", &[]).unwrap().iter().map(|r| r.get(0)).collect();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "node{id}: gids of the dead node 2 still prepared: {left:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    c.node(2).start(&c.host).unwrap();
    transfers.wait_for_progress();
    transfers.stop_and_check(&c);
}

/// A session's node dies while the proxy is between two steps of its
/// commit (every node voted yes, the proxy has not yet sent COMMIT
/// PREPARED): the node's backend ends the session with FATAL 57P01. The
/// client hears how its commit stands (40003: not known yet), never
/// 57P01, which reads as "not committed" and would be retried; the
/// cluster then commits it, a majority having promised to.
#[test]
fn a_node_dying_between_the_steps_of_a_commit_is_reported_as_its_outcome() {
    let c = TestCluster::start(3);
    c.reconfigure_proxy(|cfg| cfg.commit.vote_timeout = Duration::from_secs(20));
    schema(&c, "create table between(id int primary key)");
    wait_connected(&c);
    let mut s = Raw::connect(c.layout.proxy_port);
    let home = s.node_id(&c);
    let peer = home % 3 + 1;
    s.s.write_all(&Raw::query("begin; insert into between values (1)")).unwrap();
    assert_eq!(summary(&s.until_ready()), ["C:BEGIN", "C:INSERT 0 1", "Z:T"]);
    // The commit waits for the frozen peer's vote...
    signal_node(&c, peer, "-STOP");
    s.s.write_all(&Raw::query("commit")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // ...and gets it while the proxy is frozen: the home node's backend
    // has answered and waits for the next step.
    let proxy = nix::unistd::Pid::from_raw(c.proxy().pid().expect("proxy running"));
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGSTOP).unwrap();
    signal_node(&c, peer, "-CONT");
    std::thread::sleep(Duration::from_secs(1));
    let postmaster = nix::unistd::Pid::from_raw(c.node(home).pid().expect("node running"));
    nix::sys::signal::kill(postmaster, nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGCONT).unwrap();
    let codes: Vec<String> = s.errors_until_closed().into_iter().map(|(code, _)| code).collect();
    assert_eq!(codes, ["40003"], "the commit's outcome, not the node's reason");
    start_again(&c, home);
    nothing_prepared(&c, Duration::from_secs(30));
    converge(&c, &["between"]);
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from between", &[]).unwrap().get(0);
        assert_eq!(n, 1, "node{id}: every node voted yes and a majority promised: committed");
    }
}

/// A COMMIT sent in the extended protocol is answered (CommandComplete)
/// before the client's Sync; the session's node dies before that Sync's
/// ReadyForQuery: the client has not heard the whole answer, and is told
/// the truth — 08006 saying the transaction committed — not the node's
/// 57P01, which reads as "not committed" and would be retried.
#[test]
fn a_node_dying_after_an_extended_commit_is_answered_reports_it_committed() {
    let c = TestCluster::start(3);
    schema(&c, "create table ext(id int primary key)");
    wait_connected(&c);
    let mut s = Raw::connect(c.layout.proxy_port);
    let home = s.node_id(&c);
    s.s.write_all(&Raw::query("begin; insert into ext values (1)")).unwrap();
    assert_eq!(summary(&s.until_ready()), ["C:BEGIN", "C:INSERT 0 1", "Z:T"]);
    let mut commit = Raw::statement("commit");
    commit.extend(msg(b'H', &[]));
    s.s.write_all(&commit).unwrap();
    assert_eq!(summary(&s.read_n(3)), ["1", "2", "C:COMMIT"]);
    let postmaster = nix::unistd::Pid::from_raw(c.node(home).pid().expect("node running"));
    nix::sys::signal::kill(postmaster, nix::sys::signal::Signal::SIGKILL).unwrap();
    let errors = s.errors_until_closed();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].0 == "08006" && errors[0].1.contains("committed"), "{errors:?}");
    start_again(&c, home);
    nothing_prepared(&c, Duration::from_secs(30));
    converge(&c, &["ext"]);
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from ext", &[]).unwrap().get(0);
        assert_eq!(n, 1, "node{id}");
    }
}

/// Transfers through the proxy while a node is frozen (kill -STOP of all
/// its processes) for several seconds, then thawed: commits resume,
/// every node holds every acknowledged transfer and the same total, and
/// the resolvers leave nothing prepared.
#[test]
fn kill_stop_of_a_node_under_load_loses_no_acknowledged_commit() {
    let c = Arc::new(TestCluster::start(3));
    c.reconfigure_proxy(|cfg| cfg.commit.vote_timeout = Duration::from_secs(2));
    let transfers = Transfers::start(&c, 6);
    transfers.wait_for_progress();
    signal_node(&c, 2, "-STOP");
    std::thread::sleep(Duration::from_secs(7));
    signal_node(&c, 2, "-CONT");
    transfers.wait_for_progress();
    transfers.stop_and_check(&c);
}

/// With a node down, a write cannot collect every node's vote: it is
/// rolled back with 40001 naming the node as unreachable (not "did not
/// vote within the timeout", which would have held its locks for the
/// whole vote timeout), reads go on, and writes work again once the node
/// is back.
#[test]
fn a_write_while_a_node_is_down_names_it_unreachable_and_works_once_it_is_back() {
    let c = TestCluster::start(3);
    schema(&c, "create table down(id int primary key)");
    c.node(2).kill9();
    // The session may land on any live node; the first write waits until
    // node 2 has been silent long enough to count as unreachable.
    let mut s = proxy_client(&c);
    let e = s.batch_execute("insert into down values (1)").expect_err("a write without node 2's vote");
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db.code().code(), "40001", "{db:?}");
    assert!(db.message().contains("node 2 cannot vote") && db.message().contains("unreachable"), "{db:?}");
    assert!(db.hint().is_some_and(|h| h.contains("once node 2 is back")), "{db:?}");
    // Later writes are refused the same way, now before they are even
    // prepared (the node's own error, raised as PREPARE starts), and
    // reads still work.
    for i in 2..5 {
        let e = s.batch_execute(&format!("insert into down values ({i})")).expect_err("a write without node 2's vote");
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
        assert_eq!(db.code().code(), "40001", "{db:?}");
        assert!(db.message().contains("node 2 cannot vote") && db.hint().is_some_and(|h| h.contains("once node 2 is back")), "{db:?}");
        assert_eq!(db.routine(), Some("refuse_if_a_peer_is_unreachable"), "{db:?}");
    }
    let n: i64 = s.query_one("select count(*) from down", &[]).unwrap().get(0);
    assert_eq!(n, 0);
    // A node restarted while node 2 is still down never hears from it:
    // the silence counts from its first attempt to reach node 2.
    drop(s);
    c.node(1).stop(&c.host, "fast").unwrap();
    c.node(1).start(&c.host).unwrap();
    let pinned = || postgres::Client::connect(&format!("{} options='-c multimaster.node=1'", c.proxy_conninfo("postgres")), postgres::NoTls);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut on_node1 = loop {
        match pinned() {
            Ok(cl) => break cl,
            Err(e) => assert!(Instant::now() < deadline, "node 1 is not back: {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let e = on_node1.batch_execute("insert into down values (5)").expect_err("a write without node 2's vote");
    assert!(e.as_db_error().is_some_and(|d| d.message().contains("node 2 cannot vote")), "{e:?}");
    c.node(2).start(&c.host).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = proxy_client(&c);
    while let Err(e) = s.batch_execute("insert into down values (10)") {
        assert!(Instant::now() < deadline, "no write succeeded after node 2 came back: {e:?}");
        std::thread::sleep(Duration::from_millis(200));
        s = proxy_client(&c);
    }
    converge(&c, &["down"]);
    for id in 1..=3 {
        let ids: Vec<i32> = client(&c, id).query("select id from down", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, vec![10], "node{id}");
    }
    no_gid_left(&c);
}

#[test]
fn writes_on_a_node_directly_are_refused_unless_a_superuser_allows_them() {
    let c = TestCluster::start(3);
    schema(&c, "create table d(id int primary key); create role app login");
    wait_connected(&c);
    // A plain session on node 2, as an application would open one.
    let mut n2 = postgres::Client::connect(&c.node(2).conninfo("postgres"), postgres::NoTls).unwrap();
    assert_eq!(n2.query_one("select count(*) from d", &[]).unwrap().get::<_, i64>(0), 0, "reads are allowed");
    for sql in [
        "insert into d values (1)",
        "update d set id = 2",
        "with x as (delete from d returning *) select * from x",
        "truncate d",
        "create table d2(id int)",
        "alter table d add column v int",
        "do $$ begin insert into d values (3); end $$",
        "begin; select 1; insert into d values (4); commit",
    ] {
        let e = n2.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&e), "25006", "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("mtm-proxy"), "{sql}: {}", db.message());
        assert!(db.hint().unwrap_or_default().contains("multimaster.direct_writes"), "{sql}: {:?}", db.hint());
        n2.batch_execute("rollback").unwrap();
    }
    // Temporary tables are the session's own.
    n2.batch_execute("create temp table tt(x int); insert into tt values (1); truncate tt").unwrap();
    for id in 1..=3 {
        let mut cl = client(&c, id);
        assert_eq!(cl.query_one("select count(*) from d", &[]).unwrap().get::<_, i64>(0), 0, "node{id}: nothing written");
        let d2: Option<String> = cl.query_one("select to_regclass('d2')::text", &[]).unwrap().get(0);
        assert_eq!(d2, None, "node{id}");
    }
    // A superuser may allow it (repairs); the write then reaches every node.
    n2.batch_execute("set multimaster.direct_writes = on; insert into d values (7)").unwrap();
    converge(&c, &["d"]);
    assert_eq!(client(&c, 3).query_one("select count(*) from d where id = 7", &[]).unwrap().get::<_, i64>(0), 1);
    // Nobody else may.
    let mut app = postgres::Client::connect(&format!("host=127.0.0.1 port={} user=app dbname=postgres", c.node(2).port), postgres::NoTls).unwrap();
    let e = app.batch_execute("set multimaster.direct_writes = on").unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    // Through the proxy, writes work as before, on every node.
    let mut s = sessions(&c, 3);
    for (i, cl) in s.iter_mut().enumerate() {
        cl.batch_execute(&format!("insert into d values ({})", 100 + i)).unwrap();
    }
    converge(&c, &["d"]);
}

/// The proxy's resident memory (VmRSS, kB).
fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How much the process `pid` grew (peak VmRSS over the start, MB) while
/// `work` ran.
fn rss_growth_mb(pid: i32, work: impl FnOnce()) -> u64 {
    let before = rss_kb(pid);
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    work();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    peak.load(Ordering::Relaxed).saturating_sub(before) / 1024
}

/// Writes `m` the way a client streams a big message: header, then 1 MB
/// pieces.
fn write_in_pieces(s: &mut TcpStream, m: &[u8]) {
    for piece in m.chunks(1 << 20) {
        s.write_all(piece).unwrap();
    }
}

#[test]
fn big_copy_rows_from_many_clients_pass_through_in_bounded_memory() {
    const CLIENTS: usize = 4;
    const SIZE: usize = 32 << 20;
    let c = TestCluster::start(3);
    schema(&c, "create table blob(id int primary key, v text)");
    wait_connected(&c);
    let pid = c.proxy().pid().expect("proxy running");
    let port = c.layout.proxy_port;
    let grew_mb = rss_growth_mb(pid, || {
        let writers: Vec<_> = (0..CLIENTS)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut r = Raw::connect(port);
                    r.s.write_all(&Raw::query("copy blob from stdin")).unwrap();
                    let mut head = [0u8; 5];
                    r.s.read_exact(&mut head).unwrap();
                    assert_eq!(head[0], b'G', "CopyInResponse");
                    let mut rest = vec![0; u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4];
                    r.s.read_exact(&mut rest).unwrap();
                    // One row of SIZE bytes in one CopyData message.
                    let mut row = format!("{i}\t").into_bytes();
                    row.extend(std::iter::repeat_n(b'x', SIZE));
                    row.push(b'\n');
                    write_in_pieces(&mut r.s, &msg(b'd', &row));
                    r.s.write_all(&msg(b'c', &[])).unwrap();
                    summary(&r.until_ready())
                })
            })
            .collect();
        for w in writers {
            assert_eq!(w.join().unwrap(), ["C:COPY 1", "Z:I"]);
        }
    });
    println!("mtm-proxy RSS grew by {grew_mb} MB while {CLIENTS} clients each copied one {} MB row", SIZE >> 20);
    // Buffering each message whole would take CLIENTS × 32 MB.
    assert!(grew_mb < 48, "the proxy grew by {grew_mb} MB for {CLIENTS} rows of {} MB", SIZE >> 20);
    converge(&c, &["blob"]);
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from blob where length(v) = $1", &[&(SIZE as i32)]).unwrap().get(0);
        assert_eq!(n, CLIENTS as i64, "node{id}");
    }
}

/// A client that binds a new named portal for every query and never
/// closes one (each portal ends with its transaction on the node) does
/// not grow the proxy: 200 000 such units, with 60-byte names, through
/// one session, and the proxy's memory stays within a few MB.
#[test]
fn portals_bound_and_never_closed_do_not_grow_the_proxy() {
    const UNITS: usize = 200_000;
    const BATCH: usize = 2_000;
    let c = TestCluster::start(3);
    let pid = c.proxy().pid().expect("proxy running");
    let mut raw = Raw::connect(c.layout.proxy_port);
    raw.s.write_all(&Raw::parse("one", "select 1")).unwrap();
    raw.s.write_all(&Raw::sync()).unwrap();
    raw.until_ready();
    let grew_mb = rss_growth_mb(pid, || {
        for first in (0..UNITS).step_by(BATCH) {
            let mut out = Vec::new();
            for i in first..first + BATCH {
                let portal = format!("portal_{i:052}");
                let mut b = cstr(&portal);
                b.extend(cstr("one"));
                b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                out.extend(msg(b'B', &b));
                let mut e = cstr(&portal);
                e.extend_from_slice(&0i32.to_be_bytes());
                out.extend(msg(b'E', &e));
                out.extend(Raw::sync());
            }
            raw.s.write_all(&out).unwrap();
            for _ in 0..BATCH {
                let answers = summary(&raw.until_ready());
                assert_eq!(answers, ["2", "D", "C:SELECT 1", "Z:I"]);
            }
        }
    });
    eprintln!("proxy grew {grew_mb} MB over {UNITS} portals");
    assert!(grew_mb < 8, "the proxy grew {grew_mb} MB keeping portals that ended on the node");
}

/// A Query with a big literal and a Bind with a big parameter are passed
/// on as they arrive, like big COPY rows, and still run as autocommit
/// writes through the cluster's commit (on every node when answered); so
/// is a FunctionCall with a big argument (the fast path, e.g. lo_write).
#[test]
fn big_queries_and_binds_from_many_clients_pass_through_in_bounded_memory() {
    const CLIENTS: usize = 6;
    const SIZE: usize = 16 << 20;
    let c = TestCluster::start(3);
    schema(&c, "create table blob(id int primary key, v text)");
    wait_connected(&c);
    let pid = c.proxy().pid().expect("proxy running");
    let port = c.layout.proxy_port;
    let octet_length: u32 = client(&c, 1)
        .query_one("select 'octet_length(bytea)'::regprocedure::oid", &[])
        .unwrap()
        .get::<_, postgres::types::Oid>(0);
    let grew_mb = rss_growth_mb(pid, || {
        let callers: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut r = Raw::connect(port);
                    let mut f = octet_length.to_be_bytes().to_vec();
                    f.extend_from_slice(&1i16.to_be_bytes());
                    f.extend_from_slice(&1i16.to_be_bytes());
                    f.extend_from_slice(&1i16.to_be_bytes());
                    f.extend_from_slice(&(SIZE as i32).to_be_bytes());
                    f.extend(std::iter::repeat_n(7u8, SIZE));
                    f.extend_from_slice(&0i16.to_be_bytes());
                    write_in_pieces(&mut r.s, &msg(b'F', &f));
                    r.until_ready()
                })
            })
            .collect();
        let writers: Vec<_> = (0..CLIENTS)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut r = Raw::connect(port);
                    let value = "x".repeat(SIZE);
                    if i % 2 == 0 {
                        let sql = format!("insert into blob values ({i}, '{value}')");
                        write_in_pieces(&mut r.s, &Raw::query(&sql));
                    } else {
                        r.s.write_all(&Raw::parse("big", "insert into blob values ($1::int, $2::text)")).unwrap();
                        let id = i.to_string();
                        let mut b = cstr("");
                        b.extend(cstr("big"));
                        b.extend_from_slice(&0i16.to_be_bytes());
                        b.extend_from_slice(&2i16.to_be_bytes());
                        for p in [id.as_bytes(), value.as_bytes()] {
                            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
                            b.extend_from_slice(p);
                        }
                        b.extend_from_slice(&0i16.to_be_bytes());
                        write_in_pieces(&mut r.s, &msg(b'B', &b));
                        let mut e = cstr("");
                        e.extend_from_slice(&0i32.to_be_bytes());
                        r.s.write_all(&msg(b'E', &e)).unwrap();
                        r.s.write_all(&msg(b'S', &[])).unwrap();
                    }
                    summary(&r.until_ready())
                })
            })
            .collect();
        for (i, w) in writers.into_iter().enumerate() {
            let expected: &[&str] = if i % 2 == 0 { &["C:INSERT 0 1", "Z:I"] } else { &["1", "2", "C:INSERT 0 1", "Z:I"] };
            assert_eq!(w.join().unwrap(), expected, "client {i}");
        }
        for f in callers {
            let reply = f.join().unwrap();
            let (tag, body) = &reply[0];
            assert_eq!((*tag, &body[4..]), (b'V', SIZE.to_string().as_bytes()), "FunctionCallResponse: the length");
            assert_eq!(summary(&reply[1..]), ["Z:I"]);
        }
    });
    println!("mtm-proxy RSS grew by {grew_mb} MB while {CLIENTS} clients each sent one {} MB Query or Bind, and 2 a FunctionCall", SIZE >> 20);
    // Buffering each message whole would take 16 MB per client (and the
    // classifier's copies of the text more); even the two FunctionCalls
    // alone would take 32 MB.
    assert!(grew_mb < 24, "the proxy grew by {grew_mb} MB for {} messages of {} MB", CLIENTS + 2, SIZE >> 20);
    // Each was committed through the cluster's commit: on every node.
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from blob where length(v) = $1", &[&(SIZE as i32)]).unwrap().get(0);
        assert_eq!(n, CLIENTS as i64, "node{id}");
    }
}

/// A backend ended by FATAL while it waits for its peers' answers (here
/// `pg_terminate_backend`; in production also `client_connection_check_interval`
/// finding that its proxy is gone) frees its places in the node's vote
/// table, which holds 1024 waits and never evicts one: more such ends than
/// that must leave the node committing.
#[test]
fn backends_terminated_while_they_wait_for_answers_leave_the_vote_table_usable() {
    let c = TestCluster::start(3);
    schema(&c, "create table after_terminations(id int primary key)");
    wait_connected(&c);
    let conninfo = c.node(1).admin_conninfo("postgres");
    let next = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (conninfo, next) = (conninfo.clone(), next.clone());
            std::thread::spawn(move || {
                let mut admin = Client::connect(&conninfo, postgres::NoTls).unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= 1100 {
                        break;
                    }
                    let mut waiter = Client::connect(&conninfo, postgres::NoTls).unwrap();
                    let pid: i32 = waiter.query_one("select pg_backend_pid()", &[]).unwrap().get(0);
                    // Acks of a commit nobody makes: it waits until ended.
                    let gid = format!("mtm-1-gone-{i}");
                    let wait = std::thread::spawn(move || waiter.query_one("select mtm.await_commits($1, 600000)", &[&gid]).map(drop));
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !admin
                        .query_one("select exists (select from pg_stat_activity where pid = $1 and wait_event = 'Extension')", &[&pid])
                        .unwrap()
                        .get::<_, bool>(0)
                    {
                        if wait.is_finished() {
                            let e = wait.join().unwrap().unwrap_err();
                            panic!("wait {i}: backend {pid} could not wait for the acks: {e:?}");
                        }
                        assert!(Instant::now() < deadline, "backend {pid} never waited for the acks");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    admin.execute("select pg_terminate_backend($1)", &[&pid]).unwrap();
                    assert!(wait.join().unwrap().is_err(), "backend {pid} was terminated");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut s = sessions(&c, 3);
    let homes: BTreeSet<i32> = s.iter_mut().map(port_of).collect();
    assert_eq!(homes.len(), 3, "one session on each node");
    for (i, cl) in s.iter_mut().enumerate() {
        cl.batch_execute(&format!("insert into after_terminations values ({i})"))
            .unwrap_or_else(|e| panic!("session {i} (on port {}): {} {:?}", port_of(cl), sqlstate(&e), e.as_db_error().map(|d| d.message())));
    }
    converge(&c, &["after_terminations"]);
}

/// A node lost under a session is reported with a SQLSTATE, never as a
/// bare closed connection: its backend killed (-9) while the proxy
/// commits the session's transaction gives 40003 naming the gid, whose
/// outcome the proxy cannot know (the cluster then finishes it the same
/// way everywhere); killed during a plain statement, 08006. Seen through
/// psql, which shows a FATAL that arrives just before the connection
/// closes (the postgres crate may report only the close).
#[test]
fn a_node_lost_during_a_commit_or_a_statement_is_reported_with_its_sqlstate() {
    let c = TestCluster::start(3);
    schema(&c, "create table doubt(id int primary key)");
    wait_connected(&c);
    let port = c.layout.proxy_port.to_string();
    // A psql session through the proxy with node 1 as its home.
    let pinned_psql = |sql: &str| {
        std::process::Command::new("psql")
            .args(["-X", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres", "-v", "VERBOSITY=verbose", "-c", sql])
            .env("PGOPTIONS", "-c multimaster.node=1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql")
    };
    // Kills (-9) node 1's backend that runs a statement like `pattern`.
    let kill_backend_running = |pattern: &str| {
        let mut node1 = client(&c, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid: i32 = loop {
            let row = node1.query_opt("select pid from pg_stat_activity where query like $1 and pid <> pg_backend_pid()", &[&pattern]).unwrap();
            if let Some(row) = row {
                break row.get(0);
            }
            assert!(Instant::now() < deadline, "no backend of node 1 runs {pattern}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    };

    // Node 2 frozen holds the commit in mtm.await_votes (up to 3 s, until
    // it counts as unreachable); the session's backend dies meanwhile.
    signal_node(&c, 2, "-STOP");
    let committing = pinned_psql("insert into doubt values (1)");
    kill_backend_running("%mtm.await_votes%");
    let out = committing.wait_with_output().unwrap();
    signal_node(&c, 2, "-CONT");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the commit's node was killed under it: {stderr}");
    assert!(stderr.contains("FATAL:  40003: lost the connection to node node1 while transaction mtm-1-"), "{stderr}");
    assert!(stderr.contains("whether it committed is not known"), "{stderr}");
    wait_connected(&c);
    nothing_prepared(&c, Duration::from_secs(60));
    converge(&c, &["doubt"]);

    // Node 2 applies a big transaction for a while. Node 1's walsender to
    // it is frozen once it has sent all of it: node 2 still votes yes (its
    // own walsender carries the vote), node 1 commits, and its wait for
    // node 2's commit lasts. The session's backend dies meanwhile: the
    // client hears that its transaction committed.
    let mut node1 = client(&c, 1);
    let committing = pinned_psql("insert into doubt select g from generate_series(100, 100099) g");
    let deadline = Instant::now() + Duration::from_secs(20);
    let prepared_at: String = loop {
        let voting = node1
            .query_opt("select pg_current_wal_flush_lsn()::text from pg_stat_activity where query like '%mtm.await_votes%' and pid <> pg_backend_pid()", &[])
            .unwrap();
        if let Some(row) = voting {
            break row.get(0);
        }
        assert!(Instant::now() < deadline, "the big transaction never waited for votes");
        std::thread::sleep(Duration::from_millis(5));
    };
    let walsender: i32 = loop {
        let sent = node1
            .query_opt(
                "select pid from pg_stat_replication where application_name = 'mtm_receiver_2_from_1' and sent_lsn >= $1::text::pg_lsn",
                &[&prepared_at],
            )
            .unwrap();
        if let Some(row) = sent {
            break row.get(0);
        }
        assert!(Instant::now() < deadline, "node 1 never sent the big transaction to node 2");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(std::process::Command::new("kill").args(["-STOP", &walsender.to_string()]).status().unwrap().success());
    kill_backend_running("%mtm.await_commits%");
    // (Node 1 restarts after the kill; its frozen walsender must go too.)
    let _ = std::process::Command::new("kill").args(["-CONT", &walsender.to_string()]).status();
    let out = committing.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FATAL:  08006: lost the connection to node node1 after transaction mtm-1-") && stderr.contains("committed"),
        "{stderr}"
    );
    wait_connected(&c);
    nothing_prepared(&c, Duration::from_secs(60));
    converge(&c, &["doubt"]);
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from doubt where id >= 100", &[]).unwrap().get(0);
        assert_eq!(n, 100_000, "node{id}: the transaction reported committed is there");
    }

    let reading = pinned_psql("select pg_sleep(10)");
    kill_backend_running("select pg_sleep(10)");
    let out = reading.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FATAL:  08006: lost the connection to node node1"), "{stderr}");
}
