"""asyncpg through mtm-proxy: TLS + SCRAM, prepared statements, a portal
fetched in chunks, COPY in and out, an error inside a transaction then
ROLLBACK, LISTEN/NOTIFY, and a cancel of pg_sleep. Settings from PG*."""
import asyncio
import os

import asyncpg


async def connect():
    return await asyncpg.connect(
        host=os.environ["PGHOST"], port=int(os.environ["PGPORT"]), user=os.environ["PGUSER"],
        password=os.environ["PGPASSWORD"], database="postgres", ssl="require")


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

    got = asyncio.get_running_loop().create_future()
    listener = await connect()
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
    print("OK asyncpg")


asyncio.run(main())
