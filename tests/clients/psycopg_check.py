"""psycopg 3 through mtm-proxy: TLS + SCRAM, prepared statements, a portal
fetched in chunks, COPY in and out, an error inside a transaction then
ROLLBACK, LISTEN/NOTIFY, and a cancel of pg_sleep. Connection settings come
from the PG* environment variables. Prints OK on success; raises otherwise."""
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

# LISTEN/NOTIFY between two sessions.
with psycopg.connect(conninfo, autocommit=True) as listener, psycopg.connect(conninfo, autocommit=True) as talker:
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

print("OK psycopg")
