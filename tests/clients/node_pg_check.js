// node-postgres through mtm-proxy of a 3-node cluster: TLS + SCRAM,
// prepared statements, a portal fetched in chunks (pg-cursor), COPY in and
// out (pg-copy-streams), an error inside a transaction then ROLLBACK,
// LISTEN on one node and NOTIFY from another, two sessions on different
// nodes updating one row (exactly one 40001), a pool's transactions, and a
// cancel of pg_sleep (a CancelRequest with the key the proxy handed out).
// Settings from PG*; prints OK on success, exits non-zero otherwise; the
// test then checks every node directly.
const { Client, Pool } = require('pg');
const Cursor = require('pg-cursor');
const { from: copyFrom, to: copyTo } = require('pg-copy-streams');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');
const net = require('net');
const assert = require('assert');

const config = () => ({ database: 'postgres', ssl: { rejectUnauthorized: false } });

const nodeOf = async (c) => (await c.query("select current_setting('port') as p")).rows[0].p;

async function main() {
  const c = new Client(config());
  await c.connect();
  await c.query('drop table if exists npg; create table npg(id int primary key, v text)');
  for (let i = 0; i < 50; i++) {
    await c.query({ name: 'ins', text: 'insert into npg values ($1, $2)', values: [i, 'v' + i] });
  }
  const rows = [];
  for (let i = 50; i < 1050; i++) rows.push(`${i}\tc${i}\n`);
  await pipeline(Readable.from(rows), c.query(copyFrom('copy npg from stdin')));
  let out = '';
  await pipeline(c.query(copyTo('copy (select id from npg order by id) to stdout')),
    new Writable({ write(chunk, _e, cb) { out += chunk; cb(); } }));
  assert.strictEqual(out.trim().split('\n').length, 1050);

  await c.query('begin');
  const cursor = c.query(new Cursor('select id from npg order by id'));
  let n = 0;
  for (;;) {
    const chunk = await cursor.read(100);
    if (chunk.length === 0) break;
    n += chunk.length;
  }
  await cursor.close();
  await c.query('commit');
  assert.strictEqual(n, 1050);

  await c.query('begin');
  await assert.rejects(c.query('insert into npg values (1, \'dup\')'), (e) => e.code === '23505');
  await assert.rejects(c.query('select 1'), (e) => e.code === '25P02');
  await c.query('rollback');
  assert.strictEqual((await c.query('select count(*)::int as n from npg')).rows[0].n, 1050);

  const listener = new Client(config());
  await listener.connect();
  assert.notStrictEqual(await nodeOf(listener), await nodeOf(c), 'listener and talker on different nodes');
  await listener.query('listen npg_chan');
  const note = new Promise((resolve) => listener.on('notification', resolve));
  await c.query("notify npg_chan, 'hi'");
  const got = await Promise.race([note, new Promise((_, rej) => setTimeout(() => rej(new Error('no notification')), 10000).unref())]);
  assert.strictEqual(got.payload, 'hi');
  await listener.end();

  // Cancel: node-postgres exposes the key from BackendKeyData.
  const sleeping = c.query('select pg_sleep(30)');
  await new Promise((r) => setTimeout(r, 500));
  await new Promise((resolve, reject) => {
    const s = net.connect(Number(process.env.PGPORT), process.env.PGHOST, () => {
      const buf = Buffer.alloc(16);
      buf.writeInt32BE(16, 0);
      buf.writeInt32BE(80877102, 4);
      buf.writeInt32BE(c.processID, 8);
      buf.writeInt32BE(c.secretKey, 12);
      s.end(buf, resolve);
    });
    s.on('error', reject);
  });
  await assert.rejects(sleeping, (e) => e.code === '57014');
  assert.strictEqual((await c.query('select 1 as x')).rows[0].x, 1);
  await c.end();

  // Two sessions on different nodes update one row and commit together:
  // exactly one commits, the other gets 40001.
  const a = new Client(config());
  const b = new Client(config());
  await a.connect();
  await b.connect();
  assert.notStrictEqual(await nodeOf(a), await nodeOf(b), 'the two writers on different nodes');
  await a.query('drop table if exists npg_acc; create table npg_acc(id int primary key, v int)');
  await a.query('insert into npg_acc values (1, 0)');
  for (let round = 0; round < 3; round++) {
    for (const x of [a, b]) {
      await x.query('begin');
      await x.query('update npg_acc set v = v + 1 where id = 1');
    }
    const results = await Promise.allSettled([a.query('commit'), b.query('commit')]);
    const refused = results.filter((r) => r.status === 'rejected');
    assert.strictEqual(refused.length, 1, JSON.stringify(results));
    assert.strictEqual(refused[0].reason.code, '40001', String(refused[0].reason));
  }
  await a.end();
  await b.end();

  // A pool of four sessions (spread over the nodes), each running
  // transactions of ten inserts into rows of its own.
  const pool = new Pool({ ...config(), max: 4 });
  await pool.query('drop table if exists npg_pool; create table npg_pool(id int primary key, w int)');
  await Promise.all([0, 1, 2, 3].map(async (w) => {
    const pc = await pool.connect();
    try {
      for (let t = 0; t < 5; t++) {
        await pc.query('begin');
        for (let i = 0; i < 10; i++) {
          await pc.query('insert into npg_pool values ($1, $2)', [w * 1000 + t * 10 + i, w]);
        }
        await pc.query('commit');
      }
    } finally {
      pc.release();
    }
  }));
  assert.strictEqual((await pool.query('select count(*)::int as n from npg_pool')).rows[0].n, 200);
  await pool.end();
  console.log('OK node-postgres');
}

main().catch((e) => { console.error(e); process.exit(1); });
