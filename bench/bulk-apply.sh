#!/bin/bash
# Per-row apply cost: one 300 000-row transaction (10 columns) written on
# node 1 of a local 3-node cluster (directly, with the administrator's
# opt-in), three times; prints how long node 2 takes after the commit to
# have every row (decoding, sending and applying). Run from the
# repository root after a release build; uses ports 25532-25534, 26532.
# Results and how they were taken: bench/RESULTS.md.
set -e
D=/tmp/mtmB
${MTMCTL:-./target/release/mtmctl} down --data-dir $D >/dev/null 2>&1 || true
rm -rf $D
${MTMCTL:-./target/release/mtmctl} up --data-dir $D --base-port 25532 --proxy-port 26532 --metrics-port 26590 >/dev/null 2>&1
P="psql -X -h 127.0.0.1 -U postgres -d postgres -qtA"
$P -p 26532 -c "create table wide(id int primary key, a int, b int, c text, d text, e timestamptz, f numeric, g int, h int, i text)"
sleep 2
for run in 1 2 3; do
  $P -p 25532 -c "set multimaster.direct_writes = on; truncate wide" >/dev/null
  sleep 2
  start=$(date +%s.%N)
  PGOPTIONS="-c multimaster.direct_writes=on" $P -p 25532 -c "insert into wide select g, g, g*2, md5(g::text), 'x'||g, now(), g*1.5, g%7, g%11, repeat('y', 20) from generate_series(1, 300000) g"
  committed=$(date +%s.%N)
  while [ "$($P -p 25533 -c 'select count(*) from wide')" != "300000" ]; do sleep 0.05; done
  done_at=$(date +%s.%N)
  echo "run $run: insert on node1 $(echo "$committed - $start" | bc) s, on node2 $(echo "$done_at - $committed" | bc) s after commit"
done
${MTMCTL:-./target/release/mtmctl} down --data-dir $D >/dev/null 2>&1
