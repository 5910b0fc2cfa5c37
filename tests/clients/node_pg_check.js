// node-postgres through mtm-proxy: TLS + SCRAM, prepared statements, a
// portal fetched in chunks (pg-cursor), COPY in and out (pg-copy-streams),
// an error inside a transaction then ROLLBACK, LISTEN/NOTIFY, and a cancel
// of pg_sleep (a CancelRequest with the key the proxy handed out).
// Settings from PG*; prints OK on success, exits non-zero otherwise.
const { Client } = require('pg');
const Cursor = require('pg-cursor');
const { from: copyFrom, to: copyTo } = require('pg-copy-streams');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');
const net = require('net');
const assert = require('assert');

const config = () => ({ database: 'postgres', ssl: { rejectUnauthorized: false } });

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
  await listener.query('listen npg_chan');
  const note = new Promise((resolve) => listener.on('notification', resolve));
  await c.query("notify npg_chan, 'hi'");
  const got = await Promise.race([note, new Promise((_, rej) => setTimeout(() => rej(new Error('no notification')), 10000))]);
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
  console.log('OK node-postgres');
}

main().catch((e) => { console.error(e); process.exit(1); });
