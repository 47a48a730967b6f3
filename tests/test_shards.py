"""Sharding and the query router end to end (issue 15), against real
PostgreSQL.

Three shards as PgCat sets them up: three databases, each holding a table
``PARTITION BY HASH (id)`` with only its own remainder, so a wrong route
makes the INSERT fail. Every routing method is used: SET SHARDING KEY, SET
SHARD, both comment hints, the automatic sharding key over the simple and
the extended protocol; a pgbench custom script sets a random sharding key
per transaction. Read/write splitting by the parser is checked with a
primary and a streaming replica (where rows land, ``inet_server_port()``).
"""

import os
import random

import psycopg
from twisted.internet import defer, threads
from twisted.trial import unittest

from pgcat_tw.sharding import pg_bigint_hash
from tests.pgharness import topology
from tests.support import Pooler, free_port, in_thread
from tests.test_replicas import wait_caught_up

SHARDS = 3
USER = "pgcat_md5"
_ready = []


def prepare_shards():
    """Databases sharded_0..2, each with its own remainder of data (blocking,
    once per run)."""
    if _ready:
        return
    primary = topology().primary
    for n in range(SHARDS):
        db = f"sharded_{n}"
        if primary.psql(f"select count(*) from pg_database where datname = '{db}'") == "0":
            primary.psql(f"create database {db} owner {USER}")
        primary.psql(
            "drop table if exists data; "
            "create table data (id bigint not null, v text, port int) partition by hash (id); "
            f"create table data_{n} partition of data for values with (modulus {SHARDS}, "
            f"remainder {n})", db=db, user=USER)
    _ready.append(True)


def toml(port, servers, extra=""):
    lines = ["[general]", 'host = "127.0.0.1"', f"port = {port}", 'admin_username = "admin"',
             'admin_password = "admin_pw"', "connect_timeout = 3000",
             "[pools.sharded]", 'pool_mode = "transaction"',
             "query_parser_enabled = true", "query_parser_read_write_splitting = true",
             'automatic_sharding_key = "data.id"',
             r"shard_id_regex = '/\* shard_id: (\d+) \*/'",
             r"sharding_key_regex = '/\* sharding_key: (-?\d+) \*/'",
             extra,
             "[pools.sharded.users.0]", f'username = "{USER}"', 'password = "md5_pw"',
             "pool_size = 2"]
    for n in range(SHARDS):
        srv = ", ".join(f'["127.0.0.1", {p}, "{role}"]' for p, role in servers)
        lines += [f"[pools.sharded.shards.{n}]", f'database = "sharded_{n}"', f"servers = [{srv}]"]
    return "\n".join(lines) + "\n"


def dsn(pooler):
    return (f"host=127.0.0.1 port={pooler.port} user={USER} password=md5_pw dbname=sharded "
            "sslmode=disable connect_timeout=10")


class ShardTestCase(unittest.TestCase):
    timeout = 180
    replicas = 0

    @defer.inlineCallbacks
    def setUp(self):
        self.topo = yield threads.deferToThread(topology, self.replicas)
        yield threads.deferToThread(prepare_shards)
        servers = [(self.topo.primary.port, "primary")]
        servers += [(r.port, "replica") for r in self.topo.replicas[:self.replicas]]
        self.pooler = yield Pooler(toml(free_port(), servers)).start()
        self.addCleanup(self.pooler.stop)
        yield threads.deferToThread(self.truncate)

    def truncate(self):
        for n in range(SHARDS):
            self.topo.primary.psql("truncate data", db=f"sharded_{n}", user=USER)

    def rows(self, shard):
        return threads.deferToThread(
            lambda: int(self.topo.primary.psql("select count(*) from data",
                                               db=f"sharded_{shard}", user=USER)))


class RoutingMethodTests(ShardTestCase):
    def run_client(self, fn):
        def go():
            with psycopg.connect(dsn(self.pooler), autocommit=True,
                                 prepare_threshold=None) as conn:
                return fn(conn)
        return in_thread(go)

    @defer.inlineCallbacks
    def test_set_sharding_key_and_set_shard(self):
        keys = list(range(-50, 50)) + [2**63 - 1, -2**63]

        def go(conn):
            for k in keys:
                conn.execute(f"SET SHARDING KEY TO '{k}'")
                # A write with the key only in a literal list the parser
                # does not use: the shard comes from SET SHARDING KEY.
                conn.execute("insert into data (id, v) select %s, 'k'", (k,))
            shards = []
            for n in range(SHARDS):
                conn.execute(f"SET SHARD TO '{n}'")
                shards.append(conn.execute("SHOW SHARD").fetchone()[0])
            try:
                conn.execute("SET SHARD TO '7'")
                bad = None
            except psycopg.Error as e:
                bad = e
            conn.execute("select 1")     # the session goes on
            return shards, bad

        shards, bad = yield self.run_client(go)
        self.assertEqual(shards, ["0", "1", "2"])
        self.assertIn("shard 7 is not configured", str(bad))
        for n in range(SHARDS):
            expected = sum(1 for k in keys if pg_bigint_hash(k, SHARDS) == n)
            self.assertEqual((yield self.rows(n)), expected)

    @defer.inlineCallbacks
    def test_comment_hints(self):
        def go(conn):
            for k in range(30):
                conn.execute(f"/* sharding_key: {k} */ insert into data (id, v) "
                             f"select {k}, 'hint'")
            shard_of_7 = pg_bigint_hash(7, SHARDS)
            conn.execute(f"/* shard_id: {shard_of_7} */ insert into data (id) select 7")
            try:
                conn.execute("/* shard_id: 9 */ select 1")
            except psycopg.Error as e:
                return str(e)

        err = yield self.run_client(go)
        self.assertIn("shard 9 is not configured", err)
        total = 0
        for n in range(SHARDS):
            total += (yield self.rows(n))
        self.assertEqual(total, 31)

    @defer.inlineCallbacks
    def test_automatic_key_simple_and_extended(self):
        def go(conn):
            for k in range(60):
                if k % 2:
                    # Extended protocol: the key is a Bind parameter.
                    conn.execute("insert into data (id, v) values (%s, 'auto')", (k,))
                else:
                    conn.execute(f"insert into data (id, v) values ({k}, 'auto')",
                                 prepare=False)
            found = [conn.execute("select count(*) from data where id = %s", (k,))
                     .fetchone()[0] for k in range(60)]
            try:
                conn.execute("insert into data (id) values (1), (2), (3), (4)")
                err = None
            except psycopg.Error as e:
                err = e
            return found, err

        found, err = yield self.run_client(go)
        self.assertEqual(found, [1] * 60)
        self.assertIn("must stay on one shard", str(err))

    @defer.inlineCallbacks
    def test_custom_commands_in_multi_statement_and_extended(self):
        def go(conn):
            cur = conn.cursor()
            # psycopg 3 sends a statement without parameters as Parse/Bind/
            # Execute: SET SHARD TO answered through the extended protocol.
            cur.execute("SET SHARD TO '2'")
            got = cur.execute("SHOW SHARD").fetchone()[0]
            # A simple Query starting with custom commands: they are
            # answered, the rest goes to the shard they chose (key 3 is on
            # shard 1; a wrong route would fail the insert).
            r = conn.pgconn.exec_(b"SET SHARD TO '1'; SET SERVER ROLE TO 'primary'; "
                                  b"insert into data (id) select 3")
            return got, r.error_message, r.command_status

        got, error, status = yield self.run_client(go)
        self.assertEqual(got, "2")
        self.assertEqual((error, status), (b"", b"INSERT 0 1"))
        self.assertEqual((yield self.rows(1)), 1)

    @defer.inlineCallbacks
    def test_pgbench_random_sharding_key(self):
        path = os.path.join(os.path.abspath(self.mktemp()) + ".sql")
        with open(path, "w") as f:
            f.write("\\set key random(1, 1000000)\n"
                    "SET SHARDING KEY TO ':key';\n"
                    "insert into data (id, v) select :key, 'pgbench';\n")
        env = self.pooler.env()
        env["PGPASSWORD"] = "md5_pw"
        from twisted.internet import utils
        from tests.support import PGBENCH
        out, err, code = yield utils.getProcessOutputAndValue(
            PGBENCH, ["-h", "127.0.0.1", "-p", str(self.pooler.port), "-U", USER, "-n",
                      "-c", "2", "-t", "500", "-f", path, "sharded"], env=env)
        self.assertEqual(code, 0, err)
        self.assertIn("number of failed transactions: 0 ", out.decode())
        total = 0
        for n in range(SHARDS):
            total += (yield self.rows(n))
        self.assertEqual(total, 1000)


class ReadWriteSplitTests(ShardTestCase):
    replicas = 1

    @defer.inlineCallbacks
    def test_reads_to_the_replica_writes_to_the_primary(self):
        primary, replica = self.topo.primary.port, self.topo.replicas[0].port

        def go():
            with psycopg.connect(dsn(self.pooler), autocommit=True,
                                 prepare_threshold=None) as conn:
                conn.execute("SET SHARD TO '0'")
                writes = []
                for k in range(20):
                    key = next(i for i in range(k * 100, k * 100 + 100)
                               if pg_bigint_hash(i, SHARDS) == 0)
                    writes.append(conn.execute(
                        "insert into data (id, port) values (%s, inet_server_port()) "
                        "returning port", (key,)).fetchone()[0])
                conn.execute("select pg_sleep(0.2)")
                reads = [conn.execute("select inet_server_port()").fetchone()[0]
                         for _ in range(20)]
                # Routed by what the statement does, not how it looks.
                nextval = conn.execute("select inet_server_port(), "
                                       "txid_current()").fetchone()[0]
                locked = conn.execute("select inet_server_port() from data limit 1 "
                                      "for update").fetchone()[0]
                cte = conn.execute("with w as (insert into data (id) values (2) "
                                   "returning id) select inet_server_port() from w"
                                   ).fetchone()[0]    # (key 2 is on shard 0)
                with conn.transaction():
                    in_tx = conn.execute("select inet_server_port()").fetchone()[0]
                conn.execute("SET SERVER ROLE TO 'replica'")
                forced = conn.execute("select inet_server_port()").fetchone()[0]
                return writes, reads, nextval, locked, cte, in_tx, forced

        writes, reads, nextval, locked, cte, in_tx, forced = yield in_thread(go)
        self.assertEqual(set(writes), {primary})
        self.assertEqual(set(reads), {replica})
        self.assertEqual((nextval, locked, cte), (primary, primary, primary))
        self.assertEqual(in_tx, primary)     # BEGIN binds the transaction to the primary
        self.assertEqual(forced, replica)
        yield threads.deferToThread(wait_caught_up, self.topo)
        self.assertEqual((yield self.rows(0)), 21)

    @defer.inlineCallbacks
    def test_orm_flow(self):
        """Migrations per shard, 200 inserts routed by SET SHARDING KEY,
        reads with role replica and auto."""
        def go():
            with psycopg.connect(dsn(self.pooler), autocommit=True,
                                 prepare_threshold=None) as conn:
                for n in range(SHARDS):
                    conn.execute(f"SET SHARD TO '{n}'")
                    conn.execute("SET SERVER ROLE TO 'primary'")
                    conn.execute("create table if not exists orm_meta (shard int)")
                    conn.execute("delete from orm_meta")
                    conn.execute("insert into orm_meta values (%s)", (n,))
                conn.execute("SET SERVER ROLE TO 'auto'")
                keys = random.Random(7).sample(range(10**9), 200)
                for k in keys:
                    conn.execute(f"SET SHARDING KEY TO '{k}'")
                    conn.execute("insert into data (id, v) values (%s, 'orm')", (k,))
                wait_caught_up(self.topo)    # the reads below go to the replica
                seen = {}
                for role in ("replica", "auto"):
                    conn.execute(f"SET SERVER ROLE TO '{role}'")
                    for n in range(SHARDS):
                        conn.execute(f"SET SHARD TO '{n}'")
                        seen[(role, n)] = (
                            conn.execute("select shard from orm_meta").fetchone()[0],
                            conn.execute("select count(*) from data").fetchone()[0])
                return keys, seen

        keys, seen = yield in_thread(go)
        for n in range(SHARDS):
            expected = sum(1 for k in keys if pg_bigint_hash(k, SHARDS) == n)
            for role in ("replica", "auto"):
                self.assertEqual(seen[(role, n)], (n, expected))
