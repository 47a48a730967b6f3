"""Malformed and hostile input from clients, over raw sockets, against a
pooler running in trial's reactor in front of the real PostgreSQL primary.

Every case expects what PostgreSQL itself does: a FATAL ErrorResponse with
the right SQLSTATE (08P01 for protocol violations) where an answer is due,
then the connection closed by the pooler; never a hang, never a traceback
in the pooler's log, and the pooler keeps serving other clients (each test
ends with a normal psycopg query through the same pooler).

The blocking socket code runs in threads (``in_thread``) so that the
reactor keeps serving the pooler meanwhile.
"""

import hashlib
import socket
import struct
import time

import psycopg
from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import FailTest

from pgcat_tw.protocol import codes
from tests.pgharness import USERS
from tests.support import (
    PoolerTestCase,
    error_fields,
    in_thread,
    read_messages,
    startup_packet,
)

IO_TIMEOUT = 5.0          # seconds any single read may take before we call it a hang
USER = "pgcat_md5"
PASSWORD = USERS[USER]
DB = "pgcat_test"

PROTO_2_0 = 2 << 16
PROTO_3_1 = (3 << 16) | 1
PROTO_4_0 = 4 << 16


# --- blocking helpers (run in threads) -------------------------------------------


def check(condition, message=""):
    """``assert`` for helpers run in threads: a test failure, not an error,
    and not disabled by ``python -O``."""
    if not condition:
        raise FailTest(message)


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def msg(type_byte, body=b""):
    return type_byte + struct.pack("!i", len(body) + 4) + body


def query_msg(sql):
    return msg(b"Q", sql.encode() + b"\0")


def raw_packet(body):
    """An untyped startup-phase packet: int32 length (itself included) + body."""
    return struct.pack("!i", len(body) + 4) + body


def ssl_request():
    return raw_packet(struct.pack("!i", codes.SSL_REQUEST))


def gssenc_request():
    return raw_packet(struct.pack("!i", codes.GSSENC_REQUEST))


def cancel_request(pid, secret):
    return raw_packet(struct.pack("!iii", codes.CANCEL_REQUEST, pid, secret))


def md5_response(user, password, salt):
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


def read_until_closed(sock, timeout=IO_TIMEOUT):
    """Read until EOF; return everything read. Fails (FailTest) if the
    peer keeps the connection open for ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return data
        except socket.timeout:
            raise FailTest(
                f"connection still open after {timeout} s (read so far: {data!r})")
        if not chunk:
            return data
        data += chunk
        if time.monotonic() > deadline:
            raise FailTest(f"connection still open after {timeout} s")


def split_messages(data):
    out = []
    while len(data) >= 5:
        (ln,) = struct.unpack("!i", data[1:5])
        if ln < 4 or len(data) < 1 + ln:
            break
        out.append((data[:1], data[5:1 + ln]))
        data = data[1 + ln:]
    if data:
        out.append((b"?", data))
    return out


def expect_fatal_and_close(sock, sqlstate, timeout=IO_TIMEOUT):
    """The pooler answers with exactly one FATAL ErrorResponse carrying
    ``sqlstate`` (possibly after other messages) and closes. Returns the
    error's fields."""
    data = read_until_closed(sock, timeout)
    msgs = split_messages(data)
    errors = [body for t, body in msgs if t == b"E"]
    check(errors, f"no ErrorResponse before close; got {msgs!r}")
    check(len(errors) == 1, f"more than one ErrorResponse: {msgs!r}")
    check(msgs[-1][0] == b"E", f"the ErrorResponse is not the last message: {msgs!r}")
    f = error_fields(errors[0])
    check(f.get("S") == "FATAL", f"severity {f.get('S')!r}, want FATAL: {f!r}")
    check(f.get("V", "FATAL") == "FATAL", f)
    check(f.get("C") == sqlstate, f"SQLSTATE {f.get('C')!r}, want {sqlstate}: {f!r}")
    check(f.get("M"), f"no message text: {f!r}")
    return f


def send_and_expect_fatal(port, payload, sqlstate="08P01"):
    sock = connect(port)
    try:
        sock.sendall(payload)
        return expect_fatal_and_close(sock, sqlstate)
    finally:
        sock.close()


def start_login(sock, user=USER, db=DB, version=codes.PROTOCOL_3_0, extra=None):
    """Send a StartupMessage and read up to the authentication request.
    Returns (messages before the request, salt)."""
    sock.sendall(startup_packet(user, db, version=version, extra=extra))
    msgs, closed = read_messages(sock, until=b"R", timeout=IO_TIMEOUT)
    check(msgs and msgs[-1][0] == b"R", f"no authentication request: {msgs!r} closed={closed}")
    body = msgs[-1][1]
    (code,) = struct.unpack("!i", body[:4])
    check(code == codes.AUTH_MD5, f"authentication code {code}, want md5 (5)")
    return msgs[:-1], body[4:8]


def finish_login(sock, salt, user=USER, password=PASSWORD):
    """Answer the md5 challenge; read AuthenticationOk ... ReadyForQuery."""
    sock.sendall(msg(b"p", md5_response(user, password, salt)))
    msgs, closed = read_messages(sock, until=b"Z", timeout=IO_TIMEOUT)
    types = [t for t, _ in msgs]
    check(types and types[-1] == b"Z", f"login did not finish: {msgs!r} closed={closed}")
    check(msgs[0] == (b"R", struct.pack("!i", codes.AUTH_OK)), msgs)
    check(b"K" in types, msgs)
    check(b"E" not in types, msgs)
    return msgs


def login(port, user=USER, password=PASSWORD, db=DB, version=codes.PROTOCOL_3_0,
          extra=None, sock=None):
    """A raw socket logged in and ReadyForQuery."""
    sock = sock or connect(port)
    try:
        _, salt = start_login(sock, user, db, version, extra)
        finish_login(sock, salt, user, password)
    except BaseException:
        sock.close()
        raise
    return sock


def simple_query(sock, sql):
    """Run a simple query on a logged-in raw socket; return the messages."""
    sock.sendall(query_msg(sql))
    msgs, closed = read_messages(sock, until=b"Z", timeout=IO_TIMEOUT)
    check(msgs and msgs[-1][0] == b"Z", f"no ReadyForQuery: {msgs!r} closed={closed}")
    return msgs


def data_rows(msgs):
    rows = []
    for t, body in msgs:
        if t == b"D":
            (n,) = struct.unpack("!h", body[:2])
            pos = 2
            row = []
            for _ in range(n):
                (ln,) = struct.unpack("!i", body[pos:pos + 4])
                pos += 4
                row.append(body[pos:pos + ln].decode())
                pos += ln
            rows.append(row)
    return rows


# --- the test cases ----------------------------------------------------------------


class BadInputCase(PoolerTestCase):
    """Base: collects the pooler's log events, and checks at the end of each
    test that a normal client still works and nothing was logged as an error."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        yield super().setUp()

    def bad_events(self):
        bad = []
        for e in self.events:
            if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical):
                bad.append(e)
        return bad

    def psycopg_select(self, n=1):
        with psycopg.connect(self.pooler.dsn()) as conn:
            return conn.execute("select %s::int + 1", (n,)).fetchone()[0]

    @defer.inlineCallbacks
    def assert_pooler_healthy(self):
        """A normal client works, and nothing was logged as an error."""
        try:
            value = yield in_thread(self.psycopg_select, 41)
        except psycopg.Error as e:
            self.fail(f"a normal client failed after the bad input: "
                      f"{type(e).__name__}: {e}")
        self.assertEqual(value, 42)
        bad = self.bad_events()
        self.assertEqual(bad, [], "the pooler logged errors for bad client input")

    @defer.inlineCallbacks
    def assert_fatal(self, payload, sqlstate="08P01"):
        fields = yield in_thread(send_and_expect_fatal, self.pooler.port, payload, sqlstate)
        return fields

    @defer.inlineCallbacks
    def wait_no_clients(self, timeout=5.0):
        """Poll until the pooler tracks no client connection."""
        deadline = reactor.seconds() + timeout
        while self.pooler.service.factory.clients:
            if reactor.seconds() > deadline:
                self.fail(f"clients still tracked after {timeout} s: "
                          f"{self.pooler.service.factory.clients!r}")
            yield task.deferLater(reactor, 0.02, lambda: None)


class MalformedStartupTests(BadInputCase):
    @defer.inlineCallbacks
    def test_length_below_8(self):
        for length in (0, 4, 7, -1):
            yield self.assert_fatal(struct.pack("!i", length) + b"\0" * 8)
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_length_above_10000(self):
        # The header alone must be enough: nothing more will come.
        yield self.assert_fatal(struct.pack("!i", 20000))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_parameters_not_nul_terminated(self):
        version = struct.pack("!i", codes.PROTOCOL_3_0)
        # The last value lacks its NUL.
        yield self.assert_fatal(raw_packet(version + b"user\0pgcat_md5\0database\0pgcat_test"))
        # Every string is terminated but the list terminator is missing.
        yield self.assert_fatal(raw_packet(version + b"user\0pgcat_md5\0"))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_name_without_value(self):
        version = struct.pack("!i", codes.PROTOCOL_3_0)
        yield self.assert_fatal(raw_packet(version + b"user\0pgcat_md5\0database\0\0"))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_parameters_not_utf8(self):
        version = struct.pack("!i", codes.PROTOCOL_3_0)
        yield self.assert_fatal(raw_packet(version + b"user\0\xff\xfe\0database\0pgcat_test\0\0"))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_missing_user(self):
        body = struct.pack("!i", codes.PROTOCOL_3_0) + b"database\0pgcat_test\0\0"
        fields = yield self.assert_fatal(raw_packet(body), sqlstate="28000")
        self.assertIn("user", fields["M"])
        # An empty user name is no user name either.
        yield self.assert_fatal(startup_packet("", DB), sqlstate="28000")
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_http_request(self):
        yield self.assert_fatal(b"GET / HTTP/1.1\r\n\r\n")
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_version_without_parameters(self):
        # Length 8: the version and nothing else, not even the terminator.
        yield self.assert_fatal(struct.pack("!i", 8) + b"\0\3\0\0" + struct.pack("!i", 8))
        yield self.assert_pooler_healthy()


class ProtocolVersionTests(BadInputCase):
    @defer.inlineCallbacks
    def test_protocol_2_0_rejected(self):
        fields = yield self.assert_fatal(startup_packet(USER, DB, version=PROTO_2_0))
        self.assertIn("2.0", fields["M"])
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_protocol_4_0_rejected(self):
        fields = yield self.assert_fatal(startup_packet(USER, DB, version=PROTO_4_0))
        self.assertIn("4.0", fields["M"])
        yield self.assert_pooler_healthy()

    def _negotiated_login(self, version, extra):
        sock = connect(self.pooler.port)
        try:
            before, salt = start_login(sock, version=version, extra=extra)
            finish_login(sock, salt)
            rows = data_rows(simple_query(sock, "select 6 * 7"))
            sock.sendall(msg(b"X"))
            read_until_closed(sock)
            return before, rows
        finally:
            sock.close()

    @staticmethod
    def _parse_v(body):
        newest, n = struct.unpack("!ii", body[:8])
        names = body[8:].split(b"\0")
        return newest, n, [x.decode() for x in names[:n]], names[n:]

    @defer.inlineCallbacks
    def test_protocol_3_1_negotiated_down(self):
        before, rows = yield in_thread(self._negotiated_login, PROTO_3_1, None)
        self.assertEqual([t for t, _ in before], [b"v"])
        newest, n, names, rest = self._parse_v(before[0][1])
        self.assertEqual((newest, n, names, rest), (codes.PROTOCOL_3_0, 0, [], [b""]))
        self.assertEqual(rows, [["42"]])
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_pq_option_declined(self):
        before, rows = yield in_thread(self._negotiated_login, codes.PROTOCOL_3_0,
                                       {"_pq_.some_option": "on"})
        self.assertEqual([t for t, _ in before], [b"v"])
        newest, n, names, rest = self._parse_v(before[0][1])
        self.assertEqual((newest, n, names, rest),
                         (codes.PROTOCOL_3_0, 1, ["_pq_.some_option"], [b""]))
        self.assertEqual(rows, [["42"]])
        yield self.assert_pooler_healthy()


class EncryptionRequestTests(BadInputCase):
    def _refused_then_login(self, *requests):
        sock = connect(self.pooler.port)
        try:
            for request in requests:
                sock.sendall(request)
                sock.settimeout(IO_TIMEOUT)
                answer = sock.recv(1)
                if answer != b"N":
                    raise FailTest(
                        f"answer to encryption request: {answer!r}, want b'N'")
            login(self.pooler.port, sock=sock)
            return data_rows(simple_query(sock, "select 1"))
        finally:
            sock.close()

    @defer.inlineCallbacks
    def test_ssl_request_refused_login_continues(self):
        rows = yield in_thread(self._refused_then_login, ssl_request())
        self.assertEqual(rows, [["1"]])
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_gssenc_request_refused_login_continues(self):
        rows = yield in_thread(self._refused_then_login, gssenc_request())
        self.assertEqual(rows, [["1"]])
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_gssenc_then_ssl_then_login(self):
        # libpq with gssencmode=prefer and sslmode=prefer tries both in turn.
        rows = yield in_thread(self._refused_then_login, gssenc_request(), ssl_request())
        self.assertEqual(rows, [["1"]])
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_bytes_pipelined_after_ssl_request(self):
        # The StartupMessage must not be sent before the answer to
        # SSLRequest (CVE-2021-23214 style buffering).
        yield self.assert_fatal(ssl_request() + startup_packet(USER, DB))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_ssl_request_with_payload(self):
        yield self.assert_fatal(raw_packet(struct.pack("!ii", codes.SSL_REQUEST, 0)))
        yield self.assert_pooler_healthy()


class AfterLoginTests(BadInputCase):
    def _login_then_send(self, payload, sqlstate="08P01"):
        sock = login(self.pooler.port)
        try:
            sock.sendall(payload)
            return expect_fatal_and_close(sock, sqlstate)
        finally:
            sock.close()

    def _login_query_then_send(self, payload, sqlstate="08P01"):
        """Like _login_then_send, after a first query went through a server."""
        sock = login(self.pooler.port)
        try:
            check(data_rows(simple_query(sock, "select 1")) == [["1"]])
            sock.sendall(payload)
            return expect_fatal_and_close(sock, sqlstate)
        finally:
            sock.close()

    @defer.inlineCallbacks
    def test_length_below_4(self):
        for ln in (0, 3, -5):
            yield in_thread(self._login_then_send, b"Q" + struct.pack("!i", ln))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_backend_message_type(self):
        yield in_thread(self._login_then_send, msg(b"Z", b"I"))
        yield in_thread(self._login_query_then_send, msg(b"Z", b"I"))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_password_message_after_login(self):
        yield in_thread(self._login_then_send, msg(b"p", b"md5" + b"0" * 32 + b"\0"))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_nul_type_byte(self):
        # e.g. a second StartupMessage after login.
        yield in_thread(self._login_then_send, startup_packet(USER, DB))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_valid_query_then_garbage_in_one_chunk(self):
        yield in_thread(self._login_then_send, query_msg("select 1") + b"\xff\0\0\0\4")
        yield self.assert_pooler_healthy()


class MaxPacketSizeTests(BadInputCase):
    general = "max_packet_size = 4096"

    def _login_then_send(self, payload):
        sock = login(self.pooler.port)
        try:
            sock.sendall(payload)
            return expect_fatal_and_close(sock, "08P01")
        finally:
            sock.close()

    @defer.inlineCallbacks
    def test_query_longer_than_max_packet_size(self):
        sql = "select '" + "x" * 5000 + "'"
        yield in_thread(self._login_then_send, query_msg(sql))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_header_claims_1gb(self):
        yield in_thread(self._login_then_send, b"Q" + struct.pack("!i", 1 << 30))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_query_within_max_packet_size_works(self):
        def run():
            sock = login(self.pooler.port)
            try:
                return data_rows(simple_query(sock, "select length('" + "x" * 3000 + "')"))
            finally:
                sock.close()
        rows = yield in_thread(run)
        self.assertEqual(rows, [["3000"]])
        yield self.assert_pooler_healthy()


class AuthPhaseTests(BadInputCase):
    def _start_then_send(self, payload, sqlstate="08P01"):
        sock = connect(self.pooler.port)
        try:
            start_login(sock)
            sock.sendall(payload)
            return expect_fatal_and_close(sock, sqlstate)
        finally:
            sock.close()

    @defer.inlineCallbacks
    def test_query_instead_of_password(self):
        yield in_thread(self._start_then_send, query_msg("select 1"))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_password_length_below_4(self):
        yield in_thread(self._start_then_send, b"p" + struct.pack("!i", 2))
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_oversized_password_message(self):
        # PostgreSQL caps authentication messages (PG_MAX_AUTH_TOKEN_LENGTH,
        # 65535 bytes) and rejects a longer one at its header; an
        # unauthenticated client must not make the pooler buffer up to 2 GB.
        yield in_thread(self._start_then_send,
                        b"p" + struct.pack("!i", 100_000_000) + b"x" * 1000)
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_wrong_password(self):
        def run():
            sock = connect(self.pooler.port)
            try:
                _, salt = start_login(sock)
                sock.sendall(msg(b"p", md5_response(USER, "not the password", salt)))
                return expect_fatal_and_close(sock, "28P01")
            finally:
                sock.close()
        fields = yield in_thread(run)
        self.assertIn(USER, fields["M"])
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_garbage_password(self):
        yield in_thread(self._start_then_send, msg(b"p", b"\xff\xfe\0"), "28P01")
        yield in_thread(self._start_then_send, msg(b"p", b""), "28P01")
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_unknown_database(self):
        fields = yield self.assert_fatal(startup_packet(USER, "no_such_db"), sqlstate="3D000")
        self.assertIn("no_such_db", fields["M"])
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_unknown_user(self):
        fields = yield self.assert_fatal(startup_packet("no_such_user", DB), sqlstate="28000")
        self.assertIn("no_such_user", fields["M"])
        yield self.assert_pooler_healthy()


class AbandonedConnectionTests(BadInputCase):
    def test_login_timeout_exists(self):
        from pgcat_tw import frontend
        self.assertGreater(frontend.LOGIN_TIMEOUT, 0)
        self.assertLessEqual(frontend.LOGIN_TIMEOUT, 600)

    @defer.inlineCallbacks
    def test_half_startup_then_close(self):
        def run():
            socks = []
            for part in (b"\0\0", startup_packet(USER, DB)[:9], b""):
                s = connect(self.pooler.port)
                if part:
                    s.sendall(part)
                socks.append(s)
            return socks

        socks = yield in_thread(run)
        # The pooler knows about them while they are open ...
        deadline = reactor.seconds() + IO_TIMEOUT
        while len(self.pooler.service.factory.clients) < 3:
            if reactor.seconds() > deadline:
                self.fail("the pooler never saw the three connections")
            yield task.deferLater(reactor, 0.01, lambda: None)
        for s in socks:
            s.close()
        # ... and forgets them when they close.
        yield self.wait_no_clients()
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_close_while_waiting_for_password(self):
        def run():
            s = connect(self.pooler.port)
            start_login(s)
            s.close()
        yield in_thread(run)
        yield self.wait_no_clients()
        yield self.assert_pooler_healthy()


class CancelRequestTests(BadInputCase):
    @defer.inlineCallbacks
    def test_unknown_key_closed_silently(self):
        def run():
            sock = connect(self.pooler.port)
            try:
                sock.sendall(cancel_request(12345, 67890))
                return read_until_closed(sock)
            finally:
                sock.close()
        data = yield in_thread(run)
        self.assertEqual(data, b"")
        yield self.wait_no_clients()
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_wrong_length(self):
        def run(payload):
            sock = connect(self.pooler.port)
            try:
                sock.sendall(payload)
                data = read_until_closed(sock)
            finally:
                sock.close()
            msgs = split_messages(data)
            if msgs:  # an answer is optional; if there is one, it is 08P01
                check([t for t, _ in msgs] == [b"E"], msgs)
                f = error_fields(msgs[0][1])
                check((f.get("S"), f.get("C")) == ("FATAL", "08P01"), f)
            return data

        yield in_thread(run, raw_packet(struct.pack("!iiii", codes.CANCEL_REQUEST, 1, 2, 3)))
        yield in_thread(run, raw_packet(struct.pack("!ii", codes.CANCEL_REQUEST, 1)))
        yield self.wait_no_clients()
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_real_key_of_idle_client_is_harmless(self):
        # A cancel for a logged-in client with no server bound: nothing to
        # cancel, the cancel connection closes and the client keeps working.
        def run():
            sock = connect(self.pooler.port)
            try:
                _, salt = start_login(sock)
                msgs = finish_login(sock, salt)
                key = [b for t, b in msgs if t == b"K"][0]
                pid, secret = struct.unpack("!ii", key)
                c = connect(self.pooler.port)
                try:
                    c.sendall(cancel_request(pid, secret))
                    check(read_until_closed(c) == b"")
                finally:
                    c.close()
                return data_rows(simple_query(sock, "select 7"))
            finally:
                sock.close()
        rows = yield in_thread(run)
        self.assertEqual(rows, [["7"]])
        yield self.assert_pooler_healthy()


class ManyBadClientsTests(BadInputCase):
    @defer.inlineCallbacks
    def test_fifty_garbage_clients_at_once(self):
        payloads = [
            b"GET / HTTP/1.1\r\n\r\n",
            struct.pack("!i", 20000),
            struct.pack("!i", 3) + b"\0" * 8,
            startup_packet(USER, DB, version=PROTO_2_0),
            ssl_request() + startup_packet(USER, DB),
        ]

        def run():
            socks = [connect(self.pooler.port) for _ in range(50)]
            try:
                for i, s in enumerate(socks):
                    s.sendall(payloads[i % len(payloads)])
                for s in socks:
                    expect_fatal_and_close(s, "08P01")
            finally:
                for s in socks:
                    s.close()

        yield in_thread(run)
        yield self.wait_no_clients()
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_bad_clients_while_a_good_one_is_in_a_transaction(self):
        def run():
            good = login(self.pooler.port)
            try:
                simple_query(good, "begin")
                simple_query(good, "create temp table bad_input_t(x int)")
                for payload in (b"GET / HTTP/1.1\r\n\r\n", startup_packet("nobody", DB)):
                    sqlstate = "08P01" if payload.startswith(b"GET") else "28000"
                    send_and_expect_fatal(self.pooler.port, payload, sqlstate)
                simple_query(good, "insert into bad_input_t values (1), (2)")
                rows = data_rows(simple_query(good, "select sum(x) from bad_input_t"))
                simple_query(good, "rollback")
                return rows
            finally:
                good.close()

        rows = yield in_thread(run)
        self.assertEqual(rows, [["3"]])
        yield self.assert_pooler_healthy()


class QueuedClientTests(BadInputCase):
    """Bad input from a client that is queued for a server (pool_size 1,
    another client holds the only connection in a transaction)."""

    pool_size = 1

    @defer.inlineCallbacks
    def test_garbage_while_waiting_for_a_server(self):
        def run():
            holder = login(self.pooler.port)
            try:
                simple_query(holder, "begin")
                waiter = login(self.pooler.port)
                try:
                    waiter.sendall(query_msg("select 1"))
                    time.sleep(0.2)
                    waiter.sendall(b"Z\0\0\0\4")
                    # Answered at once, not after connect_timeout.
                    t0 = time.monotonic()
                    expect_fatal_and_close(waiter, "08P01", timeout=2.0)
                    elapsed = time.monotonic() - t0
                finally:
                    waiter.close()
                rows = data_rows(simple_query(holder, "select 5"))
                simple_query(holder, "commit")
                return rows, elapsed
            finally:
                holder.close()

        rows, elapsed = yield in_thread(run)
        self.assertEqual(rows, [["5"]])
        self.assertLess(elapsed, 2.0)
        yield self.assert_pooler_healthy()


class PipelinedAfterPasswordTests(BadInputCase):
    @defer.inlineCallbacks
    def test_garbage_pipelined_with_password(self):
        def run():
            sock = connect(self.pooler.port)
            try:
                _, salt = start_login(sock)
                sock.sendall(msg(b"p", md5_response(USER, PASSWORD, salt)) + b"Z\0\0\0\4")
                data = read_until_closed(sock)
            finally:
                sock.close()
            msgs = split_messages(data)
            types = [t for t, _ in msgs]
            check(types[0] == b"R" and types[-1] == b"E", msgs)
            f = error_fields(msgs[-1][1])
            check((f.get("S"), f.get("C")) == ("FATAL", "08P01"), f)
            return types

        yield in_thread(run)
        yield self.assert_pooler_healthy()

    @defer.inlineCallbacks
    def test_query_pipelined_with_password(self):
        def run():
            sock = connect(self.pooler.port)
            try:
                _, salt = start_login(sock)
                sock.sendall(msg(b"p", md5_response(USER, PASSWORD, salt))
                             + query_msg("select 11"))
                msgs, _ = read_messages(sock, until=b"Z")   # end of the greeting
                check(msgs[-1] == (b"Z", b"I"), msgs)
                msgs, _ = read_messages(sock, until=b"Z")   # the query's answer
                return data_rows(msgs)
            finally:
                sock.close()

        rows = yield in_thread(run)
        self.assertEqual(rows, [["11"]])
        yield self.assert_pooler_healthy()


class SplitBadHeaderSessionTests(BadInputCase):
    """A bad header split across TCP segments: its first bytes were already
    relayed to the bound server before the violation is detected. The
    server connection must not go back to the pool (or get a reset query)
    with that partial header in its input: the next client, waiting for the
    only server connection (pool_size 1), would hang until RESET_TIMEOUT
    and fail after connect_timeout (3 s in the test config)."""

    pool_mode = "session"
    pool_size = 1

    @defer.inlineCallbacks
    def test_split_bad_length_does_not_poison_the_server(self):
        def run():
            sock = login(self.pooler.port)
            try:
                simple_query(sock, "begin")
                check(data_rows(simple_query(sock, "select 1")) == [["1"]])
                # The server is bound (session mode, or in a transaction).
                # Send the first two bytes of a header, then the rest of it
                # with an invalid length.
                sock.sendall(b"Q\0")
                time.sleep(0.2)
                sock.sendall(b"\0\0\2")
                return expect_fatal_and_close(sock, "08P01")
            finally:
                sock.close()

        yield in_thread(run)
        started = reactor.seconds()
        yield self.assert_pooler_healthy()
        self.assertLess(reactor.seconds() - started, 2.0)


class SplitBadHeaderTransactionTests(SplitBadHeaderSessionTests):
    pool_mode = "transaction"


class SplitBadTypeTests(BadInputCase):
    """Only the type byte of a backend-type message arrives first while a
    server is bound (session mode)."""

    pool_mode = "session"
    pool_size = 1

    @defer.inlineCallbacks
    def test_split_backend_type_byte(self):
        def run():
            sock = login(self.pooler.port)
            try:
                check(data_rows(simple_query(sock, "select 1")) == [["1"]])
                sock.sendall(b"Z")
                time.sleep(0.2)
                sock.sendall(b"\0\0\0\4")
                return expect_fatal_and_close(sock, "08P01")
            finally:
                sock.close()

        yield in_thread(run)
        started = reactor.seconds()
        yield self.assert_pooler_healthy()
        self.assertLess(reactor.seconds() - started, 2.0)
