"""Large results and backpressure through the pooler.

While a big result or COPY flows, a LoopingCall in the reactor samples how
many bytes the pooler holds in Twisted's write buffers (towards the client
and towards the server). With backpressure working, the faster peer is
paused whenever the slower one's buffer fills, so these stay small no matter
how much data goes through.
"""

import hashlib
import socket
import struct
import time

import psycopg
from twisted.internet import defer, reactor, task

from tests.pgharness import USERS
from tests.support import PoolerTestCase, error_fields, in_thread, read_messages, startup_packet

MB = 1024 * 1024
BUFFER_BOUND = 4 * MB


def buffered(transport):
    """Bytes queued in a Twisted TCP transport's write buffer (0 if unknown)."""
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return 0


class BufferSampler:
    """Samples, in the reactor, the write buffers of every client of the
    pooler and of the server bound to it."""

    def __init__(self, factory, interval=0.005):
        self.factory = factory
        self.interval = interval
        self.client_max = 0
        self.server_max = 0
        self.samples = 0
        self.bound_samples = 0
        self.server_paused = 0   # bound server not being read: paused by backpressure
        self.client_paused = 0   # bound client not being read
        self._lc = task.LoopingCall(self.sample)

    def start(self):
        self._lc.start(self.interval, now=True)

    def stop(self):
        if self._lc.running:
            self._lc.stop()

    def sample(self):
        self.samples += 1
        readers = None
        for client in list(self.factory.clients):
            ct = client.transport
            if ct is not None:
                self.client_max = max(self.client_max, buffered(ct))
            server = client.server
            if server is None or server.transport is None:
                continue
            st = server.transport
            self.bound_samples += 1
            self.server_max = max(self.server_max, buffered(st))
            if readers is None:
                readers = reactor.getReaders()
            if st not in readers:
                self.server_paused += 1
            if ct is not None and ct not in readers:
                self.client_paused += 1

    def report(self):
        return (f"samples={self.samples} bound={self.bound_samples} "
                f"client_max={self.client_max} server_max={self.server_max} "
                f"server_paused={self.server_paused} client_paused={self.client_paused}")


# --- a raw protocol client (exact byte counts, control over reading) -------------

def raw_connect(port, user="pgcat_md5", db="pgcat_test"):
    """Log in through the pooler with md5 on a blocking socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(startup_packet(user, db))
    msgs, closed = read_messages(sock, until=b"R")
    if not msgs or msgs[-1][0] != b"R":
        raise AssertionError(f"no authentication request: {msgs!r} closed={closed}")
    body = msgs[-1][1]
    (code,) = struct.unpack("!i", body[:4])
    if code == 5:
        salt = body[4:8]
        inner = hashlib.md5((USERS[user] + user).encode()).hexdigest()
        pw = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"
        sock.sendall(b"p" + struct.pack("!i", len(pw) + 4) + pw)
        msgs, closed = read_messages(sock, until=b"Z")
    if not msgs or msgs[-1][0] != b"Z":
        errs = [error_fields(b) for t, b in msgs if t == b"E"]
        raise AssertionError(f"login failed: {errs or msgs!r}")
    return sock


def query_message(sql):
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


class StreamCounter:
    """Walks message headers of a backend byte stream: counts CopyData and
    DataRow messages and their payload bytes (without buffering them),
    collects errors, and notes ReadyForQuery."""

    def __init__(self):
        self.buf = b""
        self.skip = 0
        self.total = 0
        self.counts = {}
        self.payload = {}
        self.errors = []
        self.done = False

    def feed(self, data):
        self.total += len(data)
        if self.skip:
            if len(data) <= self.skip:
                self.skip -= len(data)
                return
            data = data[self.skip:]
            self.skip = 0
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        n = len(buf)
        counts, payload = self.counts, self.payload
        while n - pos >= 5:
            t = buf[pos]
            (ln,) = struct.unpack_from("!i", buf, pos + 1)
            end = pos + 1 + ln
            if t == 0x64 or t == 0x44:  # CopyData, DataRow: counted, never kept
                counts[t] = counts.get(t, 0) + 1
                payload[t] = payload.get(t, 0) + ln - 4
                if end > n:
                    self.skip = end - n
                    return
            else:
                if end > n:
                    break
                if t == 0x45:  # ErrorResponse
                    self.errors.append(error_fields(buf[pos + 5:end]))
                elif t == 0x5A:  # ReadyForQuery
                    self.done = True
            pos = end
        self.buf = buf[pos:]


def slow_read_query(port, sql, rate_bytes_per_s, on_progress=None):
    """Run ``sql`` on a raw connection and read the answer no faster than
    ``rate_bytes_per_s``. Returns the StreamCounter and the elapsed time."""
    sock = raw_connect(port)
    try:
        sock.settimeout(60)
        sock.sendall(query_message(sql))
        sc = StreamCounter()
        start = time.monotonic()
        while not sc.done:
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed after {sc.total} bytes")
            sc.feed(data)
            ahead = sc.total / rate_bytes_per_s - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        elapsed = time.monotonic() - start
        sock.sendall(b"X\x00\x00\x00\x04")
        return sc, elapsed
    finally:
        sock.close()


ROWS_200MB = 200_000
COPY_200MB = (f"COPY (select repeat('x', 1000) from generate_series(1, {ROWS_200MB})) "
              "TO STDOUT")


class LargeMixin:
    timeout = 300
    pool_size = 1

    def sampler(self):
        s = BufferSampler(self.pooler.service.factory)
        s.start()
        self.addCleanup(s.stop)
        return s

    @defer.inlineCallbacks
    def test_slow_reader_bounds_pooler_buffers(self):
        """200 MB of COPY TO STDOUT read at ~50 MB/s: the pooler stops
        reading the (much faster) server while the client's buffer is full,
        so it never holds more than a few buffers' worth."""
        s = self.sampler()
        sc, elapsed = yield in_thread(slow_read_query, self.pooler.port, COPY_200MB, 50 * MB)
        s.stop()
        self.assertEqual(sc.errors, [])
        self.assertEqual(sc.counts.get(0x64), ROWS_200MB)
        self.assertEqual(sc.payload.get(0x64), ROWS_200MB * 1001)   # 1000 x + newline
        self.assertGreater(sc.total, 200 * 1000 * 1000)
        self.assertGreater(s.bound_samples, 50, s.report())
        self.assertLess(s.client_max, BUFFER_BOUND, s.report())
        self.assertLess(s.server_max, BUFFER_BOUND, s.report())
        self.assertGreater(s.server_paused, 0,
                           "the server connection was never paused: " + s.report())

    @defer.inlineCallbacks
    def test_client_disconnects_mid_result(self):
        """A client that goes away after ~1 MB of a huge result: the next
        client on the (single-connection) pool is served at once, and the
        big query does not keep running on the server."""
        marker = f"mid_result_{int(time.time() * 1000)}"
        sql = (f"select repeat('x', 1000), '{marker}' "
               "from generate_series(1, 20000000)")  # ~20 GB if read to the end

        def read_then_close():
            sock = raw_connect(self.pooler.port)
            sock.sendall(query_message(sql))
            got = 0
            while got < MB:
                data = sock.recv(65536)
                if not data:
                    break
                got += len(data)
            sock.close()
            return got

        got = yield in_thread(read_then_close)
        self.assertGreaterEqual(got, MB)

        def next_client():
            t0 = time.monotonic()
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                v = conn.execute("select 'next client'").fetchone()[0]
            return v, time.monotonic() - t0

        v, took = yield in_thread(next_client)
        self.assertEqual(v, "next client")
        self.assertLess(took, 2.5)

        q = ("select count(*) from pg_stat_activity where usename = 'pgcat_md5' "
             f"and state = 'active' and query like '%{marker}%' and pid <> pg_backend_pid()")
        deadline = time.monotonic() + 5
        while True:
            n = yield self.primary_sql(q)
            if n == "0" or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(n, "0", "the abandoned query is still running on the server")


class TransactionLargeTests(LargeMixin, PoolerTestCase):
    pool_mode = "transaction"

    @defer.inlineCallbacks
    def test_large_select_psycopg(self):
        """1e6 rows of ~100 bytes through a client-side cursor: every row
        arrives intact and in order."""
        nrows = 1_000_000
        sql = ("select g, md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text) "
               f"from generate_series(1, {nrows}) g")

        def run():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                cur = conn.cursor()
                cur.execute(sql)
                count = 0
                total_len = 0
                bad = []
                h = lambda i: hashlib.md5(str(i).encode()).hexdigest()  # noqa: E731
                expected_g = 1
                while True:
                    rows = cur.fetchmany(10000)
                    if not rows:
                        break
                    for g, s in rows:
                        if g != expected_g or (g % 997 == 0 and s != h(g) + h(g + 1) + h(g + 2)):
                            bad.append(g)
                        expected_g += 1
                        total_len += len(s)
                    count += len(rows)
                after = conn.execute("select 'after'").fetchone()[0]
            return count, total_len, bad[:10], after

        s = self.sampler()
        count, total_len, bad, after = yield in_thread(run)
        s.stop()
        self.assertEqual(count, nrows)
        self.assertEqual(total_len, nrows * 96)
        self.assertEqual(bad, [])
        self.assertEqual(after, "after")
        self.assertLess(s.client_max, BUFFER_BOUND, s.report())

    @defer.inlineCallbacks
    def test_large_select_checksum(self):
        """The same kind of result compared with an aggregate computed on the
        primary directly."""
        nrows = 300_000
        expr = "repeat(chr(65 + (g % 26)), 100 + (g % 7))"
        expected = yield self.primary_sql(
            f"select count(*) || ' ' || sum(length({expr})) || ' ' || "
            f"md5(string_agg({expr}, ',' order by g)) from generate_series(1, {nrows}) g")

        def run():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                rows = conn.execute(f"select {expr} from generate_series(1, {nrows}) g "
                                    "order by g").fetchall()
            vals = [r[0] for r in rows]
            md5 = hashlib.md5(",".join(vals).encode()).hexdigest()
            return f"{len(vals)} {sum(map(len, vals))} {md5}"

        got = yield in_thread(run)
        self.assertEqual(got, expected)

    @defer.inlineCallbacks
    def test_copy_in_50mb(self):
        """~50 MB of COPY FROM STDIN: all rows arrive, and the pooler's
        buffer towards the server stays bounded."""
        table = f"big_in_{int(time.time() * 1000)}"
        yield self.primary_sql(f"create unlogged table {table} (a int, b text); "
                               f"alter table {table} owner to pgcat_md5")
        self.addCleanup(self.primary_sql, f"drop table if exists {table}")
        nrows = 50_000
        payload = "y" * 1000

        def run():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                cur = conn.cursor()
                with cur.copy(f"COPY {table} (a, b) FROM STDIN") as copy:
                    chunk = []
                    for i in range(nrows):
                        chunk.append(f"{i}\t{payload}\n")
                        if len(chunk) == 500:
                            copy.write("".join(chunk))
                            chunk = []
                    if chunk:
                        copy.write("".join(chunk))
                return cur.rowcount

        s = self.sampler()
        n = yield in_thread(run)
        s.stop()
        self.assertEqual(n, nrows)
        out = yield self.primary_sql(f"select count(*), sum(a), sum(length(b)) from {table}")
        self.assertEqual(out, f"{nrows}|{sum(range(nrows))}|{nrows * 1000}")
        self.assertGreater(s.bound_samples, 0, s.report())
        self.assertLess(s.server_max, BUFFER_BOUND, s.report())
        self.assertLess(s.client_max, BUFFER_BOUND, s.report())


class SessionLargeTests(LargeMixin, PoolerTestCase):
    pool_mode = "session"
