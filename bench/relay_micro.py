"""Relay micro-benchmark: transactions and messages per second through the
pooler's Python path on in-memory transports (no sockets, no syscalls).

A real ClientProtocol (work phase) and a real ServerConnection from a real
pool are connected to StringTransports; each round trip is what pgbench -S
does per transaction in transaction mode: the client sends a Query (or
Parse/Bind/Describe/Execute/Sync), the pooler checks a server out, forwards,
the server answers RowDescription/DataRow/CommandComplete/ReadyForQuery, the
pooler forwards and checks the server back in.

    python bench/relay_micro.py [--seconds 3] [--mode simple|extended|both]
                                [--flush-kib 4096]

``--flush-kib N`` also times each event with N KiB copied between events
(evicting the CPU caches, as pgbench and Postgres do on a small machine
between the pooler's events): the "cold" figure, which tracks how much code
and data one transaction touches rather than how fast it runs when warm.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from pgcat_tw.backend import ServerConnection  # noqa: E402
from pgcat_tw.cancel import CancelKeys  # noqa: E402
from pgcat_tw.cluster import Cluster  # noqa: E402
from pgcat_tw.config import parse  # noqa: E402
from pgcat_tw.frontend import ClientFactory, Session  # noqa: E402
from pgcat_tw.protocol import messages as m  # noqa: E402
from pgcat_tw.stats import EventClock  # noqa: E402

# The service's statistics clock: under twistd the poll loop (fastpoll) sets
# ``now`` once per poll round; here ``tick()`` does it once per event, its
# time.time() call counted in (one event per round is what low concurrency
# gives; more events share a round under load).
CLOCK = EventClock(time.time())


def tick(_clock=CLOCK, _time=time.time):
    _clock.now = _time()

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

PARAMS = {"client_encoding": "UTF8", "DateStyle": "ISO, MDY", "TimeZone": "UTC",
          "standard_conforming_strings": "on", "application_name": "bench"}


def build(n_clients=1):
    clock = task.Clock()
    clock.advance(CLOCK.now)  # one time base, as under twistd (time.time)
    config, _ = parse(CONFIG)
    cluster = Cluster(clock, config, clock=CLOCK)
    factory = ClientFactory(clock, lambda: cluster, CancelKeys(), clock=CLOCK)
    up = cluster.user_pools[("db", "u")]
    pool = up.server_pool()

    server = ServerConnection(clock, "127.0.0.1", 5432, "u", "p", "db", clock=CLOCK)
    st = StringTransport()
    server.makeConnection(st)
    server.params.update(PARAMS)
    server.state = "idle"
    server.dataReceived = server._idle_data
    server.ready.callback(server)
    server.pool = pool
    pool.idle.append(server)
    up.reference_params = dict(PARAMS)

    clients = []
    for _ in range(n_clients):
        client = factory.buildProtocol(None)
        ct = StringTransport()
        client.makeConnection(ct)
        client._enter_work_phase(Session("u", "db", user_pool=up, params=dict(PARAMS)))
        clients.append((client, ct))
    if n_clients == 1:
        return clients[0][0], clients[0][1], server, st, pool
    return clients, server, st, pool


def response():
    return (m.row_description([("abalance", 23)]) + m.data_row(["0"])
            + m.command_complete("SELECT 1") + m.READY_IDLE)


def request(mode):
    if mode == "simple":
        return m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;")
    import struct
    parse_ = m._msg(b"P", b"\0" + m.cstr("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
                    + struct.pack("!h", 0))
    bind = m._msg(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, 4) + b"4242" + struct.pack("!h", 0))
    describe = m._msg(b"D", b"P\0")
    execute = m._msg(b"E", b"\0" + struct.pack("!i", 0))
    return parse_ + bind + describe + execute + m.SYNC


def run(mode, seconds):
    client, ct, server, st, pool = build()
    req = request(mode)
    resp = response()
    if mode == "extended":
        resp = m._msg(b"1", b"") + m._msg(b"2", b"") + resp
    n_msgs = (1 if mode == "simple" else 5) + (4 if mode == "simple" else 6)
    n = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    batch = 2000
    while time.perf_counter() < deadline:
        for _ in range(batch):
            tick()
            client.dataReceived(req)
            tick()
            server.dataReceived(resp)
        n += batch
        st.clear()
        ct.clear()
    elapsed = time.perf_counter() - t0
    assert client.server is None and len(pool.idle) == 1, "server not released"
    per_txn_us = elapsed / n * 1e6
    print(f"{mode:9s} {n / elapsed:10.0f} txn/s {n * n_msgs / elapsed:11.0f} msg/s "
          f"{per_txn_us:6.2f} us/txn (Python path only, no syscalls)")
    return per_txn_us


def run_contended(mode, seconds):
    """Two clients, one server: every checkout queues behind the other
    client's transaction (the 64-clients-on-4-servers case)."""
    clients, server, st, pool = build(2)
    (a, at), (b, bt) = clients
    req = request(mode)
    resp = response()
    if mode == "extended":
        resp = m._msg(b"1", b"") + m._msg(b"2", b"") + resp
    a.dataReceived(req)            # a holds the server
    n = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    batch = 2000
    while time.perf_counter() < deadline:
        for _ in range(batch):
            tick()
            b.dataReceived(req)    # b queues
            tick()
            server.dataReceived(resp)  # a's answer: server goes to b
            tick()
            a.dataReceived(req)    # a queues
            tick()
            server.dataReceived(resp)  # b's answer: server goes to a
        n += 2 * batch
        st.clear()
        at.clear()
        bt.clear()
    elapsed = time.perf_counter() - t0
    print(f"{mode:9s} {n / elapsed:10.0f} txn/s  {elapsed / n * 1e6:6.2f} us/txn "
          "contended: every checkout waits (Python path only)")


def run_cold(mode, flush_kib, rounds=3, n=2000):
    """Per-transaction time with the caches flushed before every event
    (best of ``rounds``), uncontended and contended."""
    flush = bytearray(flush_kib * 1024)
    req = request(mode)
    resp = response()
    if mode == "extended":
        resp = m._msg(b"1", b"") + m._msg(b"2", b"") + resp
    clock = time.perf_counter

    def once(contended):
        if contended:
            clients, server, st, pool = build(2)
            (a, at), (b, bt) = clients
            a.dataReceived(req)
        else:
            a, at, server, st, pool = build()
            b = a
        total = 0.0
        for i in range(n):
            bytes(flush)
            t0 = clock()
            tick()
            b.dataReceived(req)
            total += clock() - t0
            bytes(flush)
            t0 = clock()
            tick()
            server.dataReceived(resp)
            total += clock() - t0
            if contended:
                a, b = b, a
            if i % 500 == 0:
                st.clear()
        return total / n * 1e6

    best = [min(once(c) for _ in range(rounds)) for c in (False, True)]
    print(f"{mode:9s} cold ({flush_kib} KiB flushed between events): "
          f"{best[0]:6.2f} us/txn uncontended, {best[1]:6.2f} us/txn contended")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--mode", choices=["simple", "extended", "both"], default="both")
    ap.add_argument("--flush-kib", type=int, default=0,
                    help="also time each event after copying this many KiB (cold caches)")
    args = ap.parse_args()
    for mode in (["simple", "extended"] if args.mode == "both" else [args.mode]):
        run(mode, args.seconds)
        run_contended(mode, args.seconds)
        if args.flush_kib:
            run_cold(mode, args.flush_kib)


if __name__ == "__main__":
    main()
