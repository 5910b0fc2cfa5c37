//! The `multimaster` output plugin on a real node: changes read back with
//! pg_logical_slot_get_binary_changes (and, for what only a walsender
//! does, streamed by pg_recvlogical) and decoded with mtm-protocol.

use mtm_protocol::{tag, Message, OldTuple, Value, VoteMessage};
use mtmctl::testing::TestCluster;
use postgres::{Client, NoTls};

fn node_client(c: &TestCluster) -> Client {
    Client::connect(&c.node(1).admin_conninfo("postgres"), NoTls).expect("connect to node")
}

/// Everything decoded since the last call (consumes the slot).
fn changes(cl: &mut Client, slot: &str, recovery: bool) -> Vec<Message> {
    let sql = if recovery {
        "select data from pg_logical_slot_get_binary_changes($1, NULL, NULL, 'mtm_mode', 'recovery')"
    } else {
        "select data from pg_logical_slot_get_binary_changes($1, NULL, NULL)"
    };
    cl.query(sql, &[&slot])
        .unwrap()
        .iter()
        .map(|r| {
            let data: Vec<u8> = r.get(0);
            Message::decode(&data).unwrap_or_else(|e| panic!("undecodable message {data:?}: {e}"))
        })
        .collect()
}

/// Runs each `;`-separated statement on its own (one simple Query would
/// make them one implicit transaction).
fn exec_each(cl: &mut Client, sql: &str) {
    for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        cl.batch_execute(stmt).unwrap_or_else(|e| panic!("{stmt}: {e:?}"));
    }
}

fn int4(v: i32) -> Value {
    Value::Binary(v.to_be_bytes().to_vec())
}

fn data_messages(ms: &[Message]) -> Vec<&Message> {
    ms.iter().filter(|m| !matches!(m, Message::Relation { .. })).collect()
}

#[test]
fn inserts_updates_deletes_and_types() {
    let c = TestCluster::start(1);
    let mut cl = node_client(&c);
    exec_each(
        &mut cl,
        "create table t(id int primary key, v text, n numeric, ts timestamptz, j jsonb, a int[], p point, big text);
         alter table t alter column big set storage external;
         select pg_create_logical_replication_slot('s', 'multimaster', false, true);",
    );
    let big: String = (0..40_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    cl.execute(
        "insert into t values (1, 'one', 1.5, '2020-01-01 00:00:00+00', '{\"a\": 1}', '{1,2}', '(1,2)', $1)",
        &[&big],
    )
    .unwrap();
    exec_each(&mut cl, "update t set v = 'uno' where id = 1; update t set id = 2 where id = 1; delete from t where id = 2");
    let ms = changes(&mut cl, "s", false);

    let rel = ms.iter().find_map(|m| match m {
        Message::Relation { namespace, name, columns, .. } if name == "t" => Some((namespace.clone(), columns.clone())),
        _ => None,
    });
    let (nsp, cols) = rel.expect("a Relation message for t");
    assert_eq!(nsp, "public");
    let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "v", "n", "ts", "j", "a", "p", "big"]);
    assert!(cols[0].key && !cols[1].key);
    assert_eq!(cols[0].type_oid, 23);

    let dml = data_messages(&ms);
    // B I C  B U C  B U C  B D C
    assert_eq!(dml.len(), 12);
    match dml[1] {
        Message::Insert { new, .. } => {
            assert_eq!(new[0], int4(1));
            assert_eq!(new[1], Value::Binary(b"one".to_vec()));
            // jsonb's binary format: version byte 1, then the text.
            assert_eq!(new[4], Value::Binary(b"\x01{\"a\": 1}".to_vec()));
            assert!(new[7] == Value::Binary(big.as_bytes().to_vec()), "new TOAST values are sent whole");
        }
        other => panic!("expected Insert, got {other:?}"),
    }
    match dml[4] {
        Message::Update { old, new, .. } => {
            assert_eq!(*old, None, "key unchanged: no old tuple");
            assert_eq!(new[1], Value::Binary(b"uno".to_vec()));
            assert!(new[7] == Value::UnchangedToast, "untouched TOAST value is marked, not detoasted");
        }
        other => panic!("expected Update, got {other:?}"),
    }
    match dml[7] {
        Message::Update { old: Some(OldTuple::Key(k)), new, .. } => {
            assert_eq!(k[0], int4(1), "key change carries the old key");
            assert_eq!(new[0], int4(2));
        }
        other => panic!("expected Update with old key, got {other:?}"),
    }
    match dml[10] {
        Message::Delete { old: Some(OldTuple::Key(k)), .. } => assert_eq!(k[0], int4(2)),
        other => panic!("expected Delete, got {other:?}"),
    }
}

#[test]
fn two_phase_truncate_messages_local_tables_and_origins() {
    let c = TestCluster::start(1);
    let mut cl = node_client(&c);
    exec_each(
        &mut cl,
        "create table t(id int primary key);
         create table l(id int primary key);
         create table nokey(x int);
         select mtm.make_table_local('l');
         select mtm.make_table_local('l');
         select pg_create_logical_replication_slot('s', 'multimaster', false, true);
         begin; insert into t values (1); prepare transaction 'mtm-g1';
         commit prepared 'mtm-g1';
         begin; insert into t values (2); prepare transaction 'mtm-g2';
         rollback prepared 'mtm-g2';
         insert into l values (1);
         insert into nokey values (1);
         delete from nokey;
         select pg_logical_emit_message(true, 'mtm', 'hello');
         truncate t;",
    );
    assert_eq!(
        cl.query_one("select count(*) from mtm.local_tables where rel_name = 'l'", &[]).unwrap().get::<_, i64>(0),
        1,
        "make_table_local is idempotent"
    );
    let ms = changes(&mut cl, "s", false);
    let dml = data_messages(&ms);
    let kinds: Vec<char> = dml
        .iter()
        .map(|m| {
            let b = m.to_bytes();
            b[0] as char
        })
        .collect();
    // g1: B I M P | K, M being the mtm_prepare message every PREPARE
    // carries. g2 was rolled back before it was decoded, so its changes
    // are skipped: B P | r. The local table's insert sends nothing. Then
    // the nokey insert and delete, the message, the truncate.
    assert_eq!(kinds.iter().collect::<String>(), "BIMPKBPrBICBDCBMCBTC");
    assert!(matches!(&dml[2], Message::Message { transactional: true, prefix, .. } if prefix == "mtm_prepare"));
    assert!(matches!(dml[3], Message::Prepare { gid, .. } if gid == "mtm-g1"));
    assert!(matches!(dml[4], Message::CommitPrepared { gid, .. } if gid == "mtm-g1"));
    assert!(matches!(dml[6], Message::Prepare { gid, .. } if gid == "mtm-g2"));
    assert!(matches!(dml[7], Message::RollbackPrepared { gid, .. } if gid == "mtm-g2"));
    // A table made without a primary key gets REPLICA IDENTITY FULL: its
    // delete carries the whole old row.
    assert!(matches!(&dml[12], Message::Delete { old: Some(OldTuple::Full(row)), .. } if row[0] == int4(1)), "{:?}", dml[12]);
    assert!(matches!(dml[15], Message::Message { prefix, content, .. } if prefix == "mtm" && content == b"hello"));
    assert!(!ms.iter().any(|m| matches!(m, Message::Relation { name, .. } if name == "l")), "local table never sent");

    // A transaction applied under a replication origin (as a receiver
    // does) is not sent in normal mode, and is sent with its origin in
    // recovery mode.
    exec_each(
        &mut cl,
        "select pg_replication_origin_create('mtm_node_2');
         select pg_create_logical_replication_slot('r', 'multimaster', false, true);
         select pg_replication_origin_session_setup('mtm_node_2');
         begin; select pg_replication_origin_xact_setup('0/AB', now()); insert into t values (42); commit;
         select pg_replication_origin_session_reset();",
    );
    let normal = changes(&mut cl, "s", false);
    assert!(data_messages(&normal).is_empty(), "{normal:#?}");
    let recovery = changes(&mut cl, "r", true);
    let d = data_messages(&recovery);
    assert!(matches!(d[1], Message::Origin { name, origin_lsn } if name == "mtm_node_2" && *origin_lsn == 0xAB), "{d:#?}");
    assert!(matches!(d[2], Message::Insert { new, .. } if new[0] == int4(42)));
}

/// The chunks pg_recvlogical wrote to `out`: each followed by a newline it
/// adds; a chunk is one message or a batch of them (a batch's frames
/// carry their lengths; a newline where the next length would start ends
/// it: no frame is 167 MB long).
fn recvlogical_chunks(mut out: &[u8]) -> Vec<Vec<Message>> {
    let mut chunks = Vec::new();
    while !out.is_empty() {
        let mut messages = Vec::new();
        if out[0] == tag::BATCH {
            out = &out[1..];
            while out[0] != b'\n' {
                let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
                messages.push(Message::decode(&out[4..4 + len]).expect("a framed message"));
                out = &out[4 + len..];
            }
        } else {
            let (m, rest) = Message::decode_prefix(out).expect("a message");
            messages.push(m);
            out = rest;
        }
        assert_eq!(out[0], b'\n', "pg_recvlogical ends each chunk with a newline");
        out = &out[1..];
        chunks.push(messages);
    }
    chunks
}

#[test]
fn a_walsender_sends_a_transaction_in_one_chunk_and_a_vote_only_to_its_coordinator() {
    let c = TestCluster::start(1);
    let mut cl = node_client(&c);
    // The slot a node 2 would stream from node 1.
    exec_each(
        &mut cl,
        "create table w(id int primary key, v text);
         select pg_create_logical_replication_slot('mtm_slot_2', 'multimaster', false, true)",
    );
    cl.batch_execute("begin; insert into w values (1, 'a'); insert into w values (2, 'b'); update w set v = 'c' where id = 1; commit")
        .unwrap();
    for coordinator in [2, 3] {
        let vote = VoteMessage { coordinator, voter: 1, gid: format!("mtm-{coordinator}-7"), refusal: None }.to_bytes();
        cl.execute("select pg_logical_emit_message(false, $1, $2::bytea)", &[&mtm_protocol::VOTE_PREFIX, &vote]).unwrap();
    }
    cl.batch_execute("insert into w values (3, 'd')").unwrap();
    let end: String = cl.query_one("select pg_current_wal_lsn()::text", &[]).unwrap().get(0);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stream");
    let status = std::process::Command::new("pg_recvlogical")
        .args(["-d", &c.node(1).admin_conninfo("postgres"), "-S", "mtm_slot_2", "--start", "--no-loop"])
        .args(["--endpos", &end, "-f", file.to_str().unwrap()])
        .status()
        .expect("pg_recvlogical must be installed (postgresql-client-15)");
    assert!(status.success(), "pg_recvlogical failed");
    let chunks = recvlogical_chunks(&std::fs::read(&file).unwrap());

    let kinds: Vec<Vec<u8>> = chunks.iter().map(|ms| ms.iter().map(|m| m.to_bytes()[0]).collect()).collect();
    assert_eq!(
        kinds,
        [
            b"BRIIUC".to_vec(), // the first transaction, whole, in one chunk
            b"M".to_vec(),      // the vote for node 2; node 3's is not sent here
            b"BRIC".to_vec(),
        ],
        "chunks: {chunks:?}"
    );
    match &chunks[1][0] {
        Message::Message { transactional: false, content, .. } => {
            assert_eq!(VoteMessage::decode(content).unwrap().coordinator, 2)
        }
        other => panic!("expected the vote, got {other:?}"),
    }
}
