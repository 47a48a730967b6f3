"""Statements and the role the router must give them, shared by
tests/test_router.py (the classification) and tests/test_router_pg.py (the
same statements on a real hot standby).

Each case: (sql, role, flags). ``R`` = replica-eligible, ``P`` = primary.
Flags: ``n`` the statement cannot run on its own on the standby (it needs
parameters, an open transaction or objects the schema below does not make);
``w`` a write the standby refuses (read-only transaction, or recovery:
"cannot assign OIDs during recovery"). PgCat issues: #884, #887 and #865 (sqlparser failed on valid
SQL and the previous role stayed), #829 (CTE writes), #410 (FOR NO KEY
UPDATE and other locking clauses), #489 (nextval and other functions with
side effects).
"""

R, P = "replica", "primary"

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS router_t;
CREATE SCHEMA IF NOT EXISTS my_schema;
SET search_path = router_t;
CREATE TABLE IF NOT EXISTS t (id bigint PRIMARY KEY, a int, b int, x int, y int,
    name text, tags text[], v jsonb, created_at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS u (id bigint, aid bigint, x int, y int, name text);
CREATE TABLE IF NOT EXISTS users (id bigint PRIMARY KEY, name text);
CREATE TABLE IF NOT EXISTS orders (id bigint, user_id bigint, total numeric,
    status text, created_at timestamptz);
CREATE TABLE IF NOT EXISTS queue (id bigint, payload text);
CREATE TABLE IF NOT EXISTS done (id bigint, payload text);
INSERT INTO t (id, a, x) VALUES (1, 1, 1), (2, 2, 2) ON CONFLICT DO NOTHING;
CREATE SEQUENCE IF NOT EXISTS s;
CREATE OR REPLACE FUNCTION f(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
CREATE OR REPLACE FUNCTION my_schema.f(int) RETURNS int LANGUAGE sql AS 'SELECT $1';
CREATE OR REPLACE FUNCTION user_srf() RETURNS SETOF int LANGUAGE sql AS 'SELECT 1';
"""

CASES = [
    # -- reads
    ("SELECT 1", R, ""),
    ("select 1;", R, ""),
    ("/* a comment */ SELECT 1 -- and another", R, ""),
    ("VALUES (1, 'a'), (2, 'b')", R, ""),
    ("TABLE t", R, ""),
    ("SHOW search_path", R, ""),
    ("SHOW ALL", R, ""),
    ("SELECT count(*) FROM t WHERE a > 3", R, ""),
    ("SELECT id, name FROM t WHERE id = 1 ORDER BY name DESC LIMIT 10 OFFSET 5", R, ""),
    ("SELECT now(), lower('A'), coalesce(NULL, 1), greatest(1, 2), nullif(1, 1)", R, ""),
    ("SELECT current_user, session_user, current_timestamp, current_date", R, ""),
    ("SELECT EXTRACT(year FROM now()), substring('abcd' from 2 for 2), "
     "trim(both ' ' from ' x '), position('b' in 'abc')", R, ""),
    ("SELECT now() AT TIME ZONE 'UTC', pg_catalog.lower('X')", R, ""),
    ("SELECT jsonb_build_object('a', 1) -> 'a', to_char(now(), 'YYYY')", R, ""),
    ("SELECT u.id, u.name, o.total FROM users u JOIN orders o ON o.user_id = u.id "
     "WHERE u.id = 1 AND o.status = 'open' ORDER BY o.created_at DESC LIMIT 20", R, ""),
    ("SELECT x FROM t UNION SELECT x FROM u EXCEPT SELECT 1", R, ""),
    ("SELECT * FROM generate_series(1, 3) g, unnest(ARRAY[1, 2]) n", R, ""),
    ("WITH r AS (SELECT 1 AS n) SELECT * FROM r", R, ""),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
     "SELECT sum(n) FROM r", R, ""),
    # #865: operators the old sqlparser did not know
    ("SELECT * FROM t WHERE tags && ARRAY['a'] AND v @> '{\"k\": 1}'", R, ""),
    ("SELECT '{1,2}'::int[] && '{2}'::int[], 'ab' ~~* 'A%', 5 # 3", R, ""),
    ("SELECT x::regclass FROM (VALUES ('t'::text)) v(x)", R, ""),
    ("SELECT count(*) FILTER (WHERE x > 1) OVER (PARTITION BY y) FROM t", R, ""),
    ("SELECT exists(SELECT 1 FROM t), (SELECT max(id) FROM u)", R, ""),
    ("SELECT CASE WHEN a > 1 THEN 'big' ELSE 'small' END FROM t", R, ""),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", R, ""),
    ("SELECT pg_sleep(0), random(), gen_random_uuid()", R, ""),
    ("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), version()", R, ""),
    ("SELECT $1::int", R, "n"),
    ("SELECT 1; SELECT 2", R, ""),
    ("EXPLAIN SELECT * FROM t", R, ""),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", R, ""),
    ("COPY t TO STDOUT", R, ""),
    ("COPY (SELECT id FROM t) TO STDOUT WITH (FORMAT csv)", R, ""),
    ("DECLARE c CURSOR FOR SELECT 1", R, "n"),
    # transactions
    ("BEGIN READ ONLY", R, ""),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", R, ""),
    ("BEGIN READ ONLY; SELECT 1; COMMIT", R, ""),
    ("BEGIN; SET TRANSACTION READ ONLY; SELECT count(*) FROM t; COMMIT", R, ""),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; BEGIN; SELECT 1; COMMIT", R, ""),
    ("SET TRANSACTION READ ONLY", R, "n"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", R, ""),
    ("SET default_transaction_read_only = on", R, ""),
    ("COMMIT", R, ""),
    ("ROLLBACK", R, ""),
    ("SAVEPOINT a", R, "n"),
    ("RELEASE SAVEPOINT a", R, "n"),
    ("ROLLBACK TO SAVEPOINT a", R, "n"),

    # -- writes and DDL
    ("INSERT INTO t (id, a) VALUES (1, 2)", P, "w"),
    ("INSERT INTO t (id) VALUES (1) RETURNING *", P, "w"),
    ("INSERT INTO t (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET a = excluded.a", P, "w"),
    ("UPDATE t SET a = a + 1 WHERE id = 1", P, "w"),
    ("DELETE FROM t WHERE id = 1", P, "w"),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", P, "w"),
    ("TRUNCATE t", P, "w"),
    ("CREATE TABLE t2 (id int)", P, "w"),
    ("CREATE TABLE t3 AS SELECT 1", P, "w"),
    ("ALTER TABLE t ADD COLUMN z int", P, "w"),
    ("DROP TABLE IF EXISTS t4", P, "w"),
    ("CREATE INDEX CONCURRENTLY t_a ON t (a)", P, "n"),
    ("VACUUM t", P, ""),
    ("ANALYZE t", P, ""),
    ("GRANT SELECT ON t TO PUBLIC", P, "w"),
    ("REFRESH MATERIALIZED VIEW mv", P, "n"),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", P, "n"),
    ("CHECKPOINT", P, ""),
    ("CALL p()", P, "n"),
    ("DO $$BEGIN PERFORM 1; END$$", P, ""),
    ("LISTEN chan", P, ""),
    ("NOTIFY chan, 'x'", P, "w"),
    ("PREPARE TRANSACTION 'x'", P, "n"),
    ("COMMIT PREPARED 'x'", P, "n"),
    ("PREPARE q AS SELECT 1", P, ""),
    ("EXECUTE q", P, "n"),
    ("FETCH 10 FROM c", P, "n"),
    ("SET search_path = router_t", P, ""),
    ("RESET ALL", P, ""),
    ("DISCARD ALL", P, ""),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", P, ""),
    ("SET TRANSACTION READ WRITE", P, "n"),
    ("SELECT 1 INTO t5", P, "w"),
    ("COPY t FROM STDIN", P, "n"),
    ("COPY t TO '/tmp/router_t.copy'", P, "n"),
    ("COPY (SELECT 1) TO PROGRAM 'cat'", P, "n"),
    ("EXPLAIN ANALYZE INSERT INTO t (id) VALUES (2)", P, "w"),
    ("EXPLAIN DELETE FROM t", P, ""),
    # transactions that may write
    ("BEGIN", P, ""),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", P, ""),
    ("START TRANSACTION READ WRITE", P, "w"),
    ("BEGIN READ ONLY; COMMIT; BEGIN", P, ""),
    ("BEGIN; SELECT 1; COMMIT", P, ""),
    # multi-statement strings: one write is enough
    ("SELECT 1; INSERT INTO t (id) VALUES (3)", P, "w"),
    ("SELECT * FROM t; UPDATE t SET a = 1", P, "w"),
    # #829: CTEs that write, at any depth
    ("WITH x AS (UPDATE t SET a = 1 RETURNING id) SELECT * FROM x", P, "w"),
    ("WITH a AS (SELECT 1), b AS (INSERT INTO t (id) VALUES (9) RETURNING id) "
     "SELECT * FROM a, b", P, "w"),
    ("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d) s", P, "n"),
    ("WITH moved AS (DELETE FROM queue WHERE id = 1 RETURNING *) "
     "INSERT INTO done SELECT * FROM moved", P, "w"),
    # #410: locking clauses
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE", P, "w"),
    ("SELECT * FROM t WHERE id = 1 FOR NO KEY UPDATE", P, "w"),
    ("SELECT * FROM t FOR SHARE", P, "w"),
    ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", P, "w"),
    ("SELECT * FROM t, u FOR UPDATE OF t NOWAIT", P, "w"),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", P, "w"),
    ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", P, "w"),
    # #489: functions with side effects, and unknown functions
    ("SELECT nextval('s')", P, "w"),
    ("SELECT setval('s', 5)", P, "w"),
    ("SELECT currval('s')", P, "n"),
    ("SELECT lastval()", P, "n"),
    ("SELECT pg_catalog.nextval('s')", P, "w"),
    ('SELECT "nextval"(\'s\')', P, "w"),
    ("VALUES (nextval('s'))", P, "w"),
    ("SELECT (SELECT nextval('s'))", P, "w"),
    ("SELECT lower(x::text), upper(nextval('s')::text) FROM t", P, "w"),
    ("SELECT * FROM t WHERE id = nextval('s')", P, "w"),
    ("SELECT pg_advisory_lock(1)", P, ""),
    ("SELECT pg_try_advisory_xact_lock(1)", P, ""),
    ("SELECT txid_current()", P, ""),
    ("SELECT set_config('a.b', 'c', false)", P, ""),
    ("SELECT pg_notify('chan', 'x')", P, "w"),
    ("SELECT pg_terminate_backend(0)", P, ""),
    ("SELECT lo_create(0)", P, "w"),
    ("SELECT f(1)", P, ""),
    ("SELECT my_schema.f(1)", P, ""),
    ("SELECT * FROM user_srf()", P, ""),
    ("SELECT public.lower('x')", P, "n"),
    # #884, #887: what does not parse goes to the primary, never "as before"
    ("SELEC 1", P, "n"),
    ("SELECT * FROM", P, "n"),
    ("UPDATE t SET a = WHERE id = 1", P, "n"),
    # newer syntax than the PostgreSQL 15 grammar: not parsed, primary
    ("SELECT JSON_OBJECT('a': 1)", P, "n"),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE RETURNING t.id", P, "n"),
    # nothing at all
    ("", P, "n"),
    (";", P, "n"),
    ("-- just a comment", P, "n"),
]
