"""asyncpg through mtm-proxy of a 3-node cluster: TLS + SCRAM, prepared
statements, executemany, a portal fetched in chunks, COPY in and out, an
error inside a transaction then ROLLBACK, LISTEN on one node and NOTIFY
from another, two sessions on different nodes updating one row (exactly
one SerializationError), and a cancel of pg_sleep. Settings from PG*; the
test then checks every node directly."""
import asyncio
import os

import asyncpg


async def connect():
    return await asyncpg.connect(
        host=os.environ["PGHOST"], port=int(os.environ["PGPORT"]), user=os.environ["PGUSER"],
        password=os.environ["PGPASSWORD"], database="postgres", ssl="require")


async def node_of(conn):
    return await conn.fetchval("select current_setting('port')")


async def main():
    conn = await connect()
    await conn.execute("drop table if exists apg; create table apg(id int primary key, v text)")
    stmt = await conn.prepare("insert into apg values ($1, $2)")
    for i in range(50):
        await stmt.fetch(i, f"v{i}")
    await conn.copy_records_to_table("apg", records=[(i, f"c{i}") for i in range(50, 1050)], columns=["id", "v"])
    n = 0
    async with conn.transaction():
        async for _ in conn.cursor("select id from apg order by id", prefetch=100):
            n += 1
    assert n == 1050, n
    import io
    buf = io.BytesIO()
    await conn.copy_from_query("select id from apg order by id", output=buf)
    assert buf.getvalue().decode().split() == [str(i) for i in range(1050)]
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute("insert into apg values (1, 'dup')")
        raise AssertionError("duplicate accepted")
    except asyncpg.UniqueViolationError:
        pass
    try:
        await conn.execute("select 1")
        raise AssertionError("statement ran in an aborted transaction")
    except asyncpg.InFailedSQLTransactionError:
        pass
    await tr.rollback()
    assert await conn.fetchval("select count(*) from apg") == 1050

    # executemany: one Sync for all its rows, so one transaction; a
    # duplicate among them leaves none of them.
    await conn.executemany("insert into apg values ($1, $2)", [(i, "m") for i in range(2000, 2100)])
    try:
        await conn.executemany("insert into apg values ($1, $2)", [(3000, "m"), (3001, "m"), (3000, "m")])
        raise AssertionError("duplicate accepted by executemany")
    except asyncpg.UniqueViolationError:
        pass
    assert await conn.fetchval("select count(*) from apg") == 1150
    assert await conn.fetchval("select count(*) from apg where id >= 3000") == 0

    got = asyncio.get_running_loop().create_future()
    listener = await connect()
    assert await node_of(listener) != await node_of(conn), "listener and talker on different nodes"
    await listener.add_listener("apg_chan", lambda c, pid, ch, payload: got.done() or got.set_result(payload))
    await conn.execute("notify apg_chan, 'hi'")
    assert await asyncio.wait_for(got, 10) == "hi"
    await listener.close()

    # wait_for cancels the query with a CancelRequest on timeout.
    try:
        await asyncio.wait_for(conn.execute("select pg_sleep(30)"), 0.5)
        raise AssertionError("pg_sleep was not cancelled")
    except asyncio.TimeoutError:
        pass
    assert await conn.fetchval("select 1") == 1
    await conn.close()

    # Two sessions on different nodes update one row and commit together:
    # exactly one commits, the other gets 40001 (SerializationError).
    a, b = await connect(), await connect()
    assert await node_of(a) != await node_of(b), "the two writers on different nodes"
    await a.execute("drop table if exists apg_acc; create table apg_acc(id int primary key, v int)")
    await a.execute("insert into apg_acc values (1, 0)")
    for _ in range(3):
        ta, tb = a.transaction(), b.transaction()
        for t, c in ((ta, a), (tb, b)):
            await t.start()
            await c.execute("update apg_acc set v = v + 1 where id = 1")
        results = await asyncio.gather(ta.commit(), tb.commit(), return_exceptions=True)
        errors = [r for r in results if r is not None]
        assert len(errors) == 1 and isinstance(errors[0], asyncpg.SerializationError), results
    await a.close()
    await b.close()
    print("OK asyncpg")


asyncio.run(main())
