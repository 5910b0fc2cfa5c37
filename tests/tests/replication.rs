//! The replication mesh on a real 3-node cluster, writing to nodes
//! directly (tables are created through the proxy, which puts them on
//! every node).

use mtm_tests::cluster::{client, converge, digests, schema};
use mtmctl::testing::TestCluster;
use postgres::{Client, NoTls};
use std::time::{Duration, Instant};

const SCHEMA: &str = "
    create table kv(id int primary key, v text, n numeric, ts timestamptz, j jsonb, a int[], big text, f float8);
    alter table kv alter column big set storage external;
    create table ck(a text, b int, v text, primary key (a, b));
    create table loc(id int primary key, node int);
";

#[test]
fn writes_on_every_node_reach_every_node() {
    let c = TestCluster::start(3);
    schema(&c, SCHEMA);
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
    let workers: i32 = one.query_one("select current_setting('multimaster.max_workers')::int", &[]).unwrap().get(0);
    assert!(workers > 1, "the default pool is parallel");
    let pools = one.query("select nworkers, receivername from mtm.stat_bgwpool order by receivername", &[]).unwrap();
    let pools: Vec<(i32, String)> = pools.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(pools, [(workers, "mtm_receiver_from_2".to_string()), (workers, "mtm_receiver_from_3".to_string())]);
    for r in &peers {
        let id: i32 = r.get(0);
        assert!(r.get::<_, bool>(1) && r.get::<_, bool>(2) && r.get::<_, bool>(3), "node {id} not connected");
        assert_eq!((r.get::<_, i32>(4), r.get::<_, String>(5)), (workers, "normal".to_string()), "an apply pool per peer");
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
    schema(&c, "create table p(id int primary key)");
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
    schema(&c, "create table w(id int primary key, v int)");
    let writer = {
        let conninfo = c.node(1).admin_conninfo("postgres");
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
    schema(&c, "create table v(id int primary key, who text)");
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
    assert_eq!(state, "failed", "node2 log: {}", std::fs::read_to_string(&c.node(2).log).unwrap_or_default());
    assert_eq!(code.as_deref(), Some("23505"));
    assert!(message.unwrap_or_default().contains("duplicate key"));
    assert_eq!(vote(3, "mtm-c1", 20_000).0, "prepared");
    // A duplicate key may come from applying side by side, so node 2 tried
    // it once more, alone, before it voted no.
    let log = std::fs::read_to_string(&c.node(2).log).unwrap();
    assert!(log.contains("applying mtm-c1 from node 1 again, alone, after: duplicate key"), "node2 log: {log}");
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

/// A failure that only parallel apply causes is cured by the serial retry,
/// not turned into a no vote: `mtm-b<k>` takes the value of a secondary
/// unique key that `mtm-a<k>` (committed just before it on node 1) gave
/// up. The scheduler keys transactions on their rows' replica identity,
/// so on a peer the two may apply side by side, and `mtm-b<k>`'s insert
/// can run before `mtm-a<k>`'s update is there: a duplicate key that
/// applying them in order would not have. Without the retry the peer
/// would vote no, never prepare `mtm-b<k>`, skip its COMMIT PREPARED, and
/// miss the row. `mtm-a<k>` first inserts 1000 rows elsewhere: a peer
/// applies them one by one, slower than node 1 wrote them, so `mtm-b<k>`
/// arrives while `mtm-a<k>` is still being applied (a peer that applied
/// `mtm-a<k>` at once would finish it before `mtm-b<k>` arrives, and the
/// race would hardly ever happen).
#[test]
fn a_prepare_that_fails_only_under_parallel_apply_is_retried_alone_and_votes_yes() {
    const PAIRS: i32 = 200;
    let c = TestCluster::start(3);
    schema(
        &c,
        &format!(
            "create table su(id int primary key, u int unique);
             create table filler(n int);
             insert into su select k, k from generate_series(1, {PAIRS}) k"
        ),
    );
    let mut one = client(&c, 1);
    for k in 1..=PAIRS {
        for sql in [
            format!("begin; insert into filler select generate_series(1, 1000); update su set u = -u where id = {k}; prepare transaction 'mtm-a{k}'"),
            format!("commit prepared 'mtm-a{k}'"),
            format!("begin; insert into su values ({PAIRS} + {k}, {k}); prepare transaction 'mtm-b{k}'"),
            format!("commit prepared 'mtm-b{k}'"),
        ] {
            one.batch_execute(&sql).unwrap();
        }
    }
    converge(&c, &["su"]);
    mtm_tests::cluster::nothing_prepared(&c, Duration::from_secs(30));
    let rows: i64 = client(&c, 3).query_one("select count(*) from su", &[]).unwrap().get(0);
    assert_eq!(rows, 2 * PAIRS as i64);
    // The race did happen (otherwise this test proved nothing), and every
    // time it was cured: no node voted no.
    let logs: Vec<String> = (2..=3).map(|id| std::fs::read_to_string(&c.node(id).log).unwrap()).collect();
    let retried = logs.iter().flat_map(|l| l.lines()).filter(|l| l.contains("again, alone, after: duplicate key")).count();
    eprintln!("{retried} transactions (of {PAIRS} pairs, counted on each of the 2 peers) met the race and were retried alone");
    assert!(retried > 0, "no transaction met the race in {PAIRS} pairs");
    for (log, id) in logs.iter().zip(2..) {
        assert!(!log.contains("votes no"), "node{id} voted no: {log}");
    }
}

#[test]
fn a_table_without_a_key_gets_a_clear_error_not_corruption() {
    let c = TestCluster::start(2);
    // Tables without a key get REPLICA IDENTITY FULL (tests/ddl.rs); with
    // the default identity instead, their changes cannot be located.
    schema(&c, "create table nokey(x int, v text); alter table nokey replica identity default");
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

const PGBENCH_TABLES: [&str; 4] = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"];

#[test]
fn pgbench_on_one_node_survives_a_killed_node_and_a_killed_apply_worker() {
    let c = TestCluster::start(3);
    mtm_tests::pgbench_tables(&c, 1);
    // Few accounts, many clients: the pool gets both independent
    // transactions and ones that touch the same rows.
    let port = c.node(1).port;
    let bench = std::thread::spawn(move || mtm_tests::pgbench_on_node(port, &["-N", "-c", "8", "-j", "2", "-T", "12", "--random-seed", "7"]));
    std::thread::sleep(Duration::from_secs(3));
    c.node(2).kill9();
    std::thread::sleep(Duration::from_secs(1));
    c.node(2).start(&c.host).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // An apply worker stopped on its own stops its pool; the receiver
    // comes back and resumes from what was committed.
    let killed: i64 = client(&c, 3)
        .query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where backend_type = 'multimaster apply worker' and application_name = 'mtm_apply_1_0'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "node 3 runs apply worker 0 for node 1");
    let (ok, out) = bench.join().unwrap();
    assert!(ok && out.contains("number of failed transactions: 0"), "{out}");
    converge(&c, &PGBENCH_TABLES);
    let history: i64 = client(&c, 1).query_one("select count(*) from pgbench_history", &[]).unwrap().get(0);
    let processed: i64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {out}"));
    assert_eq!(history, processed, "every pgbench transaction exactly once");
    // The balances agree with the history on every node.
    for id in 1..=3 {
        let ok: bool = client(&c, id)
            .query_one("select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta), 0) from pgbench_history)", &[])
            .unwrap()
            .get(0);
        assert!(ok, "node{id}");
    }
}

#[test]
fn an_apply_error_is_shown_in_mtm_nodes_and_retried_until_it_applies() {
    let c = TestCluster::start(3);
    // Missing on node 3 (made locally on nodes 1 and 2, which a superuser
    // can ask for): its worker cannot apply node 1's rows.
    const LOCAL: &str = "set multimaster.replicate_ddl = off; create table late(id int primary key)";
    client(&c, 1).batch_execute(LOCAL).unwrap();
    client(&c, 2).batch_execute(LOCAL).unwrap();
    schema(&c, "create table other(id int primary key)");
    let mut one = client(&c, 1);
    one.batch_execute("insert into late values (1); insert into other values (1)").unwrap();
    let mut three = client(&c, 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (errors, last) = loop {
        let r = three.query_one("select apply_errors, last_apply_error from mtm.nodes() where id = 1", &[]).unwrap();
        let (n, last): (i64, Option<String>) = (r.get(0), r.get(1));
        if n >= 2 || Instant::now() > deadline {
            break (n, last.unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(errors >= 2, "the failed transaction is retried ({errors} errors)");
    assert!(last.starts_with("42P01: ") && last.contains("public.late") && last.contains("does not exist"), "{last}");
    let applied: i64 = three.query_one("select count(*) from other", &[]).unwrap().get(0);
    assert_eq!(applied, 0, "nothing after the failed transaction is applied out of order");
    // Fix the cause: the retry goes through, and what followed it too.
    three.batch_execute(LOCAL).unwrap();
    one.batch_execute("insert into other values (2)").unwrap();
    converge(&c, &["late", "other"]);
    assert_eq!(digests(&c, "other")[2], digests(&c, "other")[0]);
    let pool: i32 = three.query_one("select nworkers from mtm.stat_bgwpool where receivername = 'mtm_receiver_from_1'", &[]).unwrap().get(0);
    assert!(pool > 0, "the pool runs again");
}

/// Peak anonymous (private, not shared-buffer) memory of the processes
/// with `backend_type` on a node, sampled until `done` is set.
fn sample_rss(conninfo: String, backend_type: &'static str, done: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut cl = Client::connect(&conninfo, NoTls).unwrap();
        let mut peak = 0u64;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            for r in cl.query("select pid from pg_stat_activity where backend_type = $1", &[&backend_type]).unwrap() {
                let pid: i32 = r.get(0);
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let kb: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("RssAnon:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                peak = peak.max(kb * 1024);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    })
}

#[test]
fn a_transaction_of_more_than_200_mb_replicates_in_bounded_memory() {
    let c = TestCluster::start(3);
    schema(&c, "create table huge(id int primary key, pad text); alter table huge alter column pad set storage plain");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = sample_rss(c.node(2).conninfo("postgres"), "multimaster receiver", done.clone());
    let workers = sample_rss(c.node(2).conninfo("postgres"), "multimaster apply worker", done.clone());
    // 220 000 rows of 1 000 bytes: about 230 MB of changes in one commit.
    client(&c, 1)
        .batch_execute("insert into huge select i, repeat(md5(i::text), 31) || lpad(i::text, 8) from generate_series(1, 220000) i")
        .unwrap();
    let bytes: i64 = client(&c, 1).query_one("select sum(octet_length(pad))::int8 from huge", &[]).unwrap().get(0);
    assert!(bytes >= 200 << 20, "{bytes} bytes");
    converge(&c, &["huge"]);
    done.store(true, std::sync::atomic::Ordering::Release);
    let (receiver, workers) = (receiver.join().unwrap(), workers.join().unwrap());
    eprintln!("peak private memory on node 2: receiver {} MB, apply workers {} MB", receiver >> 20, workers >> 20);
    // Streamed, not held: each process stays far below the transaction.
    assert!(receiver < 64 << 20 && workers < 64 << 20, "receiver {receiver} B, workers {workers} B for a {bytes} B transaction");
}

/// `kill -STOP` (or `-CONT`) of a node's postmaster and every process it
/// started: the node freezes as a hung machine would.
fn signal_node(c: &TestCluster, id: usize, signal: &str) {
    let pid = c.node(id).pid().expect("node running").to_string();
    let status = std::process::Command::new("pkill").args([signal, "-P", &pid]).status().unwrap();
    assert!(status.success(), "pkill {signal} -P {pid}");
    let status = std::process::Command::new("kill").args([signal, &pid]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

fn connected(c: &TestCluster, from: usize, to: i32) -> bool {
    client(c, from).query_one("select connected from mtm.nodes() where id = $1", &[&to]).unwrap().get(0)
}

#[test]
fn a_frozen_node_is_shown_disconnected_and_reconnects_when_it_thaws() {
    let c = TestCluster::start(3);
    mtm_tests::cluster::wait_connected(&c);
    schema(&c, "create table thaw(id int primary key)");
    signal_node(&c, 3, "-STOP");
    let frozen = Instant::now();
    while connected(&c, 1, 3) {
        assert!(frozen.elapsed() < Duration::from_secs(40), "node 1 still shows frozen node 3 connected");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("node 1 saw node 3 disconnected after {:?}", frozen.elapsed());
    assert!(connected(&c, 1, 2), "node 2 is still connected");
    let status: String = client(&c, 1).query_one("select status from mtm.status()", &[]).unwrap().get(0);
    assert_eq!(status, "online", "two of three nodes are a majority");
    signal_node(&c, 3, "-CONT");
    mtm_tests::cluster::wait_connected(&c);
    client(&c, 1).batch_execute("insert into thaw values (1)").unwrap();
    converge(&c, &["thaw"]);
}
