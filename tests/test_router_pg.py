"""The router's decisions checked by PostgreSQL itself, on the run's primary
and a streaming hot standby (tests/pgharness.py):

- every statement of tests/router_cases.py the router sends to a replica
  runs on the standby without an error;
- every write of the table marked ``w`` is refused there (read-only
  transaction, or not during recovery): the router was right to keep it
  on the primary;
- every function of the built-in read-only list is a ``pg_catalog``
  function of the server.

psycopg2 runs each statement on a fresh connection (simple protocol, so
that multi-statement strings work), in a thread. CPython only (psycopg2);
the pure tests are tests/test_router.py, which also run under PyPy.
"""

import io
import threading
import time

import psycopg2
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from pgcat_tw.router.classify import Classifier
from pgcat_tw.router.functions import BUILTIN_READ_ONLY
from tests.router_cases import CASES, R, P, SCHEMA

_ready = []
_lock = threading.Lock()


def _nodes():
    """(primary, standby) with the cases' schema replayed on the standby."""
    from tests.pgharness import topology
    with _lock:
        if not _ready:
            topo = topology(replicas=1)
            topo.primary.psql_script(SCHEMA, db="pgcat_test")
            standby = topo.replicas[0]
            deadline = time.monotonic() + 60
            while standby.psql("SELECT to_regproc('router_t.user_srf') IS NOT NULL",
                               db="pgcat_test") != "t":
                if time.monotonic() > deadline:
                    raise RuntimeError("the standby did not replay the schema in 60 s")
                time.sleep(0.1)
            _ready.append((topo.primary, standby))
        return _ready[0]


def run_on(node, sql):
    """None if ``sql`` succeeds on ``node``, else (SQLSTATE, message)."""
    conn = psycopg2.connect(node.dsn(db="pgcat_test"),
                            options="-c search_path=router_t,public")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if sql.lstrip().upper().startswith("COPY"):
                cur.copy_expert(sql, io.StringIO())
            else:
                cur.execute(sql)
        return None
    except psycopg2.Error as e:
        return (e.pgcode, str(e).strip())
    finally:
        conn.close()


class StandbyTests(TestCase):

    timeout = 300

    def _check(self, role, flag, expect):
        def run():
            _primary, standby = _nodes()
            c = Classifier()
            wrong = []
            checked = 0
            for sql, want, flags in CASES:
                if want != role or (flag is None and "n" in flags) or \
                        (flag is not None and flag not in flags):
                    continue
                self.assertEqual(c.classify(sql.encode()).role, role, sql)
                got = run_on(standby, sql)
                checked += 1
                if not expect(got):
                    wrong.append((sql, got))
            return checked, wrong

        def done(result):
            checked, wrong = result
            self.assertGreater(checked, 10)
            self.assertEqual(wrong, [])

        return threads.deferToThread(run).addCallback(done)

    def test_reads_run_on_the_standby(self):
        return self._check(R, None, lambda got: got is None)

    def test_writes_are_refused_by_the_standby(self):
        return self._check(P, "w", lambda got: got is not None and (
            "read-only" in got[1] or "during recovery" in got[1]))


class CatalogTests(TestCase):

    timeout = 120

    def test_builtin_functions_exist(self):
        """Every name of BUILTIN_READ_ONLY is a function in pg_catalog."""
        def run():
            primary, _standby = _nodes()
            names = ",".join(f"'{n}'" for n in sorted(BUILTIN_READ_ONLY))
            return primary.psql(
                f"SELECT coalesce(string_agg(n, ' '), '') FROM unnest(ARRAY[{names}]) n"
                " WHERE NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = n"
                " AND pronamespace = 'pg_catalog'::regnamespace)", db="pgcat_test")

        return threads.deferToThread(run).addCallback(self.assertEqual, "")
