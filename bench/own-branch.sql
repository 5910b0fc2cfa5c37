-- TPC-B where client i updates branch (i mod scale) + 1 and its tellers:
-- with no more clients than branches, sessions on different nodes never
-- update the same branch or teller row (accounts are random of 100000 *
-- scale). Run with -s <scale> (custom scripts do not read it from the
-- tables): pgbench -n -M prepared -c 8 -j 2 -T 15 -s 10 --max-tries=1 -f bench/own-branch.sql
\set aid random(1, 100000 * :scale)
\set bid (:client_id % :scale) + 1
\set tid 10 * (:bid - 1) + random(1, 10)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
