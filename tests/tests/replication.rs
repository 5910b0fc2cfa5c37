//! The replication mesh on a real 3-node cluster, writing to nodes
//! directly (DDL is not replicated yet: tables are created on every node).

use mtmctl::testing::TestCluster;
use postgres::{Client, NoTls};
use std::time::{Duration, Instant};

fn client(c: &TestCluster, id: usize) -> Client {
    Client::connect(&c.node(id).conninfo("postgres"), NoTls).expect("connect to node")
}

fn on_every_node(c: &TestCluster, sql: &str) {
    for id in 1..=c.layout.node_ports.len() {
        client(c, id).batch_execute(sql).unwrap_or_else(|e| panic!("node{id}: {sql}: {e:?}"));
    }
}

/// md5 of a table's rows in key order, per node.
fn digests(c: &TestCluster, table: &str) -> Vec<String> {
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
fn converge(c: &TestCluster, tables: &[&str]) {
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

const SCHEMA: &str = "
    create table kv(id int primary key, v text, n numeric, ts timestamptz, j jsonb, a int[], big text, f float8);
    alter table kv alter column big set storage external;
    create table ck(a text, b int, v text, primary key (a, b));
    create table loc(id int primary key, node int);
";

#[test]
fn writes_on_every_node_reach_every_node() {
    let c = TestCluster::start(3);
    on_every_node(&c, SCHEMA);
    // mtm.local_tables is replicated: marking the table on one node is enough.
    client(&c, 1).batch_execute("select mtm.make_table_local('loc')").unwrap();
    converge(&c, &["mtm.local_tables"]);
    let big: String = (0..30_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    for id in 1..=3 {
        let mut cl = client(&c, id);
        let base = id as i32 * 100;
        for k in 0..10 {
            cl.execute(
                "insert into kv values ($1, $2, 12345.678901, '2024-02-29 12:34:56.789+00', '{\"k\": [1, null, \"x\"]}', '{1,NULL,3}', $3, 0.5)",
                &[&(base + k), &format!("node{id}-{k}"), &big],
            )
            .unwrap();
        }
        cl.execute("insert into kv (id) values ($1)", &[&(base + 50)]).unwrap();
        cl.batch_execute(&format!(
            "update kv set v = 'updated', big = big where id = {base};
             update kv set id = {} where id = {};
             delete from kv where id = {};
             insert into ck values ('key é {id}', 1, 'x'), ('key é {id}', 2, null);
             update ck set v = 'y' where a = 'key é {id}' and b = 2;
             insert into loc values ({id}, {id});",
            base + 99,
            base + 1,
            base + 2
        ))
        .unwrap();
    }
    converge(&c, &["kv", "ck"]);
    let mut one = client(&c, 1);
    // mtm.nodes() reports the real receivers and senders.
    let peers = one
        .query("select id, connected, receiver_pid is not null, sender_pid is not null, n_workers, receiver_mode from mtm.nodes() where not is_self order by id", &[])
        .unwrap();
    assert_eq!(peers.len(), 2);
    for r in &peers {
        let id: i32 = r.get(0);
        assert!(r.get::<_, bool>(1) && r.get::<_, bool>(2) && r.get::<_, bool>(3), "node {id} not connected");
        assert_eq!((r.get::<_, i32>(4), r.get::<_, String>(5)), (1, "normal".to_string()));
    }
    let n: i64 = one.query_one("select count(*) from kv", &[]).unwrap().get(0);
    assert_eq!(n, 30, "each write applied exactly once (no loops, no duplicates)");
    let v: String = one.query_one("select v from kv where id = 300", &[]).unwrap().get(0);
    assert_eq!(v, "updated");
    let same_big: bool = one.query_one("select bool_and(big = $1) from kv where big is not null", &[&big]).unwrap().get(0);
    assert!(same_big, "TOAST values intact, also where an update left them unchanged");
    // The local table stayed local.
    for id in 1..=3 {
        let rows: Vec<i32> = client(&c, id).query("select node from loc", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(rows, vec![id as i32], "node{id}");
    }
    // TRUNCATE follows too.
    client(&c, 2).batch_execute("truncate ck").unwrap();
    converge(&c, &["ck"]);
    assert_eq!(digests(&c, "ck"), vec!["empty"; 3]);
}

#[test]
fn prepared_transactions_are_prepared_committed_and_rolled_back_everywhere() {
    let c = TestCluster::start(3);
    on_every_node(&c, "create table p(id int primary key)");
    let mut one = client(&c, 1);
    one.batch_execute("begin; insert into p values (1); prepare transaction 'mtm-t1'").unwrap();
    one.batch_execute("begin; insert into p values (2); prepare transaction 'mtm-t2'").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in 2..=3 {
        loop {
            let gids: Vec<String> = client(&c, id)
                .query("select gid from pg_prepared_xacts order by gid", &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            if gids == ["mtm-t1", "mtm-t2"] {
                break;
            }
            assert!(Instant::now() < deadline, "node{id} prepared {gids:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    one.batch_execute("commit prepared 'mtm-t1'").unwrap();
    one.batch_execute("rollback prepared 'mtm-t2'").unwrap();
    converge(&c, &["p"]);
    for id in 1..=3 {
        let mut cl = client(&c, id);
        let ids: Vec<i32> = cl.query("select id from p", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, vec![1], "node{id}");
        let left: i64 = cl.query_one("select count(*) from pg_prepared_xacts", &[]).unwrap().get(0);
        assert_eq!(left, 0, "node{id}: nothing stays prepared");
    }
}

#[test]
fn a_killed_node_catches_up_without_loss_or_duplicates() {
    let c = TestCluster::start(3);
    on_every_node(&c, "create table w(id int primary key, v int)");
    let writer = {
        let conninfo = c.node(1).conninfo("postgres");
        std::thread::spawn(move || {
            let mut cl = Client::connect(&conninfo, NoTls).unwrap();
            for i in 0..3000 {
                cl.execute("insert into w values ($1, $1)", &[&i]).unwrap();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    c.node(2).kill9();
    std::thread::sleep(Duration::from_millis(500));
    c.node(2).start(&c.host).unwrap();
    writer.join().unwrap();
    // And a receiver killed on its own is restarted by the launcher.
    let mut three = client(&c, 3);
    three
        .batch_execute("select pg_terminate_backend(pid) from pg_stat_activity where backend_type = 'multimaster receiver'")
        .unwrap();
    client(&c, 1).batch_execute("update w set v = v + 1 where id < 100").unwrap();
    converge(&c, &["w"]);
    for id in 1..=3 {
        let (n, s): (i64, i64) = {
            let r = client(&c, id).query_one("select count(*), sum(v)::int8 from w", &[]).unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!((n, s), (3000, (0..3000i64).sum::<i64>() + 100), "node{id}");
    }
}

#[test]
fn a_conflicting_prepare_is_a_no_vote_with_its_reason() {
    let c = TestCluster::start(3);
    on_every_node(&c, "create table v(id int primary key, who text)");
    // A row only node 2 has: written under an origin of its own, which the
    // decoder does not forward.
    let mut two = client(&c, 2);
    two.batch_execute("select pg_replication_origin_create('test_only_here')").unwrap();
    two.batch_execute("select pg_replication_origin_session_setup('test_only_here')").unwrap();
    two.batch_execute("insert into v values (7, 'node2 only')").unwrap();
    two.batch_execute("select pg_replication_origin_session_reset()").unwrap();

    let mut one = client(&c, 1);
    one.batch_execute("begin; insert into v values (7, 'node1'); prepare transaction 'mtm-c1'").unwrap();
    let vote = |id: usize, gid: &str, ms: i32| -> (String, Option<String>, Option<String>) {
        let r = client(&c, id).query_one("select * from mtm.await_prepared($1, $2)", &[&gid, &ms]).unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let (state, code, message) = vote(2, "mtm-c1", 20_000);
    assert_eq!(state, "failed");
    assert_eq!(code.as_deref(), Some("23505"));
    assert!(message.unwrap_or_default().contains("duplicate key"));
    assert_eq!(vote(3, "mtm-c1", 20_000).0, "prepared");
    let t = Instant::now();
    assert_eq!(vote(3, "mtm-nobody", 300).0, "timeout");
    assert!(t.elapsed() < Duration::from_secs(5));

    // The coordinator's answer to a no vote: roll back everywhere. Node 2's
    // stream is not stuck on the failed prepare.
    one.batch_execute("rollback prepared 'mtm-c1'").unwrap();
    one.batch_execute("insert into v values (8, 'after')").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in 2..=3 {
        loop {
            let mut cl = client(&c, id);
            let has8: bool = cl.query_one("select exists (select 1 from v where id = 8)", &[]).unwrap().get(0);
            let prepared: i64 = cl.query_one("select count(*) from pg_prepared_xacts", &[]).unwrap().get(0);
            if has8 && prepared == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "node{id}: has 8 = {has8}, prepared = {prepared}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let who: String = client(&c, 2).query_one("select who from v where id = 7", &[]).unwrap().get(0);
    assert_eq!(who, "node2 only");
}

#[test]
fn a_table_without_a_key_gets_a_clear_error_not_corruption() {
    let c = TestCluster::start(2);
    on_every_node(&c, "create table nokey(x int, v text)");
    let mut one = client(&c, 1);
    one.batch_execute("insert into nokey values (1, 'a'), (1, 'b')").unwrap();
    converge(&c, &["nokey"]);
    // Which of two equal-looking rows to change is unknowable: refuse.
    one.batch_execute("update nokey set v = 'changed' where v = 'a'").unwrap();
    let log = &c.node(2).log;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("cannot apply UPDATE/DELETE on public.nokey") && text.contains("no primary key or replica identity") {
            break;
        }
        assert!(Instant::now() < deadline, "no clear error in {}", log.display());
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows: Vec<String> =
        client(&c, 2).query("select v from nokey order by v", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, ["a", "b"], "nothing guessed on node 2");
}
