"""psycopg 3 through mtm-proxy of a 3-node cluster: TLS + SCRAM, prepared
statements, a portal fetched in chunks, COPY in and out, an error inside a
transaction then ROLLBACK, pipelines with an error in a segment, LISTEN on
one node and NOTIFY from another, two sessions on different nodes updating
one row (exactly one SerializationFailure), and a cancel of pg_sleep.
Connection settings come from the PG* environment variables. Prints OK on
success; raises otherwise. The test then checks every node directly."""
import threading
import time

import psycopg

conninfo = "sslmode=require dbname=postgres"

with psycopg.connect(conninfo, prepare_threshold=0) as conn:
    assert conn.info.pgconn.ssl_in_use, "TLS in use"
    conn.execute("drop table if exists psy")
    conn.execute("create table psy(id int primary key, v text)")
    conn.commit()
    # Prepared (prepare_threshold=0: server-side prepared at first use).
    with conn.cursor() as cur:
        for i in range(50):
            cur.execute("insert into psy values (%s, %s)", (i, f"v{i}"), prepare=True)
    conn.commit()
    # COPY in and out.
    with conn.cursor() as cur:
        with cur.copy("copy psy (id, v) from stdin") as copy:
            for i in range(50, 1050):
                copy.write_row((i, f"c{i}"))
    conn.commit()
    out = []
    with conn.cursor() as cur:
        with cur.copy("copy (select id from psy order by id) to stdout") as copy:
            for row in copy.rows():
                out.append(int(row[0]))
    assert out == list(range(1050)), "COPY round trip"
    # A portal fetched in chunks (server-side cursor).
    with conn.cursor(name="chunks") as cur:
        cur.itersize = 100
        cur.execute("select id from psy order by id")
        total = sum(1 for _ in cur)
    conn.commit()
    assert total == 1050, total
    # Error inside a transaction, then rollback.
    try:
        conn.execute("insert into psy values (1, 'dup')")
        raise AssertionError("duplicate accepted")
    except psycopg.errors.UniqueViolation:
        pass
    try:
        conn.execute("select 1")
        raise AssertionError("statement ran in an aborted transaction")
    except psycopg.errors.InFailedSqlTransaction:
        pass
    conn.rollback()
    assert conn.execute("select count(*) from psy").fetchone()[0] == 1050


def node_of(conn):
    return conn.execute("select current_setting('port')").fetchone()[0]


# Pipelines: one implicit transaction per Sync, as on one PostgreSQL: the
# segment with the duplicate key commits nothing, the one before it stays.
with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute("drop table if exists psy_pipe")
    conn.execute("create table psy_pipe(id int primary key)")
    try:
        with conn.pipeline() as p:
            conn.execute("insert into psy_pipe values (1)")
            conn.execute("insert into psy_pipe values (2)")
            p.sync()
            conn.execute("insert into psy_pipe values (3)")
            conn.execute("insert into psy_pipe values (3)")
            conn.execute("insert into psy_pipe values (4)")
        raise AssertionError("duplicate accepted in a pipeline")
    except psycopg.errors.UniqueViolation:
        pass
    rows = conn.execute("select array_agg(id order by id) from psy_pipe").fetchone()[0]
    assert rows == [1, 2], rows
    # A pipeline inside an explicit transaction, committed with COMMIT.
    with conn.transaction():
        with conn.pipeline():
            for i in range(10, 20):
                conn.execute("insert into psy_pipe values (%s)", (i,))
# BEGIN, the inserts and COMMIT all in one pipeline (no Sync between).
with psycopg.connect(conninfo) as conn:
    with conn.pipeline():
        for i in range(30, 40):
            conn.execute("insert into psy_pipe values (%s)", (i,))
        conn.commit()
    n = conn.execute("select count(*) from psy_pipe").fetchone()[0]
    assert n == 22, n
# In autocommit, a pipeline that reads (and fetches the result) before it
# writes: its segment is one transaction, committed through the cluster.
with psycopg.connect(conninfo, autocommit=True) as conn:
    with conn.pipeline():
        before = conn.execute("select count(*) from psy_pipe").fetchone()[0]
        conn.execute("insert into psy_pipe values (50)")
        conn.execute("insert into psy_pipe values (51)")
    after = conn.execute("select count(*) from psy_pipe").fetchone()[0]
    assert (before, after) == (22, 24), (before, after)

# LISTEN/NOTIFY between two sessions on different nodes.
with psycopg.connect(conninfo, autocommit=True) as listener, psycopg.connect(conninfo, autocommit=True) as talker:
    assert node_of(listener) != node_of(talker), "listener and talker on different nodes"
    listener.execute("listen psy_chan")
    talker.execute("notify psy_chan, 'hi'")
    got = None
    for n in listener.notifies(timeout=10):
        got = n
        break
    assert got is not None and got.channel == "psy_chan" and got.payload == "hi", got

# Cancel of a running pg_sleep.
with psycopg.connect(conninfo) as conn:
    threading.Timer(0.5, conn.cancel).start()
    start = time.time()
    try:
        conn.execute("select pg_sleep(30)")
        raise AssertionError("pg_sleep was not cancelled")
    except psycopg.errors.QueryCanceled:
        pass
    assert time.time() - start < 20
    conn.rollback()
    assert conn.execute("select 1").fetchone()[0] == 1

# Two sessions on different nodes update one row and commit together:
# exactly one commits, the other gets 40001 (SerializationFailure).
with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute("drop table if exists psy_acc")
    conn.execute("create table psy_acc(id int primary key, v int)")
    conn.execute("insert into psy_acc values (1, 0)")
a = psycopg.connect(conninfo)
b = psycopg.connect(conninfo)
assert node_of(a) != node_of(b), "the two writers on different nodes"
a.commit()
b.commit()
for rnd in range(3):
    a.execute("update psy_acc set v = v + 1 where id = 1")
    b.execute("update psy_acc set v = v + 1 where id = 1")
    results = {}

    def commit(name, conn):
        try:
            conn.commit()
            results[name] = "ok"
        except psycopg.errors.SerializationFailure:
            results[name] = "40001"
            conn.rollback()

    threads = [threading.Thread(target=commit, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["40001", "ok"], results
a.close()
b.close()

print("OK psycopg")
