"""pgcat_tw.fastpoll on a real epoll reactor, in a child process (the suite's
own reactor is trial's and must not be modified).

The child relays ping-pong traffic over loopback TCP without pause, so the
dispatch loop could poll forever without returning to mainLoop. It checks
that, meanwhile, timed calls still fire on time, calls from another thread
run, a protocol that raises is logged and disconnected without stopping the
loop, reactor.stop() ends it, and in a poll that reports both kinds of
connection, outgoing ones (a pooler's servers) are read before accepted ones.
"""

import json
import os
import sys

from twisted.internet import defer, utils
from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, signal, sys, threading, time
signal.alarm(10)  # a loop that never returns to mainLoop never stops: fail, don't hang
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor, protocol
from twisted.logger import globalLogPublisher
from pgcat_tw import fastpoll
from pgcat_tw.stats import EventClock

import os
read_into = {"": None, "0": False, "1": True}[os.environ.get("FASTPOLL_READ_INTO", "")]
clock = EventClock(0.0)
result = {"installed": fastpoll.install(reactor, read_into=read_into, clock=clock),
          "round_trips": 0,
          "ticks": [], "thread_call": False, "errors_logged": 0, "bad_closed": False,
          "order": [], "read_into": fastpoll._INTO is not None, "bulk": None}

def observe(event):
    if event.get("log_failure") is not None:
        result["errors_logged"] += 1
globalLogPublisher.addObserver(observe)

class Echo(protocol.Protocol):
    def dataReceived(self, data):
        if data == b"boom":
            raise RuntimeError("boom")
        self.transport.write(data)

class Pinger(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"ping")
    def dataReceived(self, data):
        result["round_trips"] += 1
        self.transport.write(b"ping")

class Bad(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"boom")
    def connectionLost(self, reason):
        result["bad_closed"] = True

class Recorder(protocol.Protocol):
    side = None
    def connectionMade(self):
        pair[self.side] = self
    def dataReceived(self, data):
        result["order"].append(self.side)

class Accepted(Recorder):
    side = "accepted"

class Outgoing(Recorder):
    side = "outgoing"

pair = {}

# 1 MiB in many chunks, every chunk kept: with the reused receive buffer,
# a chunk that were a view of it would be overwritten by the next read.
BULK = bytes(range(256)) * 4096

class BulkSender(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(BULK)
        self.transport.loseConnection()

class BulkReceiver(protocol.Protocol):
    def connectionMade(self):
        self.chunks = []
    def dataReceived(self, data):
        self.chunks.append(data)
    def connectionLost(self, reason):
        result["bulk"] = {"intact": b"".join(self.chunks) == BULK,
                          "all_bytes": all(type(c) is bytes for c in self.chunks),
                          "chunks": len(self.chunks)}

def both_readable():
    # The accepted side becomes readable first; the next poll reports both.
    pair["outgoing"].transport.socket.send(b"a")
    pair["accepted"].transport.socket.send(b"b")

f = protocol.Factory.forProtocol(Echo)
port = reactor.listenTCP(0, f, interface="127.0.0.1")
num = port.getHost().port
start = time.monotonic()

def tick():
    result["ticks"].append(round(time.monotonic() - start, 3))
    if len(result["ticks"]) < 10:
        reactor.callLater(0.02, tick)

def from_thread():
    result["thread_call"] = True

def connect(proto):
    protocol.ClientCreator(reactor, proto).connectTCP("127.0.0.1", num)

reactor.callWhenRunning(connect, Pinger)
reactor.callLater(0.05, connect, Bad)
reactor.callLater(0.02, tick)
port2 = reactor.listenTCP(0, protocol.Factory.forProtocol(Accepted), interface="127.0.0.1")
reactor.callWhenRunning(lambda: protocol.ClientCreator(reactor, Outgoing).connectTCP(
    "127.0.0.1", port2.getHost().port))
reactor.callLater(0.3, both_readable)
port3 = reactor.listenTCP(0, protocol.Factory.forProtocol(BulkSender), interface="127.0.0.1")
reactor.callWhenRunning(lambda: protocol.ClientCreator(reactor, BulkReceiver).connectTCP(
    "127.0.0.1", port3.getHost().port))
threading.Timer(0.1, reactor.callFromThread, (from_thread,)).start()
reactor.callLater(0.5, reactor.stop)
reactor.run()
result["elapsed"] = round(time.monotonic() - start, 3)
# The loop set the event clock to the reactor's time at its last poll.
result["clock_lag"] = reactor.seconds() - clock.now
print(json.dumps(result))
'''


class FastPollTests(unittest.TestCase):
    # Both ways of reading (fastpoll's read_into), whatever the interpreter
    # running the suite: os.read (CPython's default) and the reused buffer
    # (PyPy's).
    read_into = "0"

    @defer.inlineCallbacks
    def test_busy_loop_still_serves_timers_threads_and_stop(self):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   FASTPOLL_READ_INTO=self.read_into)
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-c", CHILD], env=env)
        self.assertEqual(code, 0, err.decode(errors="replace"))
        r = json.loads(out.decode().strip().splitlines()[-1])
        self.assertTrue(r["installed"])
        self.assertEqual(r["read_into"], self.read_into == "1")
        # A bulk transfer arrives whole, as bytes, in several reads.
        self.assertEqual(r["bulk"], {"intact": True, "all_bytes": True,
                                     "chunks": r["bulk"]["chunks"]})
        self.assertGreater(r["bulk"]["chunks"], 1)
        # Traffic flowed without pause through the inline read path ...
        self.assertGreater(r["round_trips"], 500)
        # ... and the timer chain still ran at its pace (10 ticks, 20 ms
        # apart, done well before the stop at 0.5 s).
        self.assertEqual(len(r["ticks"]), 10, r["ticks"])
        self.assertLess(r["ticks"][-1], 0.45, r["ticks"])
        self.assertTrue(r["thread_call"])
        # The protocol that raised was logged and disconnected; the loop
        # went on (the pinger kept going after it, until the stop).
        self.assertEqual(r["errors_logged"], 1)
        self.assertTrue(r["bad_closed"])
        self.assertLess(r["elapsed"], 2.0)
        # Both ends of one connection readable in the same poll: the
        # outgoing one (a pooler's server) is read first, though its data
        # arrived second.
        self.assertEqual(r["order"], ["outgoing", "accepted"])
        # The statistics' EventClock follows the reactor's time, poll by poll.
        self.assertGreaterEqual(r["clock_lag"], 0.0)
        self.assertLess(r["clock_lag"], 0.5)


class FastPollReadIntoTests(FastPollTests):
    read_into = "1"
