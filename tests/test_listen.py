"""Listening on a Unix socket beside TCP (unix_socket_dir, PgBouncer's)."""

import os
import tempfile

import psycopg
from twisted.internet import defer

from tests.support import PoolerTestCase, in_thread
from tests.test_admin import admin


_DIR = tempfile.mkdtemp(prefix="pgcat_tw_sock_")


class UnixSocketTests(PoolerTestCase):
    general = f'unix_socket_dir = "{_DIR}"'

    @defer.inlineCallbacks
    def test_psql_and_psycopg_over_the_socket(self):
        path = os.path.join(_DIR, f".s.PGSQL.{self.pooler.port}")
        self.assertTrue(os.path.exists(path))
        # psql -h <dir> is how libpq reaches a Unix socket.
        out, err, code = yield self.pooler.psql("select 40 + 2",
                                                extra_args=("-h", _DIR))
        self.assertEqual((code, out.strip()), (0, b"42"), err)

        def go():
            with psycopg.connect(host=_DIR, port=self.pooler.port, user="pgcat_md5",
                                 password="md5_pw", dbname="pgcat_test",
                                 prepare_threshold=None, autocommit=True) as c:
                return c.execute("select inet_server_port() is not null").fetchone()[0]

        self.assertTrue((yield in_thread(go)))
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW LISTS")
        self.assertIn("login_clients", [r["list"] for r in rows])
        yield self.pooler.stop()
        self.assertFalse(os.path.exists(path) and _connects(path))


def _connects(path):
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
