//! The durable 2PC decision log (the extension's WAL resource manager):
//! what every node logs for the transactions committed through the proxy
//! of a 3-node cluster (sessions on every node), read back with
//! `pg_walinspect` and `mtm.get_logged_prepared_xact_state`, after a
//! kill -9 from the WAL alone and from the state file alone (also when
//! the crash comes right after a checkpoint that followed them); and the
//! resolver, which commits a gid its coordinator left precommitted and
//! rolls back one left merely prepared — also when the gid's home node is
//! gone, by a majority of the others.

use mtm_tests::cluster::{client, converge, nothing_prepared, proxy_client, schema, signal_node, spread_sessions, sqlstate, wait_connected};
use mtmctl::testing::TestCluster;
use postgres::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The multimaster records on node `id` since `from`: type → gids.
fn records(c: &TestCluster, id: usize, from: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let rows = client(c, id)
        .query(
            "select record_type, description from pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn())
              where resource_manager = 'multimaster'",
            &[&from],
        )
        .unwrap();
    for r in rows {
        let (kind, desc): (String, String) = (r.get(0), r.get(1));
        let gid = desc.strip_prefix("gid ").unwrap_or_else(|| panic!("node{id}: description {desc:?}"));
        out.entry(kind).or_default().insert(gid.to_string());
    }
    out
}

fn logged(cl: &mut Client, gid: &str) -> String {
    cl.query_one("select mtm.get_logged_prepared_xact_state($1)", &[&gid]).unwrap().get(0)
}

fn home_of(gid: &str) -> usize {
    gid.split('-').nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("gid {gid}"))
}

fn restart(c: &TestCluster, id: usize) {
    c.node(id).start(&c.host).unwrap();
    wait_connected(c);
}

#[test]
fn every_node_logs_each_decision_and_keeps_it_across_a_crash() {
    let c = TestCluster::start(3);
    schema(&c, "create extension pg_walinspect; create table t(id int primary key, v int)");
    proxy_client(&c).batch_execute("insert into t select g, 0 from generate_series(1, 3) g").unwrap();
    converge(&c, &["t"]);
    let start: Vec<String> = (1..=3).map(|id| client(&c, id).query_one("select pg_current_wal_lsn()::text", &[]).unwrap().get(0)).collect();

    let mut s: Vec<Client> = spread_sessions(&c, 3).into_iter().map(|(_, cl)| cl).collect();
    for i in 0..15 {
        s[i % 3].batch_execute(&format!("insert into t values ({}, 1)", 100 + i)).unwrap();
    }
    // Two sessions on different nodes update one row: one commits, the
    // other is refused and rolled back everywhere.
    let (mut a, mut b) = (s.remove(0), s.remove(0));
    a.batch_execute("begin; update t set v = v + 1 where id = 1").unwrap();
    b.batch_execute("begin; update t set v = v + 10 where id = 1").unwrap();
    let ta = std::thread::spawn(move || a.batch_execute("commit").map_err(|e| sqlstate(&e)));
    let tb = std::thread::spawn(move || b.batch_execute("commit").map_err(|e| sqlstate(&e)));
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    assert!(ra.is_ok() != rb.is_ok(), "exactly one commits: {ra:?} {rb:?}");
    assert_eq!(ra.err().or(rb.err()).as_deref(), Some("40001"));
    converge(&c, &["t"]);
    nothing_prepared(&c, Duration::from_secs(10));

    let logs: Vec<_> = (1..=3).map(|id| records(&c, id, &start[id - 1])).collect();
    let of = |id: usize, kind: &str| logs[id - 1].get(kind).cloned().unwrap_or_default();
    // Every node commits every transaction and logs it first.
    let committed = of(1, "COMMIT");
    assert!(committed.len() >= 16, "15 inserts and the update that won: {committed:?}");
    assert_eq!(of(2, "COMMIT"), committed, "node2 logged the same commits");
    assert_eq!(of(3, "COMMIT"), committed, "node3 logged the same commits");
    // A gid is precommitted on every node (its home node's promise, then
    // each peer's) before it commits.
    let mut homes = BTreeSet::new();
    for gid in &committed {
        homes.insert(home_of(gid));
        for id in 1..=3 {
            assert!(of(id, "PRECOMMIT").contains(gid), "{gid} precommitted on node{id}");
        }
    }
    assert_eq!(homes.len(), 3, "commits came from every node");
    // The refused transaction: aborted on its home node, committed nowhere.
    let aborted: BTreeSet<String> = (1..=3).flat_map(|id| of(id, "ABORT")).collect();
    assert!(!aborted.is_empty(), "the refused transaction's rollback is logged");
    for gid in &aborted {
        let home = home_of(gid);
        assert!(of(home, "ABORT").contains(gid), "{gid} aborted on its home node{home}");
        assert!(!committed.contains(gid), "{gid} committed");
        for id in 1..=3 {
            assert!(!of(id, "PRECOMMIT").contains(gid), "{gid} was never promised to commit, yet node{id} did");
        }
    }

    let check = |c: &TestCluster, id: usize, what: &str| {
        let mut cl = client(c, id);
        for gid in &committed {
            assert_eq!(logged(&mut cl, gid), "committed", "node{id} ({what}): {gid}");
        }
        for gid in of(id, "ABORT").iter() {
            assert_eq!(logged(&mut cl, gid), "aborted", "node{id} ({what}): {gid}");
        }
        assert_eq!(logged(&mut cl, "mtm-9-never"), "notfound");
    };
    for id in 1..=3 {
        check(&c, id, "running");
    }

    // kill -9, and the state file removed: the decisions come back from
    // the WAL (no checkpoint since they were logged).
    c.node(3).kill9();
    std::fs::remove_file(c.node(3).dir.join("pg_mtm/decisions")).ok();
    restart(&c, 3);
    check(&c, 3, "redone from the WAL");

    // A checkpoint puts them out of the redo's reach: after kill -9 they
    // come back from the state file the launcher wrote.
    client(&c, 2).batch_execute("checkpoint").unwrap();
    wait_until_written(&c.node(2).dir.join("pg_mtm/decisions"), &committed, "node2's launcher did not write it");
    c.node(2).kill9();
    restart(&c, 2);
    check(&c, 2, "read from the state file after a checkpoint");
}

fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Commits, a checkpoint right after them, a crash right after that: the
/// launcher, which writes the state file once a second, is frozen
/// (kill -STOP) all along, so the decisions survive only because the
/// checkpointer wrote the file as the checkpoint started.
#[test]
fn decisions_logged_just_before_a_checkpoint_survive_a_crash_right_after_it() {
    let c = TestCluster::start(3);
    schema(&c, "create extension pg_walinspect; create table k(id int primary key)");
    wait_connected(&c);
    let mut node1 = client(&c, 1);
    let launcher = launcher_pid(&mut node1);
    let from: String = node1.query_one("select pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    // Freeze the launcher only once it has written what the schema change
    // logged (it writes once a second when the table changed), so that it
    // is frozen between two writes: then the file below is all it wrote.
    let file = c.node(1).dir.join("pg_mtm/decisions");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = std::fs::read_to_string(&file).unwrap_or_default();
        std::thread::sleep(Duration::from_millis(1500));
        if !seen.is_empty() && std::fs::read_to_string(&file).unwrap_or_default() == seen {
            break;
        }
        assert!(Instant::now() < deadline, "node1's launcher keeps rewriting {}", file.display());
    }
    signal(launcher, "-STOP");
    let mut s = spread_sessions(&c, 3);
    for i in 0..6 {
        s[i % 3].1.batch_execute(&format!("insert into k values ({i})")).unwrap();
    }
    let committed = records(&c, 1, &from).remove("COMMIT").unwrap_or_default();
    assert_eq!(committed.len(), 6, "node1 logged a COMMIT for each insert: {committed:?}");
    let before = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(committed.iter().all(|g| !before.contains(g.as_str())), "the frozen launcher wrote none of them");

    node1.batch_execute("checkpoint").unwrap();
    c.node(1).kill9();
    signal(launcher, "-KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{launcher}")).exists() {
        assert!(Instant::now() < deadline, "launcher {launcher} still there");
        std::thread::sleep(Duration::from_millis(50));
    }
    restart(&c, 1);
    let mut cl = client(&c, 1);
    for gid in &committed {
        assert_eq!(logged(&mut cl, gid), "committed", "node1 after the crash: {gid}");
    }
}

/// The launcher rewrites the state file at most once a second while
/// decisions are logged. Frozen (kill -STOP) while it writes, caught by its
/// temporary file being there, it holds up neither a checkpoint nor the
/// commits of any node, three times over; once it runs again the file
/// catches up with every commit.
#[test]
fn a_launcher_frozen_while_it_writes_the_state_file_holds_up_no_checkpoint() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let c = TestCluster::start(3);
    schema(&c, "create extension pg_walinspect; create table f(id int primary key)");
    wait_connected(&c);
    let mut node1 = client(&c, 1);
    let from: String = node1.query_one("select pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    let launcher = launcher_pid(&mut node1);
    let launcher = Pid::from_raw(launcher);
    // A lock the frozen launcher held would stall the checkpoint forever;
    // this turns that into an error that names it.
    node1.batch_execute("set statement_timeout = '10s'").unwrap();
    let dir = c.node(1).dir.join("pg_mtm");
    // The launcher's temporary file, as named before and after it had one
    // of its own.
    let writing = [dir.join("decisions.tmp"), dir.join("decisions.launcher.tmp")];
    let mut s = spread_sessions(&c, 3);
    let mut next = 0;
    for round in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        'caught: loop {
            assert!(Instant::now() < deadline, "round {round}: never saw node1's launcher write {}", dir.display());
            s[next % 3].1.batch_execute(&format!("insert into f values ({next})")).unwrap();
            next += 1;
            let watch = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < watch {
                if writing.iter().any(|p| p.exists()) {
                    kill(launcher, Signal::SIGSTOP).unwrap();
                    break 'caught;
                }
            }
        }
        let checkpoint = node1.batch_execute("checkpoint");
        let commits: Vec<_> = (0..3)
            .map(|_| {
                let id = next;
                next += 1;
                s[id % 3].1.batch_execute(&format!("insert into f values ({id})"))
            })
            .collect();
        kill(launcher, Signal::SIGCONT).unwrap();
        checkpoint.unwrap_or_else(|e| panic!("round {round}: CHECKPOINT with the launcher frozen mid-write: {} {:?}", sqlstate(&e), e.as_db_error().map(|d| d.message())));
        for (i, r) in commits.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("round {round}: commit {i} with node1's launcher frozen: {} {:?}", sqlstate(&e), e.as_db_error().map(|d| d.message())));
        }
    }
    converge(&c, &["f"]);
    let count: i64 = node1.query_one("select count(*) from f", &[]).unwrap().get(0);
    assert_eq!(count, next as i64, "every insert committed");
    let committed = records(&c, 1, &from).remove("COMMIT").unwrap_or_default();
    assert!(committed.len() >= next, "node1 logged a COMMIT for each insert: {} of {next}", committed.len());
    wait_until_written(&dir.join("decisions"), &committed, "node1's launcher did not catch up");
}

/// Waits until the state file `file` names every gid of `gids`.
fn wait_until_written(file: &std::path::Path, gids: &BTreeSet<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(file).is_ok_and(|t| gids.iter().all(|g| t.contains(g.as_str()))) {
        assert!(Instant::now() < deadline, "{what}: {}", file.display());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pid of the node's launcher.
fn launcher_pid(cl: &mut Client) -> i32 {
    cl.query_one("select pid from pg_stat_activity where backend_type = 'multimaster launcher'", &[]).unwrap().get(0)
}

/// A PREPARE that fails frees the note saying which backend coordinates
/// its gid (and never takes another backend's, when it fails because that
/// one prepared the same gid). Were it kept until the session ends, a long-lived session
/// refused many times (conflicts, a node that cannot vote) would fill the
/// table of notes: then conflicts with the node's transactions wait for
/// the lock timeout, and the resolver takes a live coordinator's prepared
/// transaction for an orphan and rolls it back.
#[test]
fn failed_prepares_of_a_long_lived_session_leave_its_next_commit_to_it() {
    let c = TestCluster::start(3);
    schema(&c, "create table lived(id int primary key)");
    wait_connected(&c);
    let mut s = client(&c, 1);
    // More than the 512 notes a node keeps, each way a PREPARE can fail:
    // refused as it runs (PostgreSQL cannot prepare a transaction that
    // touched a temporary table; conflicts and unreachable nodes are
    // refused at the same point), and in a failed transaction block.
    for i in 0..600 {
        let e = s.batch_execute(&format!("begin; create temp table if not exists scratch(x int); prepare transaction 'mtm-1-refused-{i}'")).unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{e:?}");
        assert!(s.batch_execute("begin; select 1/0").is_err());
        s.batch_execute(&format!("prepare transaction 'mtm-1-failed-block-{i}'")).unwrap();
    }
    s.batch_execute("begin; insert into lived values (1); prepare transaction 'mtm-1-live'").unwrap();
    // Another session that tries the same gid fails as a duplicate, and
    // must not take the live coordinator's note with it.
    let mut other = client(&c, 1);
    let e = other.batch_execute("begin; prepare transaction 'mtm-1-live'").unwrap_err();
    assert_eq!(sqlstate(&e), "42710", "{e:?}");
    drop(other);
    // The resolver looks once a second at this node's gids prepared over
    // a second ago; give it a few chances to take this one for an orphan.
    std::thread::sleep(Duration::from_secs(4));
    let state: String = s.query_one("select mtm.xact_state('mtm-1-live')", &[]).unwrap().get(0);
    assert_eq!(state, "prepared", "the resolver finished a gid whose coordinator is alive and connected");
    s.batch_execute("rollback prepared 'mtm-1-live'").unwrap();
    nothing_prepared(&c, Duration::from_secs(10));
}

#[test]
fn the_resolver_commits_a_precommitted_orphan_and_rolls_back_an_undecided_one() {
    let c = TestCluster::start(3);
    schema(&c, "create table r(id int primary key); create role r_app login");
    wait_connected(&c);
    // A coordinator that gets every vote, then disappears before its
    // COMMIT PREPARED: the decision was logged, so the gid commits.
    {
        let mut coordinator = client(&c, 1);
        coordinator.batch_execute("begin; insert into r values (1); prepare transaction 'mtm-1-orphan-decided'").unwrap();
        let ok: bool = coordinator.query_one("select ok from mtm.await_votes('mtm-1-orphan-decided', 10000)", &[]).unwrap().get(0);
        assert!(ok, "every peer voted yes");
        assert_eq!(
            coordinator.query_one("select mtm.xact_state('mtm-1-orphan-decided')", &[]).unwrap().get::<_, String>(0),
            "precommitted"
        );
    }
    // One that disappears right after its PREPARE: rolled back everywhere.
    {
        let mut coordinator = client(&c, 1);
        coordinator.batch_execute("begin; insert into r values (2); prepare transaction 'mtm-1-orphan-undecided'").unwrap();
    }
    // A decided one whose COMMIT PREPARED fails after the node logged it
    // (here: refused to a role that may not finish it; in life, a cancel)
    // and whose coordinator then disappears: the decision stands.
    {
        let mut coordinator = client(&c, 1);
        coordinator.batch_execute("begin; insert into r values (3); prepare transaction 'mtm-1-orphan-finish-failed'").unwrap();
        let ok: bool = coordinator.query_one("select ok from mtm.await_votes('mtm-1-orphan-finish-failed', 10000)", &[]).unwrap().get(0);
        assert!(ok, "every peer voted yes");
        let app = c.node(1).conninfo("postgres").replace("user=postgres", "user=r_app");
        let mut app = Client::connect(&app, postgres::NoTls).unwrap();
        let err = app.batch_execute("commit prepared 'mtm-1-orphan-finish-failed'").unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err:?}");
        // PostgreSQL refuses COMMIT PREPARED in a transaction block: not a
        // decision either.
        let err = coordinator.batch_execute("begin; commit prepared 'mtm-1-orphan-undecided'").unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("25001"), "{err:?}");
    }
    // A node keeps its promises: no rollback of a gid it promised to
    // commit (as when the proxy's wait for the promises is cancelled), no
    // commit of one it promised a resolver to roll back; the resolver
    // then finishes each the promised way.
    let mut coordinator = client(&c, 1);
    coordinator.batch_execute("begin; insert into r values (4); prepare transaction 'mtm-1-promised'").unwrap();
    let ok: bool = coordinator.query_one("select ok from mtm.await_votes('mtm-1-promised', 10000)", &[]).unwrap().get(0);
    assert!(ok);
    let err = coordinator.batch_execute("rollback prepared 'mtm-1-promised'").unwrap_err();
    assert_eq!(sqlstate(&err), "40003", "{err:?}");
    coordinator.batch_execute("begin; insert into r values (5); prepare transaction 'mtm-1-unpromised'").unwrap();
    let mut peer = client(&c, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while peer.query_one("select count(*) from pg_prepared_xacts where gid = 'mtm-1-unpromised'", &[]).unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < deadline, "node2 did not prepare mtm-1-unpromised");
        std::thread::sleep(Duration::from_millis(20));
    }
    let promised: String = peer.query_one("select mtm.resolve_gid('mtm-1-unpromised', 'preabort')", &[]).unwrap().get(0);
    assert_eq!(promised, "preaborted");
    let err = peer.batch_execute("commit prepared 'mtm-1-unpromised'").unwrap_err();
    assert_eq!(sqlstate(&err), "55000", "{err:?}");
    drop(coordinator);
    nothing_prepared(&c, Duration::from_secs(15));
    converge(&c, &["r"]);
    for id in 1..=3 {
        let mut cl = client(&c, id);
        let ids: Vec<i32> = cl.query("select id from r order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [1, 3, 4], "node{id}: the decided gids committed, the others did not");
        assert_eq!(logged(&mut cl, "mtm-1-orphan-decided"), "committed", "node{id}");
    }
    assert_eq!(logged(&mut client(&c, 1), "mtm-1-orphan-undecided"), "aborted");
}

/// On node 2, `<prefix>-decided`, which every node voted yes on and a
/// majority promised to commit, and `<prefix>-undecided`, merely prepared;
/// returns their coordinators (still connected) once nodes 1 and 3 hold
/// the second prepared and have promised to commit the first (or, as a
/// peer of a 3-node cluster may once it promised, committed it already).
fn two_gids_on_node2(c: &TestCluster, prefix: &str) -> (Client, Client) {
    let mut decided = client(c, 2);
    decided.batch_execute(&format!("begin; insert into r values (1); prepare transaction '{prefix}-decided'")).unwrap();
    let ok: bool = decided.query_one(&format!("select ok from mtm.await_votes('{prefix}-decided', 10000)"), &[]).unwrap().get(0);
    assert!(ok, "every node voted yes and a majority promised to commit");
    let mut undecided = client(c, 2);
    undecided.batch_execute(&format!("begin; insert into r values (2); prepare transaction '{prefix}-undecided'")).unwrap();
    for id in [1, 3] {
        let mut cl = client(c, id);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The undecided one reaches the peers: they voted yes on it too.
        while cl.query_one("select count(*) from pg_prepared_xacts where gid = $1 || '-undecided'", &[&prefix]).unwrap().get::<_, i64>(0) < 1 {
            assert!(Instant::now() < deadline, "node{id} did not prepare {prefix}-undecided");
            std::thread::sleep(Duration::from_millis(20));
        }
        let state: String = cl.query_one("select mtm.xact_state($1 || '-decided')", &[&prefix]).unwrap().get(0);
        assert!(
            state == "precommitted" || state == "committed",
            "node{id} promised to commit it before its home node answered: {state}"
        );
    }
    (decided, undecided)
}

/// Nodes 1 and 3 finish both gids of [`two_gids_on_node2`] within
/// `within`, without node 2: the promised one committed, the other rolled
/// back.
fn finished_without_node2(c: &TestCluster, prefix: &str, within: Duration) {
    let deadline = Instant::now() + within;
    for id in [1, 3] {
        let mut cl = client(c, id);
        while cl.query_one("select count(*) from pg_prepared_xacts", &[]).unwrap().get::<_, i64>(0) > 0 {
            assert!(Instant::now() < deadline, "node{id}: gids of node 2 still prepared");
            std::thread::sleep(Duration::from_millis(100));
        }
        let ids: Vec<i32> = cl.query("select id from r order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [1], "node{id}: the promised gid committed, the other rolled back");
        assert_eq!(logged(&mut cl, &format!("{prefix}-decided")), "committed", "node{id}");
        assert_eq!(logged(&mut cl, &format!("{prefix}-undecided")), "aborted", "node{id}");
    }
}

/// Node 2, back, agrees with the others on both gids.
fn node2_agrees(c: &TestCluster, prefix: &str) {
    nothing_prepared(c, Duration::from_secs(15));
    converge(c, &["r"]);
    let mut home = client(c, 2);
    assert_eq!(logged(&mut home, &format!("{prefix}-decided")), "committed");
    assert_eq!(logged(&mut home, &format!("{prefix}-undecided")), "aborted");
}

/// The home node of two gids dies (kill -9) while their coordinators wait:
/// one every node promised to commit, one merely prepared. The other two
/// nodes are a majority: they finish both within seconds without it, the
/// first committed and the second rolled back, and the home node agrees
/// when it comes back.
#[test]
fn a_majority_finishes_the_gids_of_a_home_node_that_died() {
    let c = TestCluster::start(3);
    schema(&c, "create extension pg_walinspect; create table r(id int primary key)");
    wait_connected(&c);
    let start: Vec<String> = [1, 3].iter().map(|&id| client(&c, id).query_one("select pg_current_wal_lsn()::text", &[]).unwrap().get(0)).collect();
    let coordinators = two_gids_on_node2(&c, "mtm-2-home-died");
    // The coordinators are still connected: only the home node's death
    // leaves the gids behind.
    c.node(2).kill9();
    drop(coordinators);
    finished_without_node2(&c, "mtm-2-home-died", Duration::from_secs(20));
    // The rollback was decided by promises, readable in the WAL.
    let preaborts: usize = [1, 3]
        .iter()
        .enumerate()
        .map(|(i, &id)| records(&c, id, &start[i]).get("PREABORT").map_or(0, |g| g.iter().filter(|g| g.ends_with("undecided")).count()))
        .sum();
    assert!(preaborts >= 1, "the nodes promised to roll back the undecided gid");
    restart(&c, 2);
    node2_agrees(&c, "mtm-2-home-died");
}

/// The same with the home node frozen (kill -STOP) instead of killed: the
/// others finish its gids without waiting for it, and it agrees once it
/// runs again and its coordinators are gone.
#[test]
fn a_majority_finishes_the_gids_of_a_frozen_home_node() {
    let c = TestCluster::start(3);
    schema(&c, "create table r(id int primary key)");
    wait_connected(&c);
    let coordinators = two_gids_on_node2(&c, "mtm-2-frozen");
    signal_node(&c, 2, "-STOP");
    let outcome = std::panic::catch_unwind(|| finished_without_node2(&c, "mtm-2-frozen", Duration::from_secs(25)));
    signal_node(&c, 2, "-CONT");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
    drop(coordinators);
    node2_agrees(&c, "mtm-2-frozen");
}
