"""The pooler on PyPy: ``twistd -n pgcat -c ...`` from a fresh PyPy venv.

PyPy runs the pooler's per-transaction Python code in about half the CPU
time CPython needs (bench/README.rst, "Interpreter"), so it is a supported
way to run pgcat_tw. The client libraries the rest of the suite drives
in-process (asyncpg, psycopg2, psycopg's C and Python implementations) do not
run on PyPy 3.9, so this module keeps the clients here, on CPython, and puts
the pooler in a PyPy child process, installed with a plain ``pip install``
from a copy of the working tree (``test_twistd._build_venv``): real psql,
pgbench and psycopg against the real primary, through the PyPy pooler. It
also runs the unit-test modules under PyPy.

PyPy is ``$PGCAT_PYPY`` or ``pypy3`` on PATH; ``scripts/test.sh`` (the suite's
command, and CI's) installs Debian's ``pypy3`` when missing and sets
``PGCAT_REQUIRE_PYPY=1``, so that there a missing PyPy fails the run. A bare
``trial tests`` on a machine without PyPy skips this module and says why.
"""

import os
import shutil
import subprocess
import threading
import time

import psycopg
from twisted.trial.unittest import FailTest, SkipTest

from tests.certs import CertSet
from tests.pgharness import USERS
from tests.support import PGBENCH, in_thread
from tests import test_twistd
from tests.test_twistd import INSTALL_TIMEOUT, REPO, child_env, psql

PASSWORD = USERS["pgcat_md5"]
PYPY = os.environ.get("PGCAT_PYPY") or shutil.which("pypy3")

# No Rust toolchain or crates.io here: cryptography must come as a wheel
# (PyPI's newest with a PyPy 3.9 wheel is 43.x; pip picks a pyOpenSSL that
# accepts it).
PIP_ARGS = ("--only-binary", "cryptography")

# Unit-test modules whose tests use no client library: they run under PyPy.
UNIT_MODULES = ("tests.test_framing", "tests.test_relay", "tests.test_pool",
                "tests.test_fastpoll", "tests.test_handoff", "tests.test_balancer",
                "tests.test_config", "tests.test_auth",
                "tests.test_pgcat_configs", "tests.test_router", "tests.test_sharding",
                "tests.test_plugins_unit")

def pypy_venv():
    """The PyPy venv, built on first use and cached (as is a failure)."""
    return test_twistd.installed_venv(PYPY, PIP_ARGS)


PGBENCH_SCRIPT = "\\set n random(1, 100000)\nSELECT :n + 1;\n"


class PyPyVenvMixin:
    """A TwistdTestCase whose twistd is the PyPy venv's."""

    timeout = INSTALL_TIMEOUT + 240

    def make_venv(self):
        if not PYPY:
            why = "no PyPy: set PGCAT_PYPY or install pypy3 (scripts/test.sh does)"
            if os.environ.get("PGCAT_REQUIRE_PYPY"):
                raise FailTest(why)
            raise SkipTest(why)
        return pypy_venv()


# test_twistd's process-level tests with the PyPy twistd (the module, not
# its classes, is imported: trial would run imported classes here again).

class PyPyForegroundTests(PyPyVenvMixin, test_twistd.PluginInstallTests):
    """The plugin is found in the PyPy venv; foreground query and SIGTERM."""


class PyPyDaemonTests(PyPyVenvMixin, test_twistd.DaemonTests):
    """twistd's own daemon mode, --pidfile and --logfile, on PyPy."""


class PyPyConfigErrorTests(PyPyVenvMixin, test_twistd.ConfigErrorTests):
    """A missing or invalid file, or an unusable key, exits non-zero on PyPy
    too (its Twisted, 26.4, exits 0 after a usage error: pgcat_tw.tap)."""


class PyPyReloadTests(PyPyVenvMixin, test_twistd.ReloadTests):
    """SIGHUP on PyPy: a broken file keeps the running config, a good one
    takes effect."""


class PyPyPoolerTests(PyPyVenvMixin, test_twistd.TwistdTestCase):
    """Real clients through the PyPy pooler."""

    def _start(self, **kw):
        config, port = self.write_config(**kw)
        child = self.start_foreground(config, port)
        exe = os.path.realpath(f"/proc/{child.pid}/exe")
        self.assertIn("pypy", os.path.basename(exe), exe)
        return child, port

    def test_pgbench_simple_and_extended(self):
        """8 pgbench clients on 2 servers, both protocols: no failed
        transactions, every one answered."""
        def run():
            child, port = self._start(pool_size=2)
            script = os.path.join(self.tmp, "select.sql")
            with open(script, "w") as f:
                f.write(PGBENCH_SCRIPT)
            env = child_env(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
            for mode in ("simple", "extended"):
                proc = subprocess.run(
                    [PGBENCH, "-n", "-M", mode, "-c", "8", "-j", "2", "-t", "200",
                     "-f", script, "-h", "127.0.0.1", "-p", str(port), "-U", "pgcat_md5",
                     "pgcat_test"],
                    capture_output=True, text=True, env=env, timeout=120,
                    stdin=subprocess.DEVNULL)
                self.assertEqual(proc.returncode, 0, proc.stderr + child.output()[-2000:])
                self.assertIn("number of transactions actually processed: 1600/", proc.stdout)
                self.assertIn("number of failed transactions: 0 ", proc.stdout)
            self.assert_no_traceback(child.output())

        return in_thread(run)

    def test_psycopg_copy_pipeline_and_large_result(self):
        """psycopg 3 through the PyPy pooler: a transaction, pipeline mode,
        COPY in both directions and a result of several MB (many full
        reads of the reused receive buffer), byte for byte."""
        def run():
            child, port = self._start(pool_size=1)
            dsn = (f"host=127.0.0.1 port={port} user=pgcat_md5 password={PASSWORD} "
                   "dbname=pgcat_test sslmode=disable connect_timeout=10")
            table = f"pypy_copy_{os.getpid()}"
            # (prepare_threshold: no named statements in transaction mode.)
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
                with conn.transaction():
                    conn.execute(f"CREATE TEMP TABLE {table} (n int, t text) ON COMMIT DROP")
                    with conn.cursor().copy(f"COPY {table} FROM STDIN") as cp:
                        for i in range(5000):
                            cp.write_row((i, f"row {i}"))
                    total = conn.execute(f"SELECT count(*), sum(n) FROM {table}").fetchone()
                self.assertEqual(total, (5000, sum(range(5000))))
                with conn.pipeline():
                    curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(20)]
                self.assertEqual([c.fetchone()[0] for c in curs], [i * 2 for i in range(20)])
                sql = ("COPY (SELECT i, repeat('x', 100) FROM generate_series(1, 60000) i) "
                       "TO STDOUT")
                chunks = []
                with conn.cursor().copy(sql) as cp:
                    for data in cp:
                        chunks.append(bytes(data))
                expected = b"".join(b"%d\t%s\n" % (i, b"x" * 100) for i in range(1, 60001))
                self.assertEqual(b"".join(chunks), expected)
                rows = conn.execute(
                    "SELECT i, md5(i::text) FROM generate_series(1, 100000) i").fetchall()
                self.assertEqual(len(rows), 100000)
                self.assertEqual(rows[-1][0], 100000)
            self.assert_no_traceback(child.output())

        return in_thread(run)

    def test_cancel_and_client_gone_mid_transaction(self):
        """A CancelRequest to the PyPy pooler cancels the server's query; a
        client that leaves inside a transaction leaves no dirty server."""
        def run():
            child, port = self._start(pool_size=1)
            dsn = (f"host=127.0.0.1 port={port} user=pgcat_md5 password={PASSWORD} "
                   "dbname=pgcat_test sslmode=disable connect_timeout=10")
            with psycopg.connect(dsn, autocommit=True) as conn:
                threading.Timer(1.0, conn.cancel).start()
                started = time.monotonic()
                with self.assertRaises(psycopg.errors.QueryCanceled):
                    conn.execute("SELECT pg_sleep(30)")
                self.assertLess(time.monotonic() - started, 20)
            conn = psycopg.connect(dsn)
            conn.execute("SELECT 1")  # a transaction is open now
            time.sleep(0.2)
            conn.close()
            # The one server again: in a transaction of its own (now() is
            # the transaction's start), not in the one left open above.
            code, out, err = psql(port, "select now() = statement_timestamp()")
            self.assertEqual((code, out), (0, "t"), err)
            self.assert_no_traceback(child.output())

        return in_thread(run)

    def test_router_and_plugins(self):
        """The query parser (libpg_query through PyPy's cffi) and the
        plugins on the PyPy pooler: custom SQL, an intercepted probe over
        the extended protocol, a refused CTE, the query log."""
        from tests.test_plugins import PLUGINS, PROBE

        def run():
            self.primary.psql("create table if not exists plugin_secret (id int); "
                              "create table if not exists plugin_prewarmed (pid int); "
                              "grant all on plugin_secret, plugin_prewarmed to public",
                              "pgcat_test")
            child, port = self._start(
                pool_size=1, pool_extra="query_parser_enabled = true\n"
                "query_parser_read_write_splitting = true\n" + PLUGINS)
            dsn = (f"host=127.0.0.1 port={port} user=pgcat_md5 password={PASSWORD} "
                   "dbname=pgcat_test sslmode=disable connect_timeout=10")
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
                self.assertEqual(conn.execute("SHOW SERVER ROLE").fetchone()[0], "auto")
                self.assertEqual(conn.execute(PROBE).fetchall(), [("pgcat_test", "{public}")])
                with self.assertRaises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("with s as (select * from plugin_secret) select * from s")
                self.assertEqual(conn.execute("select 6 * 7 as pypy_logged").fetchone()[0], 42)
            out = child.output()
            self.assertIn("[pool: pgcat_test][user: pgcat_md5] select 6 * 7 as pypy_logged", out)
            self.assert_no_traceback(out)

        return in_thread(run)

    def test_tls_towards_clients(self):
        """TLS terminated by the PyPy pooler (pyOpenSSL on PyPy): a client
        that verifies the certificate gets an encrypted session that works."""
        def run():
            certs = CertSet(os.path.join(self.tmp, "certs"))
            child, port = self._start(pool_size=1, general=certs.general_toml())
            dsn = (f"host=127.0.0.1 port={port} user=pgcat_md5 password={PASSWORD} "
                   f"dbname=pgcat_test sslmode=verify-full sslrootcert={certs.ca} "
                   "connect_timeout=10")
            with psycopg.connect(dsn, autocommit=True) as conn:
                self.assertTrue(conn.pgconn.ssl_in_use)
                self.assertEqual(conn.execute("SELECT 40 + 2").fetchone()[0], 42)
                n = conn.execute("SELECT count(*) FROM generate_series(1, 50000)").fetchone()
                self.assertEqual(n[0], 50000)
            self.assert_no_traceback(child.output())

        return in_thread(run)

    def test_unit_modules_under_pypy(self):
        """The framing, relay, pool, fastpoll, hand-off, balancer, config,
        auth, router and sharding unit tests pass on PyPy too (the router
        through PyPy's own cffi; test_sharding's comparison with the server
        starts the harness's PostgreSQL in the PyPy process)."""
        def run():
            tmp = os.path.join(self.tmp, "trial")
            env = child_env(PYTHONDONTWRITEBYTECODE="1")
            proc = subprocess.run(
                [os.path.join(self.venv, "bin", "python"), "-m", "twisted.trial",
                 "--temp-directory", tmp, *UNIT_MODULES],
                capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
                stdin=subprocess.DEVNULL)
            out = proc.stdout + proc.stderr
            self.assertEqual(proc.returncode, 0, out[-5000:])
            self.assertIn("PASSED", out)
            self.assertNotIn("skips=", out.splitlines()[-1])

        return in_thread(run)
