//! The `mtm` SQL API surface on a real node: what is built works, what is
//! not raises feature_not_supported instead of inventing a result.

use mtmctl::testing::TestCluster;
use postgres::{Client, NoTls};

#[test]
fn api_surface_and_not_implemented_errors() {
    let c = TestCluster::start(1);
    let mut cl = Client::connect(&c.node(1).admin_conninfo("postgres"), NoTls).unwrap();
    let one = |cl: &mut Client, sql: &str| -> String { cl.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(one(&mut cl, "select mtm.version()"), env!("CARGO_PKG_VERSION"));
    assert!(cl.query_one("select mtm.ping()", &[]).unwrap().get::<_, bool>(0));

    // Membership changes are not built: add_node and drop_node refuse
    // (below) and leave mtm.cluster_nodes alone. Two unreachable peers,
    // written by hand, for what follows.
    cl.batch_execute("insert into mtm.cluster_nodes (id, conninfo, is_self) values (2, 'host=a', false), (3, 'host=b', false)")
        .unwrap();
    let horizon: Option<String> = cl
        .query_one("select (mtm.translate_syncpoint(1, '0/10', 2)).emitter_lsn::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(horizon, None, "no syncpoint yet");

    // Result columns as in the reference.
    let cols: Vec<String> = cl
        .query(
            "select attname::text from pg_attribute where attrelid = 'mtm.cluster_status'::regclass and attnum > 0 order by attnum",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cols, ["my_node_id", "status", "connected", "gen_num", "gen_members", "gen_members_online", "gen_configured"]);

    // A single node: itself, no receivers.
    let me = cl.query_one("select id, is_self, connected, receiver_mode from mtm.nodes() where id = 1", &[]).unwrap();
    assert_eq!((me.get::<_, i32>(0), me.get::<_, bool>(1), me.get::<_, bool>(2)), (1, true, true));
    assert_eq!(me.get::<_, String>(3), "disabled");

    // Nodes 2 and 3 above are unreachable names: this node alone is not
    // a majority of three, and has no apply pool running.
    let st = cl.query_one("select my_node_id, status, connected, gen_members from mtm.status()", &[]).unwrap();
    assert_eq!(st.get::<_, i32>(0), 1);
    assert_eq!(st.get::<_, String>(1), "isolated");
    assert_eq!(st.get::<_, Vec<i32>>(2), [1]);
    assert_eq!(st.get::<_, Vec<i32>>(3), [1, 2, 3]);
    assert_eq!(cl.query("select * from mtm.stat_bgwpool", &[]).unwrap().len(), 0);

    // The decision log answers for a gid it never saw.
    assert_eq!(one(&mut cl, "select mtm.get_logged_prepared_xact_state('mtm-1-404')"), "notfound");
    assert_eq!(one(&mut cl, "select mtm.xact_state('mtm-1-404')"), "notfound");

    // Not built yet: a clear feature_not_supported, never a made-up answer.
    for sql in [
        "select mtm.hold_backends()",
        "select mtm.add_node('host=c')",
        "select mtm.drop_node(2)",
    ] {
        let err = cl.batch_execute(sql).unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().code(), "0A000", "{sql}");
        assert!(db.message().contains("not implemented yet"), "{sql}: {}", db.message());
    }

    let ids: Vec<i32> = cl.query("select id from mtm.cluster_nodes order by id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1, 2, 3], "a refused add_node/drop_node changed nothing");

    // GUCs under the reserved prefix.
    cl.batch_execute("set multimaster.remote_functions = 'public.f, g'").unwrap();
    assert_eq!(one(&mut cl, "show multimaster.remote_functions"), "public.f, g");
    let err = cl.batch_execute("set multimaster.no_such_setting = 1").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42602", "the multimaster. prefix is reserved");
}

/// Every `multimaster.*` setting takes its value from the configuration
/// files (here `ALTER SYSTEM`, then a restart), whichever module defines it.
#[test]
fn settings_take_their_values_from_the_configuration() {
    let c = TestCluster::start(1);
    let node = c.node(1);
    let mut cl = Client::connect(&node.admin_conninfo("postgres"), NoTls).unwrap();
    for (name, value) in [("multimaster.direct_writes", "on"), ("multimaster.replicate_ddl", "off"), ("multimaster.max_workers", "2")] {
        cl.batch_execute(&format!("alter system set {name} = '{value}'")).unwrap();
    }
    drop(cl);
    node.stop(&c.host, "fast").unwrap();
    node.start(&c.host).unwrap();
    // A plain session (no options): what the files say.
    let mut cl = Client::connect(&node.conninfo("postgres"), NoTls).unwrap();
    for (name, value) in [("multimaster.direct_writes", "on"), ("multimaster.replicate_ddl", "off"), ("multimaster.max_workers", "2")] {
        let shown: String = cl.query_one(&format!("show {name}"), &[]).unwrap().get(0);
        assert_eq!(shown, value, "{name}");
    }
}
