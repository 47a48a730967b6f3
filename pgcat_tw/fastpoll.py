"""A leaner event dispatch for Twisted's epoll reactor.

EPollReactor.doPoll wraps every ready descriptor's dispatch in
``log.callWithLogger``, which computes the selectable's logPrefix and pushes a
legacy-log context (four Python frames and a dict) before ``_doReadOrWrite``.
For a proxy that is a measurable share of the CPU spent per relayed chunk.
``install(reactor)`` replaces the reactor's ``doIteration`` with a loop that
calls ``_doReadOrWrite`` directly and keeps the one thing the wrapper adds
that matters: an exception escaping dispatch is logged, not fatal. Reads on
plain TCP connections are done inline, and the loop polls again without
going back to mainLoop while no timed call, thread call or stop is due.

How a read gets its bytes depends on the interpreter (``install``'s
``read_into``). CPython: ``os.read(fd, bufferSize)``, which allocates a 64 KiB
``bytes`` and shrinks it in place to what arrived. PyPy: the same call puts a
fresh 64 KiB string in the GC nursery per read, which filled it every few
transactions (about 1,100 minor collections a second at 8,300 tps); there
the socket reads into one preallocated buffer and only the bytes received are
copied out (``recv_into`` and ``memoryview.tobytes``), which cut the pooler's
user CPU per transaction by about 40% (23.6 to 14.2 us, pgbench -S, 64
clients). On CPython that path measured slightly slower (33.7 against 35.8
us), so it stays off there.

TLS connections that ``tlssock`` made (OpenSSL on the socket) are read
inline the same way, with one ``SSL_read`` into tlssock's shared buffer; a
large record (bulk data), no data or an error go to ``tlssock.received``.
Their handshakes, and any event that is not a plain read, take the generic
dispatch.

It touches reactor internals, so it checks for them and does nothing (returns
False) on any other reactor or Twisted layout. Only service/tap code calls it.
"""

import errno
import os
import platform
import select
import sys
import types

from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger

log = Logger()

_EPOLLIN = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1
_PLAIN_TCP = frozenset()
_ACCEPTED = None  # twisted.internet.tcp.Server: connections accepted by a port
_BUFSIZE = 65536  # their (class attribute) bufferSize, read once at install
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
_INTO = None  # read_into: the one receive buffer (a bytearray of _BUFSIZE)
_INTO_VIEW = None  # ... and a memoryview of it
_CLOCK = None  # stats.EventClock set after each poll (install's ``clock``)
# tlssock's established TLS transports, read inline too: their classes, the
# accepted connections' one, and (SSL_read, its buffer and size, the record
# size from which more is read, ffi.unpack, tlssock.received).
_TLS = frozenset()
_TLS_ACCEPTED = None
_TLS_READ = (None, None, 0, 0, None, None)


def _plain_tcp_classes():
    """TCP connection classes whose doRead is Twisted's own (so calling it
    directly is exactly what _doReadOrWrite would do for a read event)."""
    from twisted.internet import tcp

    classes = set()
    for cls in (tcp.Server, tcp.Client):
        if cls.doRead is tcp.Connection.doRead \
                and cls._dataReceived is tcp.Connection._dataReceived \
                and cls.bufferSize == tcp.Connection.bufferSize:
            classes.add(cls)
    return frozenset(classes)


_LONGEST = 2147483  # seconds: the largest timeout epoll_wait takes (as Twisted caps it)


def _fast_do_poll(self, timeout):
    """One call from mainLoop runs as many poll rounds as it can: after a
    round it polls again at once unless something needs mainLoop
    (runUntilCurrent): a timed call due or newly scheduled, a call from
    another thread (signals arrive that way), a stop. That skips three
    Python frames per round (runUntilCurrent, timeout, the loop) without
    delaying anything they would have run.

    Every line here runs once or twice per relayed transaction: the
    reactor's lists are bound to locals once per call (only
    runUntilCurrent, which runs between calls, replaces them), and the
    two-pass ordering costs nothing when a poll reports one connection."""
    if timeout is None:
        timeout = -1
    poll = self._poller.poll
    selectables = self._selectables
    get = selectables.get
    dispatch = self._doReadOrWrite
    seconds = self.seconds
    thread_calls = self.threadCallQueue
    pending = self._pendingTimedCalls
    plain = _PLAIN_TCP
    accepted = _ACCEPTED
    EPOLLIN = _EPOLLIN
    bufsize = _BUFSIZE
    read = os.read  # recv(2) without flags: the same as read(2) on a socket
    into = _INTO
    view = _INTO_VIEW
    clock = _CLOCK
    tls = _TLS
    tls_accepted = _TLS_ACCEPTED
    ssl_read, rbuf, rsize, more_at, unpack, received = _TLS_READ
    while True:
        try:
            batch = poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        if clock is not None:
            # The time of this round's events, for the statistics
            # (stats.EventClock): one clock call per round, none per event.
            clock.now = seconds()
        # Two passes when several connections are ready: reads on accepted
        # connections (a pooler's clients) wait until the others (its
        # servers' answers) are done, so a server whose transaction ended is
        # handed to its next client as early as possible; a client's query
        # read first would only join a queue.
        several = len(batch) > 1
        later = None
        while batch:
            for fd, event in batch:
                selectable = get(fd)
                cls = selectable.__class__  # (NoneType, not in plain, when gone)
                if event == EPOLLIN and cls in plain:
                    if several and cls is accepted:
                        if later is None:
                            later = [(fd, event)]
                        else:
                            later.append((fd, event))
                        continue
                    # The common case: data to read on a TCP connection. The
                    # same steps as _doReadOrWrite -> tcp.Connection.doRead ->
                    # _dataReceived, without their generic checks and frames
                    # (and os.read on the polled descriptor: socket.recv
                    # parses its arguments the slow way).
                    try:
                        try:
                            if into is None:
                                data = read(fd, bufsize)
                            else:
                                # (Copied out before anything else reads.)
                                data = view[:selectable.socket.recv_into(into)].tobytes()
                        except OSError as se:
                            why = None if se.args[0] in _AGAIN else CONNECTION_LOST
                        else:
                            why = selectable.protocol.dataReceived(data) if data \
                                else CONNECTION_DONE
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.failure("unhandled error reading from {selectable}",
                                    selectable=selectable)
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                    continue
                if event == EPOLLIN and cls in tls:
                    if several and cls is tls_accepted:
                        if later is None:
                            later = [(fd, event)]
                        else:
                            later.append((fd, event))
                        continue
                    # The same for a TLS connection (tlssock): one SSL_read
                    # of what OpenSSL reads from the socket; a small record
                    # (a query, an answer) is delivered here, anything else
                    # (a large record: read on; nothing; an error) by
                    # tlssock.received.
                    ssl = selectable._tls_ssl
                    if ssl is None:
                        continue  # lost meanwhile (never pass NULL to OpenSSL)
                    try:
                        n = ssl_read(ssl, rbuf, rsize)
                        if 0 < n < more_at:
                            why = selectable.protocol.dataReceived(unpack(rbuf, n))
                        else:
                            why = received(selectable, n)
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.failure("unhandled error reading from {selectable}",
                                    selectable=selectable)
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                    continue
                if selectable is None:
                    continue
                try:
                    dispatch(selectable, fd, event)
                except Exception:
                    log.failure("unhandled error dispatching {selectable}",
                                selectable=selectable)
            batch = later
            later = None
            several = False
        if thread_calls or self._newTimedCalls or self._justStopped or not self._started:
            return
        if pending:
            timeout = pending[0].time - seconds()
            if timeout <= 0:
                return
            if timeout > _LONGEST:
                timeout = _LONGEST
        else:
            timeout = -1


def _install_tls():
    """Read tlssock's established TLS connections inline (when tlssock is
    usable here; else they go through the generic dispatch)."""
    global _TLS, _TLS_ACCEPTED, _TLS_READ
    try:
        from pgcat_tw import tlssock
    except ImportError:  # pragma: no cover - no pyOpenSSL
        return
    if not tlssock.ESTABLISHED:
        return
    _TLS = tlssock.ESTABLISHED
    _TLS_ACCEPTED = tlssock.ESTABLISHED_ACCEPTED
    _TLS_READ = (tlssock._SSL_read, tlssock._RBUF, tlssock.BUFSIZE, tlssock.MORE_AT,
                 tlssock._unpack, tlssock.received)


def install(reactor, read_into=None, clock=None):
    """Use the lean dispatch loop on an EPollReactor; False if not applicable.
    ``read_into``: read into one reused buffer (see the module's docstring);
    None: only on PyPy. ``clock``: a stats.EventClock whose ``now`` is set
    to the reactor's time after each poll."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    for attr in ("_poller", "_selectables", "_doReadOrWrite", "threadCallQueue",
                 "_newTimedCalls", "_pendingTimedCalls", "_justStopped", "_started"):
        if not hasattr(reactor, attr):
            return False
    global _PLAIN_TCP, _ACCEPTED, _BUFSIZE, _INTO, _INTO_VIEW, _CLOCK
    if getattr(reactor, "_pgcat_fastpoll", False):
        if clock is not None:
            _CLOCK = clock
        return True
    from twisted.internet import tcp

    _PLAIN_TCP = _plain_tcp_classes()
    _ACCEPTED = tcp.Server
    _BUFSIZE = tcp.Connection.bufferSize
    if read_into is None:
        read_into = platform.python_implementation() == "PyPy"
    if read_into:
        _INTO = bytearray(_BUFSIZE)
        _INTO_VIEW = memoryview(_INTO)
    if not hasattr(reactor, "_disconnectSelectable"):
        return False
    _install_tls()
    _CLOCK = clock
    reactor.doIteration = types.MethodType(_fast_do_poll, reactor)
    reactor._pgcat_fastpoll = True
    return True
