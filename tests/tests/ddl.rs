//! Cluster-wide DDL through the proxy of a 3-node cluster: sessions on
//! different nodes change the schema, every node is checked directly.

use mtm_tests::cluster::{client, converge, nothing_prepared, prepared, proxy_client, spread_sessions, sqlstate};
use mtmctl::testing::TestCluster;
use postgres::Client;
use std::time::{Duration, Instant};

/// One text value of `sql` on every node.
fn on_each(c: &TestCluster, sql: &str) -> Vec<String> {
    (1..=c.layout.node_ports.len())
        .map(|id| client(c, id).query_one(sql, &[]).unwrap_or_else(|e| panic!("node{id}: {sql}: {e:?}")).get(0))
        .collect()
}

/// Waits (up to 30 s) until `sql` gives `expected` on every node. (COMMIT
/// through the proxy already returns once every node has committed; the
/// wait keeps these checks true with `[commit] visible_everywhere = false`
/// too.)
fn same_everywhere(c: &TestCluster, sql: &str, expected: &str) {
    let want = vec![expected.to_string(); c.layout.node_ports.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = on_each(c, sql);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {got:?}, expected {expected:?} everywhere");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every commit has reached every node.
fn settle(c: &TestCluster) {
    nothing_prepared(c, Duration::from_secs(30));
}

#[test]
fn a_migration_mixing_ddl_and_dml_commits_on_every_node() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1
        .batch_execute(
            "begin;
             create table acct(id int primary key, owner text);
             insert into acct values (1, 'ann'), (2, 'bob');
             alter table acct add column balance int not null default 100;
             update acct set balance = balance + id;
             create index acct_owner on acct(owner);
             commit",
        )
        .unwrap();
    same_everywhere(&c, "select string_agg(attname, ',' order by attnum) from pg_attribute where attrelid = 'acct'::regclass and attnum > 0", "id,owner,balance");
    same_everywhere(&c, "select string_agg(id || ':' || owner || ':' || balance, ' ' order by id) from acct", "1:ann:101 2:bob:102");
    same_everywhere(&c, "select count(*)::text from pg_indexes where indexname = 'acct_owner'", "1");
    // A row written on another node under the new schema.
    settle(&c);
    s[1].1.batch_execute("insert into acct(id, owner) values (3, 'cy')").unwrap();
    same_everywhere(&c, "select sum(balance)::text from acct", "303");

    // Rows a DDL statement writes itself are written once per node.
    s[2].1.batch_execute("create table acct_copy as select * from acct").unwrap();
    same_everywhere(&c, "select count(*)::text from acct_copy", "3");

    // DDL in a DO block with dynamic EXECUTE, and inside a function
    // called from a SELECT: caught where it runs.
    s[1].1.batch_execute("do $$ begin execute 'create table dyn_' || 7 || '(x int)'; end $$").unwrap();
    s[2].1
        .batch_execute("create function mk() returns void language plpgsql as $$ begin create table from_fn(x int); insert into from_fn values (1); end $$")
        .unwrap();
    settle(&c);
    s[0].1.batch_execute("select mk()").unwrap();
    same_everywhere(&c, "select (to_regclass('dyn_7') is not null)::text", "true");
    same_everywhere(&c, "select count(*)::text from from_fn", "1");

    // CREATE TABLE AS that uses a function's variables, a SQL function's
    // $1, a client's bound parameter: the peers get the values, not names
    // that mean nothing there.
    s[1].1
        .batch_execute(
            "create function snapshot_of(n int, label text) returns void language plpgsql as $$
             declare suffix text := 'é''s'; nothing int;
             begin
               create table fn_vars as
                 select n as n, label || suffix as label, nothing as nothing,
                        (select count(*) from acct where id <= snapshot_of.n) as rows;
             end $$;
             create function sql_fn(int) returns void language sql as 'create table sql_vars as select $1 + 1 as v'",
        )
        .unwrap();
    settle(&c);
    s[2].1.batch_execute("select snapshot_of(2, 'two')").unwrap();
    same_everywhere(&c, "select concat_ws('|', n, label, coalesce(nothing::text, 'null'), rows) from fn_vars", "2|twoé's|null|2");
    s[0].1.batch_execute("select sql_fn(8)").unwrap();
    same_everywhere(&c, "select v::text from sql_vars", "9");
    s[1].1.execute("create table bound as select $1::int * 2 as v, $2::text as t", &[&21i32, &"it's"]).unwrap();
    same_everywhere(&c, "select v || ' ' || t from bound", "42 it's");

    // Other kinds of statements, from sessions on different nodes.
    s[0].1.batch_execute("create schema app; create type app.mood as enum ('ok', 'meh'); create domain app.pos as int check (value > 0)").unwrap();
    settle(&c);
    s[1].1.batch_execute("create or replace function app.twice(x int) returns int language sql as 'select 2 * x'").unwrap();
    settle(&c);
    s[2].1.batch_execute("create or replace function app.twice(x int) returns int language sql as 'select x + x'").unwrap();
    settle(&c);
    s[0].1.batch_execute("create view app.rich as select owner from acct where balance > 101; comment on view app.rich is 'the rich'").unwrap();
    settle(&c);
    s[1].1.batch_execute("create role auditor; grant select on acct to auditor; create extension pg_trgm").unwrap();
    same_everywhere(
        &c,
        "select concat_ws('|', app.twice(21), (select count(*) from app.rich), obj_description('app.rich'::regclass),
                has_table_privilege('auditor', 'acct', 'select'), (select extname from pg_extension where extname = 'pg_trgm'),
                'meh'::app.mood, 5::app.pos, pg_get_functiondef('app.twice'::regproc) like '%x + x%')",
        "42|1|the rich|t|pg_trgm|meh|5|t",
    );
    s[2].1.batch_execute("drop schema app cascade").unwrap();
    settle(&c);
    same_everywhere(&c, "select count(*)::text from pg_namespace where nspname = 'app'", "0");

    // Temporary tables stay on their node; an unlogged table's schema is
    // everywhere, its rows only where they were written.
    let (home, ref mut one) = s[0];
    // (Separate transactions: PostgreSQL cannot PREPARE one that used a
    // temporary table, and a schema change commits with PREPARE.)
    one.batch_execute("create temp table scratch(x int); insert into scratch values (1)").unwrap();
    one.batch_execute("create unlogged table cache(k int primary key)").unwrap();
    // So do temporary functions and types.
    one.batch_execute("create function pg_temp.scratch_f() returns int language sql as 'select 7'; create type pg_temp.scratch_t as enum ('a')").unwrap();
    assert_eq!(one.query_one("select pg_temp.scratch_f()", &[]).unwrap().get::<_, i32>(0), 7);
    // And a temporary table's triggers, rules and policies.
    one.batch_execute("create temp table scratch_log(x int)").unwrap();
    one.batch_execute("create function pg_temp.log_it() returns trigger language plpgsql as 'begin insert into scratch_log values (new.x); return new; end'").unwrap();
    one.batch_execute("create trigger scratch_logged after insert on scratch for each row execute function pg_temp.log_it()").unwrap();
    one.batch_execute("create rule scratch_twice as on insert to scratch do also insert into scratch_log values (new.x)").unwrap();
    one.batch_execute("create policy scratch_mine on scratch using (true)").unwrap();
    one.batch_execute("insert into scratch values (2)").unwrap();
    assert_eq!(one.query_one("select count(*) from scratch_log", &[]).unwrap().get::<_, i64>(0), 2);
    one.batch_execute("drop rule scratch_twice on scratch; drop trigger scratch_logged on scratch; drop policy scratch_mine on scratch").unwrap();
    settle(&c);
    one.batch_execute("insert into cache values (1)").unwrap();
    let scratch = on_each(&c, "select count(*)::text from pg_class where relname = 'scratch'");
    let scratch_f = on_each(&c, "select count(*)::text from pg_proc where proname = 'scratch_f'");
    let scratch_t = on_each(&c, "select count(*)::text from pg_type where typname = 'scratch_t'");
    let cache_rows = on_each(&c, "select count(*)::text from cache");
    for id in 1..=3 {
        let here = if id == home { "1" } else { "0" };
        assert_eq!(scratch[id - 1], here, "temporary table on node{id}");
        assert_eq!(scratch_f[id - 1], here, "temporary function on node{id}");
        assert_eq!(scratch_t[id - 1], here, "temporary type on node{id}");
        assert_eq!(cache_rows[id - 1], here, "unlogged rows on node{id}");
    }
    assert!(prepared(&c).iter().all(Vec::is_empty), "{:?}", prepared(&c));

    // mtm.set_temp_schema: the session's temporary objects go to the
    // schema it names, which stays on its node like them.
    let (home, ref mut two) = s[1];
    two.batch_execute("select mtm.set_temp_schema('mtm_tmp_test'); create temp table scratch2(x int); insert into scratch2 values (2)")
        .unwrap();
    let n: i64 = two.query_one("select count(*) from pg_temp.scratch2", &[]).unwrap().get(0);
    assert_eq!(n, 1);
    let placed = on_each(
        &c,
        "select coalesce(string_agg(n.nspname, ','), '') from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.relname = 'scratch2'",
    );
    let schemas = on_each(&c, "select count(*)::text from pg_namespace where nspname = 'mtm_tmp_test'");
    for id in 1..=3 {
        let (table, schema) = if id == home { ("mtm_tmp_test", "1") } else { ("", "0") };
        assert_eq!((placed[id - 1].as_str(), schemas[id - 1].as_str()), (table, schema), "node{id}");
    }
    two.batch_execute("create role mtm_tmp_user login; grant usage on schema mtm to mtm_tmp_user").unwrap();
    settle(&c);
    let mut plain = client(&c, home);
    plain.batch_execute("set role mtm_tmp_user").unwrap();
    let e = plain.batch_execute("select mtm.set_temp_schema('elsewhere')").unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "superusers only: {e:?}");
    assert!(e.as_db_error().is_some_and(|d| d.message().contains("only a superuser")), "{e:?}");
    assert!(prepared(&c).iter().all(Vec::is_empty), "{:?}", prepared(&c));
}

/// A schema change means on every node what it meant on its own: the
/// settings that change how its text is read (DateStyle, TimeZone,
/// standard_conforming_strings) or whether it is accepted (pg_dump's
/// `check_function_bodies = off`) travel with it, and rows written later
/// from sessions on other nodes get the same defaults.
#[test]
fn a_schema_change_is_read_with_its_sessions_settings_on_every_node() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    // (A Query string is lexed whole before its first statement runs, so
    // standard_conforming_strings set in the same string would not count.)
    let origin = &mut s[0].1;
    origin.batch_execute("set datestyle = 'ISO, DMY'; set timezone = 'Asia/Tokyo'; set standard_conforming_strings = off").unwrap();
    origin
        .batch_execute(r"create table dflt(id int primary key, d date default '01/02/2020', t timestamptz default '2020-01-01 00:00', v text default 'a\\b')")
        .unwrap();
    origin.batch_execute("set check_function_bodies = off").unwrap();
    origin.batch_execute("create function later() returns bigint language sql as 'select count(*) from not_created_yet'").unwrap();
    settle(&c);
    same_everywhere(
        &c,
        "select string_agg(pg_get_expr(adbin, adrelid), ' ' order by adnum) from pg_attrdef where adrelid = 'dflt'::regclass",
        r"'2020-02-01'::date '2019-12-31 15:00:00+00'::timestamp with time zone 'a\b'::text",
    );
    same_everywhere(&c, "select count(*)::text from pg_proc where proname = 'later'", "1");
    for (i, (_, cl)) in s.iter_mut().enumerate() {
        cl.execute("insert into dflt(id) values ($1)", &[&(i as i32)]).unwrap();
    }
    converge(&c, &["dflt"]);
    same_everywhere(&c, "select count(distinct (d, t, v))::text from dflt", "1");
}

#[test]
fn sequences_never_give_the_same_value_on_two_nodes() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1
        .batch_execute(
            "create table ser(id bigserial primary key, node int);
             create table ident(id int generated always as identity primary key, node int);
             create sequence explicit_seq increment by 10;
             create sequence dumped_seq start with 1 increment by 1",
        )
        .unwrap();
    settle(&c);
    for (node, cl) in s.iter_mut() {
        for _ in 0..5 {
            cl.execute("insert into ser(node) values ($1)", &[&(*node as i32)]).unwrap();
            cl.execute("insert into ident(node) values ($1)", &[&(*node as i32)]).unwrap();
        }
    }
    converge(&c, &["ser", "ident"]);
    for table in ["ser", "ident"] {
        let mut cl = client(&c, 1);
        let rows = cl.query(&format!("select id::int8, node from {table}"), &[]).unwrap();
        assert_eq!(rows.len(), 15, "{table}");
        for r in rows {
            let (id, node): (i64, i32) = (r.get(0), r.get(1));
            assert_eq!(id.rem_euclid(3), (node as i64).rem_euclid(3), "{table}: id {id} drawn on node {node}");
        }
    }
    // A sequence created with an explicit step keeps it, until
    // mtm.alter_sequences() gives every node its own values; INCREMENT BY
    // 1, which pg_dump writes for every sequence, counts as no step given.
    same_everywhere(&c, "select increment_by::text from pg_sequences where sequencename = 'explicit_seq'", "10");
    same_everywhere(&c, "select increment_by::text from pg_sequences where sequencename = 'dumped_seq'", "3");
    s[1].1.batch_execute("select mtm.alter_sequences()").unwrap();
    settle(&c);
    same_everywhere(&c, "select increment_by::text from pg_sequences where sequencename = 'explicit_seq'", "3");
    let values: Vec<i64> = (1..=3).map(|id| client(&c, id).query_one("select nextval('explicit_seq')", &[]).unwrap().get(0)).collect();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(v.rem_euclid(3), ((i + 1) as i64).rem_euclid(3), "node{} drew {v}", i + 1);
    }

    // ALTER SEQUENCE ... RESTART WITH moves each node to its own next
    // value from there, as setval does.
    s[2].1.batch_execute("alter sequence ser_id_seq restart with 100").unwrap();
    settle(&c);
    for (node, cl) in s.iter_mut() {
        let id: i64 = cl.query_one("insert into ser(node) values ($1) returning id", &[&(*node as i32)]).unwrap().get(0);
        assert_eq!(id, 99 + *node as i64, "node{node}'s first value after RESTART WITH 100");
    }
    // So does an identity column's ALTER COLUMN ... RESTART WITH (its
    // ALTER SEQUENCE runs inside the ALTER TABLE, on every node).
    s[0].1.batch_execute("alter table ident alter column id restart with 200").unwrap();
    settle(&c);
    for (node, cl) in s.iter_mut() {
        let id: i32 = cl.query_one("insert into ident(node) values ($1) returning id", &[&(*node as i32)]).unwrap().get(0);
        // Its own next value from 200: 202, 200, 201 on nodes 1, 2, 3.
        assert!((200..203).contains(&id) && id % 3 == *node as i32 % 3, "node{node}'s first identity after RESTART WITH 200: {id}");
    }
    converge(&c, &["ser", "ident"]);
}

/// What a user does to move a database into the cluster: `pg_dump` of
/// it, restored with `psql` through the proxy. Its sequences (written
/// with INCREMENT BY 1 and ending in a `setval`) then hand out, from
/// sessions on every node, values past the restored rows and never the
/// same one twice.
#[test]
fn a_pg_dump_restored_through_the_proxy_hands_out_new_keys_on_every_node() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    // The database to move in: a plain one on node 1 (databases other than
    // the replicated one are each node's own).
    s[0].1.batch_execute("create database legacy").unwrap();
    let legacy = c.node(1).conninfo("legacy");
    let mut old = Client::connect(&legacy, postgres::NoTls).unwrap();
    old.batch_execute(
        "create table items(id serial primary key, name text);
         create table orders(id bigint generated by default as identity primary key, item int references items);
         insert into items(name) select 'item ' || g from generate_series(1, 100) g;
         insert into orders(item) select g from generate_series(1, 50) g;",
    )
    .unwrap();
    let dump = std::process::Command::new("pg_dump")
        .args(["-h", "127.0.0.1", "-p", &c.node(1).port.to_string(), "-U", "postgres", "legacy"])
        .output()
        .expect("pg_dump (postgresql-client-15)");
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let script = String::from_utf8(dump.stdout).unwrap();
    assert!(script.contains("INCREMENT BY 1") && script.contains("pg_catalog.setval"), "a dump as pg_dump writes it");
    let mut restore = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &c.layout.proxy_port.to_string(), "-U", "postgres", "postgres"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut restore.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let out = restore.wait_with_output().unwrap();
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    settle(&c);
    let max = |cl: &mut Client, table: &str| -> i64 { cl.query_one(&format!("select max(id)::int8 from {table}"), &[]).unwrap().get(0) };
    let (items_max, orders_max) = (max(&mut s[0].1, "items"), max(&mut s[0].1, "orders"));
    for (node, cl) in s.iter_mut() {
        for _ in 0..3 {
            cl.execute("insert into items(name) values ($1)", &[&format!("new on node{node}")]).unwrap();
            cl.execute("insert into orders(item) values (1)", &[]).unwrap();
        }
    }
    converge(&c, &["items", "orders"]);
    same_everywhere(&c, &format!("select count(*)::text from items where id > {items_max} and name like 'new%'"), "9");
    same_everywhere(&c, &format!("select count(*)::text from orders where id > {orders_max}"), "9");
}

#[test]
fn statements_that_cannot_run_in_a_transaction_run_on_every_node() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1.batch_execute("create table big(id int primary key, v text); insert into big select g, md5(g::text) from generate_series(1, 1000) g").unwrap();
    settle(&c);
    s[1].1.batch_execute("create index concurrently big_v on big(v)").unwrap();
    s[2].1.batch_execute("vacuum analyze big").unwrap();
    s[0].1.batch_execute("create database side_db").unwrap();
    same_everywhere(&c, "select count(*)::text from pg_indexes where indexname = 'big_v'", "1");
    same_everywhere(&c, "select (last_vacuum is not null and last_analyze is not null)::text from pg_stat_user_tables where relname = 'big'", "true");
    same_everywhere(&c, "select count(*)::text from pg_database where datname = 'side_db'", "1");
    // Its owner is a schema change like any other (in autocommit too).
    s[1].1.batch_execute("create role side_owner").unwrap();
    s[1].1.batch_execute("alter database side_db owner to side_owner").unwrap();
    same_everywhere(&c, "select pg_get_userbyid(datdba)::text from pg_database where datname = 'side_db'", "side_owner");
    // Other databases are local to each node: their writes commit where
    // they run, with no two-phase commit.
    let mut side = postgres::Client::connect(&c.proxy_conninfo("side_db"), postgres::NoTls).unwrap();
    side.batch_execute("create table here_only(x int); insert into here_only values (1)").unwrap();
    let port: i32 = side.query_one("select current_setting('port')::int", &[]).unwrap().get(0);
    let tables: Vec<i64> = c
        .layout
        .node_ports
        .iter()
        .map(|p| {
            postgres::Client::connect(&format!("host=127.0.0.1 port={p} user=postgres dbname=side_db"), postgres::NoTls)
                .unwrap()
                .query_one("select count(*) from pg_class where relname = 'here_only'", &[])
                .unwrap()
                .get(0)
        })
        .collect();
    let expected: Vec<i64> = c.layout.node_ports.iter().map(|p| (*p as i32 == port) as i64).collect();
    assert_eq!(tables, expected, "side_db's table only on the session's node");

    // A node where it fails: the client gets that node's error, naming it,
    // and the statement is not run on the nodes after it.
    client(&c, 2).batch_execute("set multimaster.replicate_ddl = off; create index big_clash on big(id)").unwrap();
    let (home, ref mut cl) = s[0];
    assert_eq!(home, 1);
    let e = cl.batch_execute("create index concurrently big_clash on big(v)").unwrap_err();
    assert_eq!(sqlstate(&e), "42P07", "{e:?}");
    let text = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(text.contains("failed on node node2"), "{text}");
    let indexes = on_each(&c, "select count(*)::text from pg_indexes where indexname = 'big_clash'");
    assert_eq!(indexes, ["0", "1", "0"], "only node2's own index");
    let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or_default().to_string();
    assert!(hint.contains("not run on any node"), "{hint}");
    cl.batch_execute("select 1").unwrap();
}

#[test]
fn concurrent_schema_changes_on_two_nodes_never_stall() {
    let c = TestCluster::start(3);
    proxy_client(&c).batch_execute("create table x(id int primary key)").unwrap();
    settle(&c);
    let mut committed = 0;
    let mut errors = Vec::new();
    for round in 0..4 {
        let mut s = spread_sessions(&c, 2);
        for (i, (_, cl)) in s.iter_mut().enumerate() {
            cl.batch_execute(&format!("begin; alter table x add column c{round}_{i} int")).unwrap_or_else(|e| {
                // The other session's change may already hold the table.
                assert!(matches!(sqlstate(&e).as_str(), "40001" | "55P03" | "40P01"), "{e:?}");
            });
        }
        let handles: Vec<_> = s
            .into_iter()
            .map(|(_, mut cl)| {
                std::thread::spawn(move || match cl.batch_execute("commit") {
                    Ok(()) => None,
                    Err(e) => {
                        assert!(matches!(sqlstate(&e).as_str(), "40001" | "55P03" | "40P01" | "25P02"), "{e:?}");
                        Some(format!("round {round}: {}", e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())))
                    }
                })
            })
            .collect();
        for h in handles {
            match h.join().unwrap() {
                None => committed += 1,
                Some(e) => errors.push(e),
            }
        }
        settle(&c);
    }
    assert!(committed >= 4, "one of each round's two changes commits (older wins): {committed} of 8; {errors:#?}");
    let columns = on_each(&c, "select string_agg(attname, ',' order by attname) from pg_attribute where attrelid = 'x'::regclass and attnum > 0 and not attisdropped");
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{columns:?}");
    // Nothing is stuck: a write through the proxy reaches every node.
    proxy_client(&c).batch_execute("insert into x(id) values (1)").unwrap();
    same_everywhere(&c, "select count(*)::text from x", "1");
    assert!(prepared(&c).iter().all(Vec::is_empty), "{:?}", prepared(&c));
}

#[test]
fn pgbench_initialises_and_runs_through_the_proxy() {
    let c = TestCluster::start(3);
    mtm_tests::pgbench_tables(&c, 1);
    same_everywhere(&c, "select count(*)::text from pgbench_accounts", "100000");
    same_everywhere(&c, "select count(*)::text from pg_indexes where tablename like 'pgbench%'", "3");
    let (ok, out) = mtm_tests::pgbench(c.layout.proxy_port, &["-c", "3", "-T", "5", "--max-tries", "50"]);
    assert!(ok && out.contains("number of failed transactions: 0"), "{out}");
    converge(&c, &["pgbench_accounts", "pgbench_history"]);
    same_everywhere(&c, "select ((select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta), 0) from pgbench_history))::text", "true");
}

#[test]
fn remote_functions_run_on_every_node_and_their_rows_are_each_nodes_own() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1
        .batch_execute(
            "create table seen(node int, note text);
             create function note_here(note text) returns int language sql as
               $$ insert into seen select id, note from mtm.cluster_nodes where is_self returning node $$",
        )
        .unwrap();
    settle(&c);
    // Not a remote function: its row is written where it ran and replicates.
    s[1].1.batch_execute("select note_here('plain')").unwrap();
    // A remote function: it runs on every node, each writing its own row.
    s[2].1.batch_execute("set multimaster.remote_functions = 'public.note_here'; select note_here('remote')").unwrap();
    settle(&c);
    let home_of_1 = s[1].0;
    same_everywhere(
        &c,
        "select string_agg(node || ':' || note, ' ' order by note, node) from seen where note = 'plain'",
        &format!("{home_of_1}:plain"),
    );
    let own = on_each(&c, "select string_agg(node::text, ',' order by node) from seen where note = 'remote'");
    assert_eq!(own, ["1", "2", "3"], "each node's own row, not replicated");
    // So does a CREATE TABLE AS whose query calls one: every node runs it,
    // and fills its table with its own rows.
    s[0].1.batch_execute("set multimaster.remote_functions = 'public.note_here'; create table noted as select note_here('ctas') as node").unwrap();
    settle(&c);
    let own = on_each(&c, "select string_agg(node::text, ',' order by node) from seen where note = 'ctas'");
    assert_eq!(own, ["1", "2", "3"], "each node's own row, not replicated");
    let filled = on_each(&c, "select string_agg(node::text, ',') from noted");
    assert_eq!(filled, ["1", "2", "3"], "each node's table has its own row");
    // Its query as a prepared statement of the session, which the other
    // nodes do not have: refused.
    let e = s[0].1.batch_execute("prepare by_note as select note_here('prepared') as node; create table noted2 as execute by_note").unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    assert!(prepared(&c).iter().all(Vec::is_empty));
}

#[test]
fn create_table_as_gives_every_node_the_same_rows() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1.batch_execute("create table src(id int primary key, v int); insert into src select g, g from generate_series(1, 1000) g").unwrap();
    // Rows each node would compute differently if it ran the query
    // itself: random(), the clock, LIMIT without ORDER BY; in a
    // transaction that goes on writing to the new table; SELECT INTO.
    s[1].1.batch_execute("create table rnd as select g as id, random() as r, clock_timestamp() as at from generate_series(1, 100) g").unwrap();
    s[2].1.batch_execute("begin; create table picked as select * from src limit 10; update picked set v = -v; commit").unwrap();
    s[0].1.batch_execute("select id, random() as r into chosen from src where id <= 5").unwrap();
    // Without data: an empty table everywhere. A temporary one: here only.
    s[1].1.batch_execute("create table shape as select * from src with no data").unwrap();
    s[2].1.batch_execute("create temp table mine as select * from src").unwrap();
    converge(&c, &["rnd", "picked", "chosen", "shape"]);
    same_everywhere(&c, "select count(*) || ' ' || count(distinct r) from rnd", "100 100");
    same_everywhere(&c, "select count(*) || ' ' || bool_and(v < 0) from picked", "10 true");
    same_everywhere(&c, "select count(*)::text from chosen", "5");
    same_everywhere(&c, "select count(*)::text from shape", "0");
    same_everywhere(&c, "select count(*)::text from pg_class where relname = 'mine' and relpersistence = 'p'", "0");
    let mine: i64 = s[2].1.query_one("select count(*) from mine", &[]).unwrap().get(0);
    assert_eq!(mine, 1000);
    // The new tables take writes from every node like any other.
    s[0].1.batch_execute("update rnd set r = 0 where id = 1; insert into shape select * from src where id <= 3").unwrap();
    s[1].1.batch_execute("delete from picked where v = (select min(v) from picked)").unwrap();
    converge(&c, &["rnd", "picked", "shape"]);
    same_everywhere(&c, "select count(*)::text from shape", "3");
    same_everywhere(&c, "select count(*)::text from picked", "9");
    settle(&c);
}

/// The peers of a CREATE TABLE AS create the table the origin created —
/// same column names, types, modifiers, collations and options — and
/// receive its rows; they never run the query. So `AS EXECUTE` of a
/// prepared statement, which only the origin's session has, works; a
/// query that runs a schema change itself is refused, since the peers
/// would not run it.
#[test]
fn create_table_as_gives_every_node_the_same_table() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1.batch_execute("create table src(id int primary key, v int); insert into src select g, g from generate_series(1, 10) g").unwrap();
    let columns = |table: &str| {
        format!(
            "select string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || coalesce(' ' || co.collname, ''), ', ' order by a.attnum)
               from pg_attribute a left join pg_collation co on co.oid = a.attcollation and a.attcollation <> 100
              where a.attrelid = '{table}'::regclass and a.attnum > 0"
        )
    };
    s[1].1
        .batch_execute(
            "prepare pick(int) as select id, v::numeric(10,2) as amount, ('x' || id)::varchar(12) collate \"C\" as label from src where id <= $1;
             create table picked as execute pick(4);
             create table if not exists picked as execute pick(9);
             create table shaped as execute pick(9) with no data",
        )
        .unwrap();
    s[2].1.batch_execute("create table named(a, b) with (fillfactor = 70) as select id, v from src where id <= 3").unwrap();
    // The columns the query's plan gives, not those of the query as
    // analysed: the planner folds the CASE into `a`, varchar(5), where
    // the analysed CASE is a varchar of any length (also for a prepared
    // statement's custom plan).
    s[0].1
        .batch_execute(
            "create table typed(a varchar(5), b varchar(10)); insert into typed values ('x', 'y');
             create table folded as select case when true then a else b end as c from typed;
             prepare fold(bool) as select case when $1 then a else b end as c from typed;
             create table folded2 as execute fold(true)",
        )
        .unwrap();
    converge(&c, &["picked", "shaped", "named", "folded", "folded2"]);
    let folded = on_each(&c, &columns("folded"));
    assert_eq!(folded, vec!["c character varying(5)".to_string(); 3], "as the node that ran it made it");
    same_everywhere(&c, &columns("folded2"), &folded[0]);
    same_everywhere(&c, &columns("picked"), "id integer, amount numeric(10,2), label character varying(12) C");
    same_everywhere(&c, &columns("shaped"), "id integer, amount numeric(10,2), label character varying(12) C");
    same_everywhere(&c, "select string_agg(id || ':' || amount || ':' || label, ' ' order by id) from picked", "1:1.00:x1 2:2.00:x2 3:3.00:x3 4:4.00:x4");
    same_everywhere(&c, "select count(*)::text from shaped", "0");
    same_everywhere(&c, &columns("named"), "a integer, b integer");
    same_everywhere(&c, "select reloptions::text from pg_class where relname = 'named'", "{fillfactor=70}");
    same_everywhere(&c, "select count(*)::text from named", "3");
    // Rows a function of the query writes elsewhere are sent like the
    // table's own.
    s[0].1
        .batch_execute(
            "create table audit(x int);
             create function logit(i int) returns int language plpgsql as $$ begin insert into audit values (i); return i; end $$;
             create table logged as select logit(id) as id from src where id <= 4",
        )
        .unwrap();
    converge(&c, &["logged", "audit"]);
    same_everywhere(&c, "select count(*)::text from audit", "4");
    // A schema change the query runs: refused, nothing created anywhere.
    s[1].1
        .batch_execute("create function mk() returns int language plpgsql as $$ begin create table side(x int); return 1; end $$")
        .unwrap();
    let e = s[2].1.batch_execute("create table made as select mk() as one").unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    let db = e.as_db_error().unwrap();
    assert!(db.message().contains("a schema change run by the query"), "{}", db.message());
    // So is a sequence moved by the query: the other nodes would not move it.
    let e = s[0].1.batch_execute("create sequence sq; create table seqd as select setval('sq', 100) as v").unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    // An unlogged table is filled by each node itself: EXECUTE cannot be.
    let e = s[0].1.batch_execute("prepare p2 as select 1 as one; create unlogged table u as execute p2").unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    // EXPLAIN ANALYZE would make the table here only: refused. Its plan
    // alone, or a temporary table, is fine.
    let e = s[1].1.batch_execute("explain analyze create table ex as select 1 as one").unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    s[1].1.batch_execute("explain create table ex as select 1 as one; explain analyze create temp table ex as select 1 as one").unwrap();
    settle(&c);
    same_everywhere(&c, "select count(*)::text from pg_class where relname in ('made', 'side', 'u', 'sq', 'seqd', 'ex') and relpersistence <> 't'", "0");
    // The session goes on: the table made another way.
    s[2].1.batch_execute("create table side(x int); create table made as select 1 as one").unwrap();
    converge(&c, &["made"]);
    same_everywhere(&c, "select count(*)::text from made", "1");
}

/// SET CONSTRAINTS outside a transaction changes nothing, as
/// PostgreSQL only warns (it was taken for a schema change and refused
/// at its commit, 0A000); inside one it defers the checks, here a child
/// inserted before its parent. LOCK TABLE outside one is refused, as by
/// PostgreSQL (the proxy's own transaction made it succeed).
#[test]
fn set_constraints_and_lock_behave_in_and_out_of_a_transaction() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1
        .batch_execute("create table par(id int primary key); create table chi(pid int references par deferrable initially immediate)")
        .unwrap();
    settle(&c);
    s[1].1.batch_execute("set constraints all deferred").unwrap();
    let e = s[1].1.batch_execute("insert into chi values (7)").unwrap_err();
    assert_eq!(sqlstate(&e), "23503", "still immediate: {e:?}");
    s[2].1.batch_execute("begin; set constraints all deferred; insert into chi values (7); insert into par values (7); commit").unwrap();
    settle(&c);
    same_everywhere(&c, "select (select count(*) from chi) || '/' || (select count(*) from par)", "1/1");
    let e = s[0].1.batch_execute("lock table par in exclusive mode").unwrap_err();
    assert_eq!(sqlstate(&e), "25P01", "{e:?}");
    s[0].1.batch_execute("begin; lock table par in exclusive mode; insert into par values (8); commit").unwrap();
    settle(&c);
    same_everywhere(&c, "select count(*)::text from par", "2");
}

#[test]
fn tables_without_a_primary_key_replicate_updates_and_deletes() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1.batch_execute("create table nokey(x int, v text); insert into nokey values (1, 'a'), (1, 'a'), (2, 'b')").unwrap();
    settle(&c);
    same_everywhere(&c, "select relreplident::text from pg_class where relname = 'nokey'", "f");
    // Rows found by all their columns; of two equal rows, either is the same.
    s[1].1.batch_execute("update nokey set v = 'c' where ctid = (select min(ctid) from nokey where x = 1)").unwrap();
    s[2].1.batch_execute("delete from nokey where x = 2").unwrap();
    settle(&c);
    same_everywhere(&c, "select string_agg(x || v, ',' order by x, v) from nokey", "1a,1c");
    // Filling existing rows with values each node would compute itself
    // (a serial's sequence, now(), random()) is refused...
    for (i, sql) in [
        "alter table nokey add column id serial primary key",
        "alter table nokey add column at timestamptz default now()",
        "alter table nokey add column n int generated always as identity",
        "create materialized view rnd as select random() as r from generate_series(1, 3)",
    ]
    .into_iter()
    .enumerate()
    {
        let e = s[i % 3].1.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("different values on each node"), "{sql}: {}", db.message());
        assert!(db.hint().is_some(), "{sql}");
    }
    // ... not where there are no rows to fill, nor with constants, nor
    // in an unlogged table, whose rows are each node's own.
    s[1].1.batch_execute("create table fresh(x int); alter table fresh add column id serial, add column at timestamptz default now()").unwrap();
    s[2].1.batch_execute("create unlogged table stamps as select now() as at, random() as r").unwrap();
    s[2].1.batch_execute("create table copied as select x, v from nokey; alter table nokey add column k int default 0").unwrap();
    // The hint's way: add, fill through the proxy, then the key.
    s[0].1.batch_execute("alter table nokey add column id int; update nokey set id = ascii(v); alter table nokey add primary key (id)").unwrap();
    settle(&c);
    // A primary key added later: back to the default identity.
    same_everywhere(&c, "select relreplident::text from pg_class where relname = 'nokey'", "d");
    same_everywhere(&c, "select string_agg(id::text, ',' order by id) from nokey", "97,99");
    // mtm.check_query compares every node at once.
    let equal: bool = s[1].1.query_one("select mtm.check_query('select x, v, id from nokey')", &[]).unwrap().get(0);
    assert!(equal);
    s[0].1.batch_execute("select mtm.make_table_local('nokey')").unwrap();
    settle(&c);
    client(&c, 2).batch_execute("insert into nokey(x, v, id) values (9, 'only on node 2', 9)").unwrap();
    let equal: bool = s[1].1.query_one("select mtm.check_query('select x, v from nokey')", &[]).unwrap().get(0);
    assert!(!equal, "node 2 has a row the others lack");
}

#[test]
fn a_column_one_node_lacks_gets_its_default_and_materialized_views_refresh_everywhere() {
    let c = TestCluster::start(3);
    let mut s = spread_sessions(&c, 3);
    s[0].1.batch_execute("create table t(id int primary key, v int)").unwrap();
    settle(&c);
    // Only node 2 has this column (a superuser's local change): rows from
    // elsewhere get its default there, as an INSERT that leaves it out.
    client(&c, 2).batch_execute("set multimaster.replicate_ddl = off; alter table t add column extra int default 7").unwrap();
    let (home, ref mut one) = s[0];
    assert_ne!(home, 2);
    one.batch_execute("insert into t values (1, 10)").unwrap();
    settle(&c);
    let extra: Option<i32> = client(&c, 2).query_one("select extra from t where id = 1", &[]).unwrap().get(0);
    assert_eq!(extra, Some(7));

    // A materialized view's rows are not in the stream: REFRESH runs on
    // every node.
    s[0].1.batch_execute("create materialized view mv as select count(*) as n, sum(v) as total from t").unwrap();
    s[1].1.batch_execute("insert into t(id, v) values (2, 20)").unwrap();
    settle(&c);
    same_everywhere(&c, "select n || ':' || total from mv", "1:10");
    s[2].1.batch_execute("refresh materialized view mv").unwrap();
    settle(&c);
    same_everywhere(&c, "select n || ':' || total from mv", "2:30");
}

#[test]
fn large_objects_are_refused_clearly_in_the_replicated_database() {
    let c = TestCluster::start(3);
    let mut s: Vec<Client> = (0..3).map(|_| proxy_client(&c)).collect();
    for (i, cl) in s.iter_mut().enumerate() {
        for sql in ["select lo_create(0)", "select lo_from_bytea(0, 'data')", "begin; select lo_creat(-1); commit"] {
            let e = cl.batch_execute(sql).unwrap_err();
            let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e}"));
            assert_eq!(db.code().code(), "0A000", "session {i}: {sql}");
            assert!(db.message().contains("large objects are not replicated"), "{}", db.message());
            assert!(db.hint().unwrap_or_default().contains("bytea"), "{:?}", db.hint());
            cl.batch_execute("rollback").unwrap();
        }
    }
    for id in 1..=3 {
        let n: i64 = client(&c, id).query_one("select count(*) from pg_largeobject_metadata", &[]).unwrap().get(0);
        assert_eq!(n, 0, "node{id}");
    }
}

/// `pg_dump --schema-only` of node `id`, without what differs by design:
/// a sequence starts at its node's id (see the sequences test), and
/// pg_dump draws a random `\restrict` key per run.
fn schema_dump(c: &TestCluster, id: usize) -> String {
    let out = std::process::Command::new("pg_dump")
        .args(["--schema-only", "-h", "127.0.0.1", "-p", &c.layout.node_ports[id - 1].to_string(), "-U", "postgres", "postgres"])
        .output()
        .expect("pg_dump must be installed (postgresql-client-15)");
    assert!(out.status.success(), "pg_dump node{id}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim_start().starts_with("START WITH") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")).collect::<Vec<_>>().join("\n")
}

#[test]
fn adding_columns_under_concurrent_inserts_leaves_every_node_equal() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let c = TestCluster::start(3);
    proxy_client(&c).batch_execute("create table ev(id serial primary key, v int)").unwrap();
    settle(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let mut sessions = spread_sessions(&c, 4);
    let (_, mut changer) = sessions.pop().unwrap();
    let writers: Vec<_> = sessions
        .into_iter()
        .map(|(home, mut cl)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut refused) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    match cl.batch_execute(&format!("insert into ev(v) values ({home})")) {
                        Ok(()) => ok += 1,
                        Err(e) if matches!(sqlstate(&e).as_str(), "40001" | "55P03" | "40P01") => refused += 1,
                        Err(e) => panic!("insert on node{home}: {e:?}"),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    // Each change retried until it commits, as an application would; a
    // schema change goes before the inserts, so it does commit.
    let mut change = |sql: &str| {
        let mut refusals = Vec::new();
        for _ in 0..50 {
            match changer.batch_execute(sql) {
                Ok(()) => return,
                Err(e) if matches!(sqlstate(&e).as_str(), "40001" | "55P03" | "40P01") => {
                    refusals.push(e.as_db_error().map_or(e.to_string(), |d| format!("{}: {}", d.code().code(), d.message())));
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("{sql}: {e:?}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        panic!("{sql}: refused 50 times: {refusals:#?}");
    };
    std::thread::sleep(Duration::from_millis(700));
    change("alter table ev add column tag text default 'new'");
    std::thread::sleep(Duration::from_millis(700));
    change("alter table ev add column n int not null default 0, add column created date default '2026-01-01'");
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<(i32, i32)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    eprintln!("inserts committed / refused per writer: {counts:?}");
    assert!(counts.iter().all(|&(ok, _)| ok > 0), "every writer committed inserts: {counts:?}");
    settle(&c);

    let rows = on_each(&c, "select count(*)::text from ev");
    assert!(rows.windows(2).all(|w| w[0] == w[1]), "{rows:?}");
    same_everywhere(&c, "select count(*)::text from ev where tag is distinct from 'new' or created is distinct from '2026-01-01'", "0");
    // Every table's rows and the whole schema, node by node.
    let tables = on_each(&c, "select string_agg(relname, ',' order by relname) from pg_stat_user_tables where schemaname = 'public'");
    assert!(tables.windows(2).all(|w| w[0] == w[1]), "{tables:?}");
    for t in tables[0].split(',') {
        let md5 = on_each(&c, &format!("select md5(coalesce(string_agg(r::text, ',' order by r::text), '')) from {t} r"));
        assert!(md5.windows(2).all(|w| w[0] == w[1]), "{t}: {md5:?}");
    }
    let dumps: Vec<String> = (1..=3).map(|id| schema_dump(&c, id)).collect();
    assert!(dumps[0].contains("tag text DEFAULT 'new'"), "{}", dumps[0]);
    for id in 2..=3 {
        assert!(dumps[id - 1] == dumps[0], "node{id}'s schema differs from node1's:\n{}\n---\n{}", dumps[id - 1], dumps[0]);
    }
    assert!(prepared(&c).iter().all(Vec::is_empty), "{:?}", prepared(&c));
}

/// Object identifier values (`regclass`, `regtype`, `regproc` and their
/// arrays) name the same objects on every node, although the objects'
/// OIDs differ between nodes (here node 2 used OIDs the others did not):
/// they travel as schema-qualified names, not as OIDs.
#[test]
fn object_identifier_values_name_the_same_objects_on_every_node() {
    let c = TestCluster::start(3);
    // Temporary objects on node 2 alone move its OID counter ahead.
    client(&c, 2).batch_execute("create temp table shift1(x int); create temp table shift2(x int); create temp table shift3(x int)").unwrap();
    let mut s = proxy_client(&c);
    s.batch_execute(
        "create schema app;
         create table app.target(id int primary key);
         create type app.mood as enum ('ok');
         create function app.f() returns int language sql as 'select 1';
         create table refs(id int primary key, c regclass, t regtype, p regproc, ts regtype[])",
    )
    .unwrap();
    let oids = on_each(&c, "select 'app.target'::regclass::oid::text");
    assert!(oids.windows(2).any(|w| w[0] != w[1]), "the test needs OIDs that differ between nodes: {oids:?}");
    s.batch_execute("insert into refs values (1, 'app.target', 'app.mood', 'app.f', array['app.mood', 'int4']::regtype[])").unwrap();
    same_everywhere(&c, "select c::text || ' ' || t::text || ' ' || p::text || ' ' || ts::text from refs", "app.target app.mood app.f {app.mood,integer}");
    same_everywhere(&c, "select (c = 'app.target'::regclass and t = 'app.mood'::regtype)::text from refs", "true");
}
