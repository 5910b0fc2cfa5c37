-- The user-facing `mtm` API: the objects of the reference system's install
-- script, with the same names, arguments and result columns. Objects whose
-- behaviour is not built yet raise feature_not_supported ("not implemented
-- yet") instead of returning made-up results.

DO $guard$
BEGIN
    IF position('multimaster' IN current_setting('shared_preload_libraries')) = 0 THEN
        RAISE EXCEPTION 'multimaster must be loaded via shared_preload_libraries'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Add multimaster to shared_preload_libraries and restart the server.';
    END IF;
END
$guard$;

-- Raises the "not implemented yet" error for `what`.
CREATE FUNCTION mtm.not_implemented(what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is not implemented yet', what
        USING ERRCODE = 'feature_not_supported';
END
$$;

---- Cluster membership (global: replicated once replication exists) ----

CREATE TABLE mtm.cluster_nodes (
    id int PRIMARY KEY NOT NULL,
    conninfo text NOT NULL,
    is_self bool NOT NULL
);

-- Per-node progress of node set-up; local to each node.
CREATE TABLE mtm.nodes_init_done (
    id int PRIMARY KEY NOT NULL,
    init_done bool
);

-- Per-node settings (e.g. where a basebackup came from); local.
CREATE TABLE mtm.config (
    key text PRIMARY KEY NOT NULL,
    value jsonb
);

-- Tables whose changes are never sent to peers.
CREATE TABLE mtm.local_tables (
    rel_schema name,
    rel_name name,
    PRIMARY KEY (rel_schema, rel_name)
) WITH (user_catalog_table = true);
-- NOTIFYs of prepared transactions, each node's own, queued when the gid
-- commits there (src/notify.rs).
CREATE TABLE mtm.notifications (
    gid text NOT NULL,
    n int NOT NULL,
    channel text NOT NULL,
    payload text NOT NULL,
    PRIMARY KEY (gid, n)
);

INSERT INTO mtm.local_tables VALUES ('mtm', 'nodes_init_done'), ('mtm', 'config'), ('mtm', 'notifications');

CREATE TYPE mtm.node_info AS (
    "enabled" bool,
    "connected" bool,
    "sender_pid" int,
    "receiver_pid" int,
    "n_workers" int,
    "receiver_mode" text,
    -- (Not in the reference:) apply failures of this peer's changes since
    -- the server started, and the last one ("SQLSTATE: message").
    "apply_errors" int8,
    "last_apply_error" text
);

CREATE TYPE mtm.node AS (
    "id" int,
    "conninfo" text,
    "is_self" bool,
    "enabled" bool,
    "connected" bool,
    "sender_pid" int,
    "receiver_pid" int,
    "n_workers" int,
    "receiver_mode" text,
    "apply_errors" int8,
    "last_apply_error" text
);

CREATE TYPE mtm.cluster_status AS (
    "my_node_id" int,
    "status" text,
    "connected" int[],
    "gen_num" int8,
    "gen_members" int[],
    "gen_members_online" int[],
    "gen_configured" int[]
);

-- Runtime state of node `id` as seen from this node: its receiver here
-- (a background worker named by application_name) and the walsender
-- streaming our changes to it (the active pid of its slot), the apply
-- workers of its pool, and the failures applying its changes.
CREATE FUNCTION mtm.node_info(id int) RETURNS mtm.node_info
LANGUAGE sql STABLE AS $$
    WITH me AS (
        SELECT coalesce((SELECT n.is_self FROM mtm.cluster_nodes n WHERE n.id = $1), false) AS is_self
    ), recv AS (
        SELECT a.pid FROM pg_stat_activity a
        WHERE a.backend_type = 'multimaster receiver' AND a.application_name = 'mtm_receiver_from_' || $1
        LIMIT 1
    ), send AS (
        SELECT s.active_pid FROM pg_replication_slots s WHERE s.slot_name = 'mtm_slot_' || $1 AND s.active
    )
    SELECT ROW(
        EXISTS (SELECT 1 FROM mtm.cluster_nodes n WHERE n.id = $1),
        (SELECT is_self FROM me) OR (EXISTS (SELECT 1 FROM recv) AND EXISTS (SELECT 1 FROM send)),
        (SELECT active_pid FROM send),
        (SELECT pid FROM recv),
        CASE WHEN EXISTS (SELECT 1 FROM recv) THEN mtm.pool_workers($1) ELSE 0 END,
        CASE WHEN EXISTS (SELECT 1 FROM recv) THEN 'normal' ELSE 'disabled' END,
        coalesce((SELECT e.errors FROM mtm.apply_errors() e WHERE e.node_id = $1), 0),
        (SELECT e.last_error FROM mtm.apply_errors() e WHERE e.node_id = $1)
    )::mtm.node_info
$$;

-- Sets up every node of a new cluster from this one: node ids 1..n in the
-- order given (this node is 1), mtm.cluster_nodes on each node, and on each
-- node a replication origin mtm_node_<j> and a two-phase logical slot
-- mtm_slot_<j> (plugin multimaster) for every peer j. Peers are reached
-- with dblink (shipped with PostgreSQL: CREATE EXTENSION dblink first).
-- Every remote step is its own committed transaction and is skipped when
-- already done, so a failed call can be repeated. This transaction writes
-- nothing locally: creating a slot waits for transactions that did.
CREATE FUNCTION mtm.init_cluster(my_conninfo text, peers_conninfo text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    conninfos text[] := array_prepend(my_conninfo, coalesce(peers_conninfo, '{}'));
    n int := array_length(array_prepend(my_conninfo, coalesce(peers_conninfo, '{}')), 1);
    k int;
    j int;
    rows text;
BEGIN
    IF to_regprocedure('dblink_exec(text,text)') IS NULL THEN
        RAISE EXCEPTION 'mtm.init_cluster needs the dblink extension to reach the peers'
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Run CREATE EXTENSION dblink first.';
    END IF;
    IF n > 16 THEN
        RAISE EXCEPTION 'a cluster has at most 16 nodes' USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF EXISTS (SELECT 1 FROM mtm.cluster_nodes) THEN
        RAISE EXCEPTION 'this node already belongs to a cluster' USING ERRCODE = 'object_in_use',
            HINT = 'SELECT * FROM mtm.cluster_nodes shows it.';
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'mtm.init_cluster must run in a transaction that has not written anything'
            USING ERRCODE = 'active_sql_transaction';
    END IF;
    FOR k IN 1..n LOOP
        -- Each node's own set-up, in a direct session (hence the opt-in):
        -- the extension, and dblink, with which mtm.check_query reaches
        -- the nodes from any of them.
        PERFORM dblink_exec(conninfos[k], 'SET multimaster.direct_writes = on; '
                                          'CREATE EXTENSION IF NOT EXISTS multimaster; CREATE EXTENSION IF NOT EXISTS dblink');
        SELECT string_agg(format('(%s, %L, %L)', i, conninfos[i], i = k), ', ') INTO rows
        FROM generate_series(1, n) AS i;
        PERFORM dblink_exec(conninfos[k], 'INSERT INTO mtm.cluster_nodes (id, conninfo, is_self) VALUES ' || rows
                                          || ' ON CONFLICT (id) DO NOTHING');
        FOR j IN 1..n LOOP
            CONTINUE WHEN j = k;
            -- The origins first: the peer's, and the one its receiver
            -- finishes prepared transactions under out of commit order (the
            -- receiver would create it, a catalog change racing with the
            -- slot's creation below). (dblink_exec refuses statements that
            -- return rows: wrap in DO.)
            PERFORM dblink_exec(conninfos[k], format(
                'DO $do$ BEGIN '
                'IF NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = %1$L) THEN '
                'PERFORM pg_replication_origin_create(%1$L); END IF; '
                'IF NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = %2$L) THEN '
                'PERFORM pg_replication_origin_create(%2$L); END IF; END $do$', 'mtm_node_' || j, 'mtm_finish_' || j));
            -- The slot in a top-level statement, not through SPI (a DO
            -- block): PostgreSQL 15's slot creation can end a transaction
            -- it decodes with an internal subtransaction that leaves
            -- CurrentResourceOwner at TopTransaction, and SPI's executor
            -- then unregisters its snapshot under the wrong owner ("snapshot
            -- reference ... is not owned by resource owner TopTransaction")
            -- whenever a catalog change commits while the slot is found.
            PERFORM * FROM dblink(conninfos[k], format(
                'SELECT pg_create_logical_replication_slot(%1$L, %2$L, false, true)::text '
                'WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %1$L)',
                'mtm_slot_' || j, 'multimaster')) AS t(created text);
        END LOOP;
        PERFORM dblink_exec(conninfos[k], format(
            'INSERT INTO mtm.nodes_init_done (id, init_done) VALUES (%s, true) ON CONFLICT (id) DO NOTHING', k));
    END LOOP;
END
$$;

CREATE FUNCTION mtm.state_create(node_ids int[]) RETURNS void
LANGUAGE sql AS $$ SELECT mtm.not_implemented('mtm.state_create') $$;

-- This node's view of the cluster. `connected`: this node and the peers
-- it exchanges changes with in both directions (mtm.nodes()); `status`
-- is 'online' while those are a majority of the configured nodes, else
-- 'isolated'. Generation switches are not built yet: the configured set
-- is generation 1, so gen_members = gen_configured = every node.
CREATE FUNCTION mtm.status() RETURNS mtm.cluster_status
LANGUAGE plpgsql STABLE AS $$
DECLARE
    me int := (SELECT n.id FROM mtm.cluster_nodes n WHERE n.is_self);
    everyone int[] := ARRAY(SELECT n.id FROM mtm.cluster_nodes n ORDER BY n.id);
    online int[];
BEGIN
    IF me IS NULL THEN
        RAISE EXCEPTION 'this node is not part of a cluster yet'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Run mtm.init_cluster(my_conninfo, peers_conninfo) on one node.';
    END IF;
    online := ARRAY(SELECT n.id FROM mtm.nodes() n WHERE n.connected ORDER BY n.id);
    RETURN ROW(
        me,
        CASE WHEN cardinality(online) * 2 > cardinality(everyone) THEN 'online' ELSE 'isolated' END,
        online,
        1::int8,
        everyone,
        online,
        everyone
    )::mtm.cluster_status;
END
$$;

-- Every configured node with its runtime state.
CREATE FUNCTION mtm.nodes() RETURNS SETOF mtm.node
LANGUAGE sql AS $$
    SELECT n.id, n.conninfo, n.is_self, (mtm.node_info(n.id)).*
    FROM mtm.cluster_nodes n
    ORDER BY n.id
$$;

-- Adding and dropping nodes needs membership changes (generations,
-- catching a new node up from a donor): not built. Editing
-- mtm.cluster_nodes alone would only make the launcher start receivers
-- that fail, or leave one running, so refuse rather than pretend.
CREATE FUNCTION mtm.add_node(connstr text) RETURNS int
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mtm.not_implemented('mtm.add_node');
    RETURN NULL;
END
$$;

CREATE FUNCTION mtm.drop_node(node_id int) RETURNS void
LANGUAGE sql AS $$ SELECT mtm.not_implemented('mtm.drop_node') $$;

CREATE FUNCTION mtm.join_node(node_id int, backup_end_lsn pg_lsn) RETURNS void
LANGUAGE sql AS $$ SELECT mtm.not_implemented('mtm.join_node') $$;

CREATE FUNCTION mtm.my_node_id() RETURNS int
LANGUAGE sql STABLE AS $$ SELECT id FROM mtm.cluster_nodes WHERE is_self $$;

---- Data placement ----

-- Keeps a table's changes on this node (the decoder skips it).
-- (ON CONFLICT is not allowed on a user catalog table, hence NOT EXISTS.)
CREATE FUNCTION mtm.make_table_local(relation regclass) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO mtm.local_tables (rel_schema, rel_name)
    SELECT n.nspname, c.relname
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = relation
      AND NOT EXISTS (SELECT 1 FROM mtm.local_tables l WHERE l.rel_schema = n.nspname AND l.rel_name = c.relname)
$$;

-- mtm.set_temp_schema(nsp) is defined by the library (ddl.rs).

-- mtm.alter_sequences() is defined by the library (sequences.rs).

---- Syncpoints ----

CREATE TABLE mtm.syncpoints (
    receiver_node_id int NOT NULL,
    origin_node_id int NOT NULL,
    origin_lsn pg_lsn NOT NULL,
    receiver_lsn pg_lsn NOT NULL
);
-- Newest-first per (receiver, origin): what the lookups below read.
CREATE UNIQUE INDEX syncpoints_idx ON mtm.syncpoints (receiver_node_id, origin_node_id, origin_lsn DESC);
ALTER TABLE mtm.syncpoints REPLICA IDENTITY USING INDEX syncpoints_idx;
COMMENT ON TABLE mtm.syncpoints IS
'receiver_node_id has applied every transaction of origin_node_id ending at or before origin_lsn, '
'all of it before its own receiver_lsn; later origin transactions land after receiver_lsn';

-- The newest syncpoint of origin_node_id at emitter_node_id not past origin_lsn:
-- stream from emitter_lsn to get everything of the origin from origin_lsn on.
CREATE FUNCTION mtm.translate_syncpoint(origin_node_id int, origin_lsn pg_lsn, emitter_node_id int,
                                        OUT origin_lsn pg_lsn, OUT emitter_lsn pg_lsn)
RETURNS record LANGUAGE sql STABLE AS $$
    SELECT sp.origin_lsn, sp.receiver_lsn
    FROM mtm.syncpoints sp
    WHERE sp.receiver_node_id = $3
      AND sp.origin_node_id = $1
      AND sp.origin_lsn <= $2
    ORDER BY sp.origin_lsn DESC
    LIMIT 1
$$;

-- For every ordered pair of distinct nodes, the newest syncpoint (0/0 if none).
CREATE VIEW mtm.latest_syncpoints AS
WITH pairs AS (
    SELECT o.id AS origin_node_id, r.id AS receiver_node_id
    FROM mtm.cluster_nodes o CROSS JOIN mtm.cluster_nodes r
    WHERE o.id <> r.id
), newest AS (
    SELECT DISTINCT ON (receiver_node_id, origin_node_id) receiver_node_id, origin_node_id, origin_lsn, receiver_lsn
    FROM mtm.syncpoints
    ORDER BY receiver_node_id, origin_node_id, origin_lsn DESC
)
SELECT p.receiver_node_id,
       p.origin_node_id,
       coalesce(n.origin_lsn, '0/0'::pg_lsn) AS origin_lsn,
       n.receiver_lsn AS fill_filter_since
FROM pairs p LEFT JOIN newest n USING (receiver_node_id, origin_node_id)
ORDER BY p.receiver_node_id, p.origin_node_id;

-- Up to where this node may confirm sender_node_id's stream as applied.
CREATE FUNCTION mtm.get_recovery_horizon(sender_node_id int) RETURNS pg_lsn
LANGUAGE sql STABLE AS $$
    SELECT min(CASE WHEN ls.origin_node_id = sender_node_id THEN ls.origin_lsn
                    ELSE coalesce((mtm.translate_syncpoint(ls.origin_node_id, ls.origin_lsn, sender_node_id)).emitter_lsn,
                                  '0/0'::pg_lsn)
               END)
    FROM mtm.latest_syncpoints ls
    WHERE ls.receiver_node_id = mtm.my_node_id()
$$;

CREATE FUNCTION mtm.get_recovery_horizons(OUT node_id int, OUT horizon pg_lsn) RETURNS SETOF record
LANGUAGE sql STABLE AS $$
    SELECT n.id, mtm.get_recovery_horizon(n.id)
    FROM mtm.cluster_nodes n
    WHERE n.id <> mtm.my_node_id()
$$;

-- The oldest origin LSN of origin_node_id some node still needs.
CREATE FUNCTION mtm.oldest_syncpoint(origin_node_id int) RETURNS pg_lsn
LANGUAGE sql STABLE AS $$
    SELECT min(ls.origin_lsn) FROM mtm.latest_syncpoints ls WHERE ls.origin_node_id = $1
$$;

-- Drops this node's own syncpoint rows nobody needs any more.
CREATE FUNCTION mtm.cleanup_old_syncpoints() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    origin int;
    keep_from pg_lsn;
    newest_own pg_lsn;
BEGIN
    FOR origin IN SELECT id FROM mtm.cluster_nodes WHERE id <> mtm.my_node_id() LOOP
        keep_from := (mtm.translate_syncpoint(origin, mtm.oldest_syncpoint(origin), mtm.my_node_id())).origin_lsn;
        SELECT ls.origin_lsn INTO newest_own FROM mtm.latest_syncpoints ls
        WHERE ls.origin_node_id = origin AND ls.receiver_node_id = mtm.my_node_id();
        DELETE FROM mtm.syncpoints sp
        WHERE sp.receiver_node_id = mtm.my_node_id()
          AND sp.origin_node_id = origin
          AND sp.origin_lsn < keep_from
          AND sp.origin_lsn < newest_own;
    END LOOP;
    DELETE FROM mtm.syncpoints sp
    WHERE sp.receiver_node_id = mtm.my_node_id()
      AND sp.origin_node_id NOT IN (SELECT id FROM mtm.cluster_nodes);
END
$$;

---- Apply pool, 2PC and consistency ----

CREATE TYPE mtm.bgwpool_result AS (nWorkers int, Active int, Pending int, Size int, Head int, Tail int, ReceiverName text);

-- One row per peer whose receiver runs: its apply pool (see mtm.pool_stats).
CREATE FUNCTION mtm.node_bgwpool_stat() RETURNS SETOF mtm.bgwpool_result
LANGUAGE sql STABLE AS $$ SELECT * FROM mtm.pool_stats() $$;

CREATE VIEW mtm.stat_bgwpool AS
SELECT nWorkers, Active, Pending, Size, Head, Tail, ReceiverName FROM mtm.node_bgwpool_stat();

-- mtm.get_logged_prepared_xact_state(gid) and mtm.xact_state(gid) are
-- defined by the library (src/decisions.rs).

-- Runs `query` on every node and says whether all results are equal
-- (rows compared as text, in any order); where they differ, a NOTICE per
-- node gives its row count and digest. The nodes' snapshots are taken
-- back to back (REPEATABLE READ, one connection per node, opened first),
-- so a transaction committing in between can make the answer false:
-- rerun to confirm. Needs dblink, which mtmctl installs.
CREATE FUNCTION mtm.check_query(query text) RETURNS bool
LANGUAGE plpgsql AS $$
DECLARE
    node record;
    names text[] := '{}';
    digests text[] := '{}';
    counts bigint[] := '{}';
    d text;
    n bigint;
BEGIN
    IF to_regprocedure('dblink_connect(text,text)') IS NULL THEN
        RAISE EXCEPTION 'mtm.check_query needs the dblink extension to reach the nodes'
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Run CREATE EXTENSION dblink.';
    END IF;
    FOR node IN SELECT id, conninfo FROM mtm.cluster_nodes ORDER BY id LOOP
        names := names || ('mtm_check_' || node.id);
        PERFORM dblink_connect(names[array_length(names, 1)], node.conninfo);
    END LOOP;
    IF array_length(names, 1) IS NULL THEN
        RAISE EXCEPTION 'this node is not part of a cluster' USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    BEGIN
        FOR i IN 1 .. array_length(names, 1) LOOP
            PERFORM dblink_exec(names[i], 'BEGIN ISOLATION LEVEL REPEATABLE READ');
            PERFORM * FROM dblink(names[i], 'SELECT 1') AS t(x int);
        END LOOP;
        FOR i IN 1 .. array_length(names, 1) LOOP
            SELECT r.d, r.n INTO d, n FROM dblink(names[i], format(
                'SELECT coalesce(md5(string_agg(q::text, %L ORDER BY q::text)), %L), count(*) FROM (%s) q',
                E'\n', 'no rows', query)) AS r(d text, n bigint);
            digests := digests || d;
            counts := counts || n;
            PERFORM dblink_exec(names[i], 'COMMIT');
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        FOR i IN 1 .. array_length(names, 1) LOOP
            PERFORM dblink_disconnect(names[i]);
        END LOOP;
        RAISE;
    END;
    FOR i IN 1 .. array_length(names, 1) LOOP
        PERFORM dblink_disconnect(names[i]);
    END LOOP;
    IF (SELECT count(DISTINCT x) FROM unnest(digests) x) = 1 THEN
        RETURN true;
    END IF;
    FOR i IN 1 .. array_length(names, 1) LOOP
        RAISE NOTICE 'node %: % rows, digest %', substr(names[i], 11), counts[i], digests[i];
    END LOOP;
    RETURN false;
END
$$;

CREATE FUNCTION mtm.hold_backends() RETURNS void
LANGUAGE sql AS $$ SELECT mtm.not_implemented('mtm.hold_backends') $$;

CREATE FUNCTION mtm.release_backends() RETURNS void
LANGUAGE sql AS $$ SELECT mtm.not_implemented('mtm.release_backends') $$;
