"""The transaction-mode hand-off on in-memory transports: a real
ClientProtocol and ServerConnection from a real pool, on a Clock.

When a server's last answer chunk arrives and another client is queued, the
server goes to that client (its held query is sent) before the answer is
forwarded to the client that is done, and that last write registers no
producer (the server belongs to somebody else by then). With nobody queued,
the answer goes out first and the bookkeeping follows."""

from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.backend import ServerConnection
from pgcat_tw.cancel import CancelKeys
from pgcat_tw.cluster import Cluster
from pgcat_tw.config import parse
from pgcat_tw.frontend import ClientFactory, Session
from pgcat_tw.protocol import messages as m

CONFIG = """
[general]
host = "127.0.0.1"
port = 6432
admin_username = "a"
admin_password = "a"
[pools.db]
pool_mode = "transaction"
[pools.db.users.0]
username = "u"
password = "p"
pool_size = 1
[pools.db.shards.0]
database = "db"
servers = [["127.0.0.1", 5432, "primary"]]
"""

PARAMS = {"client_encoding": "UTF8", "DateStyle": "ISO, MDY"}


class LoggedTransport(StringTransport):
    """Records every write, in order, in a log shared by all transports."""

    def __init__(self, name, log):
        StringTransport.__init__(self)
        self.name = name
        self.log = log

    probe = None  # called at each write; its result is logged too

    def write(self, data):
        self.log.append((self.name, data) if self.probe is None
                        else (self.name, data, self.probe()))
        StringTransport.write(self, data)


class HandOffTests(SynchronousTestCase):
    def setUp(self):
        self.log = []
        clock = task.Clock()
        config, _ = parse(CONFIG)
        cluster = Cluster(clock, config)
        factory = ClientFactory(clock, lambda: cluster, CancelKeys())
        up = cluster.user_pools[("db", "u")]
        self.pool = up.server_pool()
        server = ServerConnection(clock, "127.0.0.1", 5432, "u", "p", "db")
        server.makeConnection(LoggedTransport("server", self.log))
        server.params.update(PARAMS)
        server.state = "idle"
        server.dataReceived = server.idle_data
        server.ready.callback(server)
        server.pool = self.pool
        self.pool.idle.append(server)
        self.server = server
        self.clients = []
        for name in ("a", "b"):
            client = factory.buildProtocol(None)
            client.makeConnection(LoggedTransport(name, self.log))
            client._enter_work_phase(Session("u", "db", user_pool=up, params=dict(PARAMS)))
            self.clients.append(client)
        del self.log[:]

    def answer(self, text):
        return (m.row_description([("x", 25)]) + m.data_row([text])
                + m.command_complete("SELECT 1") + m.READY_IDLE)

    def test_next_query_goes_out_before_the_answer(self):
        a, b = self.clients
        qa, qb = m.query("SELECT 'a'"), m.query("SELECT 'b'")
        a.dataReceived(qa)
        self.assertIs(a.server, self.server)
        b.dataReceived(qb)
        self.assertIsNone(b.server)            # queued: pool_size 1
        self.assertEqual(len(self.pool.waiters), 1)
        ans = self.answer("a")
        self.server.dataReceived(ans)
        self.assertEqual(self.log, [("server", qa), ("server", qb), ("a", ans)])
        self.assertIs(b.server, self.server)
        self.assertIsNone(a.server)
        self.assertIsNone(a.transport.producer)
        # b's answer, with nobody queued: forwarded, server back to idle.
        del self.log[:]
        ans_b = self.answer("b")
        self.server.dataReceived(ans_b)
        self.assertEqual(self.log, [("b", ans_b)])
        self.assertEqual(list(self.pool.idle), [self.server])

    def test_nobody_queued_answer_goes_out_before_the_release(self):
        a, _ = self.clients
        a.dataReceived(m.query("SELECT 'a'"))
        del self.log[:]
        a.transport.probe = lambda: a.server is self.server
        ans = self.answer("a")
        self.server.dataReceived(ans)
        # Forwarded while the server was still bound (bookkeeping after).
        self.assertEqual(self.log, [("a", ans, True)])
        self.assertIsNone(a.server)
        self.assertEqual(list(self.pool.idle), [self.server])

    def test_answer_in_pieces_keeps_the_server_until_the_end(self):
        a, b = self.clients
        a.dataReceived(m.query("SELECT 'a'"))
        b.dataReceived(m.query("SELECT 'b'"))
        ans = self.answer("a")
        del self.log[:]
        self.server.dataReceived(ans[:-6])      # everything but ReadyForQuery
        self.assertEqual(self.log, [("a", ans[:-6])])
        self.assertIs(a.server, self.server)
        self.server.dataReceived(ans[-6:])
        self.assertEqual([n for n, _ in self.log], ["a", "server", "a"])
        self.assertIs(b.server, self.server)

    def test_draining_client_gets_its_answer_before_the_error(self):
        a, _ = self.clients
        a.dataReceived(m.query("SELECT 'a'"))
        a.drain()
        self.assertIs(a.server, self.server)   # mid-transaction: waits
        del self.log[:]
        ans = self.answer("a")
        self.server.dataReceived(ans)
        writes = [d for n, d in self.log if n == "a"]
        self.assertEqual(writes[0], ans)
        self.assertIn(b"57P01", b"".join(writes[1:]))
