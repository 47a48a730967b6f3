"""auth_query: secrets fetched from PostgreSQL at login, md5 and SCRAM.

Roles made for this module on the run's primary (and pg_hba lines for them,
added before the harness's final reject): ``aq_md5`` (md5 secret),
``aq_scram`` (SCRAM secret), ``aq_auth`` (the auth_query user, which may
only call a SECURITY DEFINER lookup function, as PgBouncer's docs advise).
None of them is listed in the pooler's configuration.
"""

import asyncio
import time

import asyncpg
import psycopg
from twisted.internet import defer, threads
from twisted.logger import globalLogPublisher

from pgcat_tw.auth import scram
from pgcat_tw.auth_query import prepare_query, secret_from_rows
from tests.pgharness import topology
from tests.support import PoolerTestCase, in_thread
from twisted.trial.unittest import SynchronousTestCase

ROLES = {
    "aq_md5": ("md5", "aq_md5_pw"),
    "aq_scram": ("scram-sha-256", "aq_scram_pw"),
    "aq_auth": ("scram-sha-256", "aq_auth_pw"),
}
LOOKUP = "SELECT usename, passwd FROM public.pgcat_lookup($1)"
_prepared = []


def _prepare_roles():
    """Idempotent: roles, the lookup function and pg_hba lines."""
    if _prepared:
        return
    primary = topology().primary
    sql = []
    for role, (enc, pw) in ROLES.items():
        sql.append(f"SET password_encryption = '{enc}';")
        sql.append(f"DROP ROLE IF EXISTS {role};")
        sql.append(f"CREATE ROLE {role} LOGIN PASSWORD '{pw}';")
    primary.psql_script("\n".join(sql) + "\n")
    primary.psql_script("""
        CREATE OR REPLACE FUNCTION public.pgcat_lookup(uname text)
        RETURNS TABLE (usename name, passwd text)
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
        AS $$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = uname $$;
        REVOKE ALL ON FUNCTION public.pgcat_lookup(text) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION public.pgcat_lookup(text) TO aq_auth;
        GRANT ALL ON SCHEMA public TO aq_md5, aq_scram;
    """, db="pgcat_test")
    hba = f"{primary.datadir}/pg_hba.conf"
    with open(hba) as f:
        lines = f.read().splitlines()
    ours = [f"host all {role} 127.0.0.1/32 {method}" for role, (method, _) in ROLES.items()]
    lines = [line for line in lines if line not in ours]
    at = lines.index("host all all 127.0.0.1/32 reject")
    lines[at:at] = ours
    with open(hba, "w") as f:
        f.write("\n".join(lines) + "\n")
    primary.psql("select pg_reload_conf()")
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(primary.dsn(user="aq_md5", db="pgcat_test",
                                        password=ROLES["aq_md5"][1])).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    _prepared.append(True)


def set_password(role, password):
    enc = ROLES[role][0]
    topology().primary.psql_script(
        f"SET password_encryption = '{enc}';\nALTER ROLE {role} PASSWORD '{password}';\n")


def login(pooler, user, password, **kw):
    """(current_user, error text): one through the pooler."""
    dsn = pooler.dsn(**kw)
    try:
        # As keywords: a user name may hold quotes and spaces.
        with psycopg.connect(dsn, user=user, password=password) as conn:
            return conn.execute("select current_user").fetchone()[0], None
    except psycopg.OperationalError as e:
        return None, str(e)


class QueryTests(SynchronousTestCase):
    def test_pgcat_quoted_parameter(self):
        self.assertEqual(prepare_query("SELECT usename, passwd FROM pg_shadow WHERE usename='$1'"),
                         "SELECT usename, passwd FROM pg_shadow WHERE usename=$1")
        self.assertEqual(prepare_query(LOOKUP), LOOKUP)

    def test_rows(self):
        self.assertIsNone(secret_from_rows([]))
        self.assertIsNone(secret_from_rows([("bob", None)]))
        self.assertIsNone(secret_from_rows([("bob", "")]))
        self.assertEqual(secret_from_rows([("bob", "md5x")]), "md5x")
        self.assertEqual(secret_from_rows([("md5x",)]), "md5x")
        self.assertRaises(ValueError, secret_from_rows, [("a", "x"), ("b", "y")])


class AuthQueryTests(PoolerTestCase):
    # The pool lists only pgcat_trust: aq_* users are found by auth_query.
    users = {"pgcat_trust": 'auth_type = "trust"'}
    pool_extra = (f'auth_query = "{LOOKUP}"\nauth_query_user = "aq_auth"\n'
                  f'auth_query_password = "{ROLES["aq_auth"][1]}"\nauth_query_pool_size = 3')

    @defer.inlineCallbacks
    def setUp(self):
        yield threads.deferToThread(_prepare_roles)
        # Passwords as the module started (a rotation test may change them).
        for role in ("aq_md5", "aq_scram"):
            yield in_thread(set_password, role, ROLES[role][1])
        yield PoolerTestCase.setUp(self)

    @defer.inlineCallbacks
    def test_md5_user(self):
        who, err = yield in_thread(login, self.pooler, "aq_md5", "aq_md5_pw", require_auth="md5")
        self.assertEqual(who, "aq_md5", err)
        up = self.pooler.cluster.user_pools[("pgcat_test", "aq_md5")]
        self.assertTrue(up.dynamic)
        self.assertEqual(up.settings.pool_size, 3)

    @defer.inlineCallbacks
    def test_admin_show_servers_lists_auth_query_connections(self):
        from tests.test_admin import admin

        who, err = yield in_thread(login, self.pooler, "aq_md5", "aq_md5_pw")
        self.assertEqual(who, "aq_md5", err)
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW SERVERS")
        kinds = {(r["type"], r["user"]) for r in rows}
        self.assertIn(("auth_query", "aq_auth"), kinds)
        self.assertIn(("pool", "aq_md5"), kinds)
        cols, clients = yield in_thread(admin, self.pooler.port, "SHOW CLIENTS")
        self.assertEqual(clients, [])

    @defer.inlineCallbacks
    def test_scram_user_passthrough(self):
        """A SCRAM secret: the client logs in with SCRAM and the pooler logs
        in to PostgreSQL with the keys of that exchange."""
        who, err = yield in_thread(login, self.pooler, "aq_scram", "aq_scram_pw",
                                   require_auth="scram-sha-256")
        self.assertEqual(who, "aq_scram", err)
        # Another client of the same user, with a new server connection.
        up = self.pooler.cluster.user_pools[("pgcat_test", "aq_scram")]
        for p in up.address_pools:
            for conn in list(p.idle):
                p.discard(conn)
        who, err = yield in_thread(login, self.pooler, "aq_scram", "aq_scram_pw")
        self.assertEqual(who, "aq_scram", err)
        self.assertTrue(scram.is_scram_secret(up.server_password))

    @defer.inlineCallbacks
    def test_asyncpg(self):
        async def go(user, password):
            conn = await asyncpg.connect(host="127.0.0.1", port=self.pooler.port, user=user,
                                         password=password, database="pgcat_test", ssl=False,
                                         timeout=10, statement_cache_size=0)
            try:
                return await conn.fetchval("select current_user")
            finally:
                await conn.close()
        for user in ("aq_scram", "aq_md5"):
            who = yield in_thread(asyncio.run, go(user, ROLES[user][1]))
            self.assertEqual(who, user)

    @defer.inlineCallbacks
    def test_wrong_password_and_unknown_user_look_alike(self):
        msgs = {}
        for user, password in [("aq_md5", "wrong"), ("aq_scram", "wrong"),
                               ("no_such_user", "whatever"), ("aq_auth", "wrong")]:
            who, err = yield in_thread(login, self.pooler, user, password)
            self.assertIsNone(who)
            self.assertIn(f'FATAL:  password authentication failed for user "{user}"', err)
            msgs[user] = err.split("FATAL:")[1].replace(user, "U")
        self.assertEqual(len(set(msgs.values())), 1, msgs)
        # The unknown user went through a whole SCRAM exchange, like aq_scram.
        who, err = yield in_thread(login, self.pooler, "no_such_user", "x",
                                   require_auth="scram-sha-256")
        self.assertIn("password authentication failed", err)
        self.assertNotIn(("pgcat_test", "no_such_user"), self.pooler.cluster.user_pools)

    @defer.inlineCallbacks
    def test_user_name_is_not_sql(self):
        who, err = yield in_thread(login, self.pooler, "x' OR 'a'='a", "aq_md5_pw")
        self.assertIsNone(who)
        self.assertIn("password authentication failed", err)

    @defer.inlineCallbacks
    def test_rotation(self):
        for role in ("aq_md5", "aq_scram"):
            who, err = yield in_thread(login, self.pooler, role, ROLES[role][1])
            self.assertEqual(who, role, err)
            yield in_thread(set_password, role, role + "_rotated")
            who, err = yield in_thread(login, self.pooler, role, ROLES[role][1])
            self.assertIsNone(who, f"{role}: the old password still works")
            self.assertIn("password authentication failed", err)
            # New password: the client and new server connections use it.
            up = self.pooler.cluster.user_pools[("pgcat_test", role)]
            for p in up.address_pools:
                for conn in list(p.idle):
                    p.discard(conn)
            who, err = yield in_thread(login, self.pooler, role, role + "_rotated")
            self.assertEqual(who, role, err)

    @defer.inlineCallbacks
    def test_reload_keeps_auth_query_users(self):
        who, _ = yield in_thread(login, self.pooler, "aq_scram", "aq_scram_pw")
        self.assertEqual(who, "aq_scram")
        from pgcat_tw.cluster import Cluster
        svc = self.pooler.service
        old = svc.cluster
        svc.cluster = Cluster(svc.reactor, old.config, previous=old)
        old.retire(svc.cluster)
        self.assertIn(("pgcat_test", "aq_scram"), svc.cluster.user_pools)
        who, err = yield in_thread(login, self.pooler, "aq_scram", "aq_scram_pw")
        self.assertEqual(who, "aq_scram", err)


class ListedUserTests(PoolerTestCase):
    """PgCat's way: the user is listed without a password; the query is
    PgCat's, with a quoted '$1'."""

    users = {"aq_scram": "", "aq_md5": ""}
    pool_extra = ("auth_query = \"SELECT usename, passwd FROM public.pgcat_lookup('$1')\"\n"
                  f'auth_query_user = "aq_auth"\nauth_query_password = "{ROLES["aq_auth"][1]}"')

    @defer.inlineCallbacks
    def setUp(self):
        yield threads.deferToThread(_prepare_roles)
        for role in ("aq_md5", "aq_scram"):
            yield in_thread(set_password, role, ROLES[role][1])
        yield PoolerTestCase.setUp(self)

    @defer.inlineCallbacks
    def test_listed_users(self):
        for role in ("aq_scram", "aq_md5"):
            who, err = yield in_thread(login, self.pooler, role, ROLES[role][1])
            self.assertEqual(who, role, err)
            up = self.pooler.cluster.user_pools[("pgcat_test", role)]
            self.assertFalse(up.dynamic)
            self.assertTrue(up.password_learned)

    @defer.inlineCallbacks
    def test_unlisted_user_also_works(self):
        # aq_auth is not listed; auth_query knows it.
        who, err = yield in_thread(login, self.pooler, "aq_auth", ROLES["aq_auth"][1])
        self.assertEqual(who, "aq_auth", err)


class FailingAuthQueryTests(PoolerTestCase):
    users = {"pgcat_trust": 'auth_type = "trust"'}
    pool_extra = (f'auth_query = "{LOOKUP}"\nauth_query_user = "aq_auth"\n'
                  'auth_query_password = "not-the-password"')

    @defer.inlineCallbacks
    def setUp(self):
        yield threads.deferToThread(_prepare_roles)
        yield PoolerTestCase.setUp(self)

    @defer.inlineCallbacks
    def test_lookup_failure(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        who, err = yield in_thread(login, self.pooler, "aq_md5", "aq_md5_pw")
        self.assertIsNone(who)
        self.assertIn("could not be looked up", err)
        logged = [e for e in events if "auth_query" in e.get("log_format", "")]
        self.assertTrue(logged)
        # The trust user is not affected.
        who, err = yield in_thread(login, self.pooler, "pgcat_trust", "")
        self.assertEqual(who, "pgcat_trust", err)
