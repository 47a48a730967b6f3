"""One ClientProtocol per application connection, and its factory.

A connection goes through phases, each with its own object or handler
(``self.dataReceived`` is swapped, nothing branches per message):

startup   ``startup.Startup``: SSLRequest/TLS, GSSENC, Cancel, version.
login     ``login.Login``: pool lookup, authentication, the greeting.
          Both are dropped after the greeting, which hands a
          ``session.Session`` record and the unconsumed bytes to
          ``logged_in``.
work      this class: every chunk the client sends is scanned
          (relay.ClientScanner) and, when a server is bound, forwarded to it
          verbatim. Without a server the chunk is held and a server is
          checked out: synchronously when one is idle (inline here), through
          the pool's queue otherwise (``checkout.Checkout``). In transaction
          mode the server goes back to the pool at the first ReadyForQuery
          'I' that leaves no request of the client unanswered; in session
          mode at disconnect, after ``DISCARD ALL``. The SQL the pooler
          answers itself is ``commands.Commands``.

The server connection calls this class only through ``backend.IBoundClient``.
"""

import itertools
import re
import struct

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pgcat_tw.admin.console import Console
from pgcat_tw.admin.control import Control
from pgcat_tw.backend import IBoundClient, set_keepalive
from pgcat_tw.errors import PgError, ProtocolViolation, ServerConnectionFailed
from pgcat_tw.frontend.checkout import Checkout
from pgcat_tw.frontend.commands import MAYBE_COMMAND, Commands, whole_query
from pgcat_tw.frontend.limits import ClientLimits
from pgcat_tw.frontend.routing import AUTO, Routing
from pgcat_tw.frontend.login import Login
from pgcat_tw.frontend.plugins import PluginHooks
from pgcat_tw.frontend.startup import Startup, check_alpn
from pgcat_tw.pool import Waiter
from pgcat_tw.prepared import Rewriter, ServerStatements
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import FramingError
from pgcat_tw.relay import ClientScanner, ParameterValues, writer_for
from pgcat_tw.stats import LiveClock

log = Logger()

LOGIN_TIMEOUT = 60.0     # seconds a client may take to log in (PgBouncer's default)
HOLD_LIMIT = 65536       # bytes held for a waiting client before it is paused
REQUEST_KEEP_LIMIT = 65536  # request bytes kept for a possible re-send (see request_chunks)
# Session mode (ClientProtocol._watch): names in a client's (lower-cased)
# text that may leave session state behind without a telling command tag;
# a false hit (a column called "temperature") only costs a reset.
STATEFUL_TEXT = re.compile(rb"advisory|set_config|temp|nextval|setval|dblink")
WATCH_LIMIT = 16384
_LEN = struct.Struct("!i")
_ids = itertools.count(1)


def _shutdown_error():
    return PgError("terminating connection due to administrator command",
                   sqlstate="57P01", severity="FATAL")


class ClientFactory(Factory):
    noisy = False
    draining = False
    tls = None            # tls.TLSState of the service (None: no TLS at all)
    auth_queries = None   # auth_query.AuthQueries (made on first use if None)
    admin_control = None  # admin.control.Control lent by the service

    def __init__(self, reactor, get_cluster, cancel_keys, clock=None):
        self.reactor = reactor
        self.get_cluster = get_cluster  # callable: the Cluster in force now
        self.cancel_keys = cancel_keys
        # stats.EventClock of the service (the loop sets it), else one that
        # reads the reactor's time.
        self.clock = clock if clock is not None else LiveClock(reactor.seconds)
        self.clients = set()
        self.limits = ClientLimits()

    def buildProtocol(self, addr):
        p = ClientProtocol(self)
        p.peer = addr
        return p


@implementer(IBoundClient)
class ClientProtocol(Checkout, Commands, Routing, PluginHooks, Protocol):
    # The work phase's per-transaction attributes are slots (faster than
    # instance-dict entries on CPython, see backend.ServerConnection); the
    # rest, and the class-level defaults below, stay in the instance dict.
    __slots__ = ("scanner", "server", "user_pool", "transaction_mode", "params",
                 "_server_transport", "_write_server", "_held", "_held_len",
                 "_paused_waiting", "_waiting", "_waiter", "_wait_epoch", "_checking_out",
                 "role", "primary_reads", "request_chunks", "_request_bytes", "rewriter",
                 "clock", "writer", "_closing", "draining", "transport", "connected",
                 "session", "_watch_text", "_text_state")

    peer = None
    shard = 0                 # shard of the next transaction (set by sharding)
    tls_direct = False        # the connection began with a TLS ClientHello
    counted = None            # (database, user) while counted by the client limits
    notified_wait = None      # the wait (its start) query_wait_notify told about
    idle_mark = None          # (bytes received, since) for client_idle_timeout

    def __init__(self, factory):
        self.factory = factory
        self.transport = None
        self.connected = 0
        self.reactor = factory.reactor
        self.connected_at = self.reactor.seconds()
        self.user = None
        self.database = None
        self.session = None           # session.Session once logged in
        self.key = None               # (pid, secret) for CancelRequest
        self.writer = None            # how servers write to this client
        self._closing = False
        self.draining = False
        self._startup = None
        self._login = None
        self._login_timer = None
        # Work-phase state: set by _enter_work_phase (placeholders here, in
        # a fixed order, so every instance has the same attribute layout).
        self.user_pool = None
        self.transaction_mode = True
        self.params = None
        self.scanner = None
        self.server = None
        self._server_transport = None
        self._write_server = None
        self._held = []
        self._held_len = 0
        self._paused_waiting = False
        self._waiting = None          # (pool, Waiter) while queued for a server
        self._waiter = None           # the one Waiter this client queues with
        self._wait_epoch = -1         # the balancer epoch its pool was chosen under
        self._checking_out = False
        self._entry = None            # the work phase's dataReceived (see _enter_work_phase)
        self.role = "any"
        self.primary_reads = False
        # Chunks sent to the current server since it was bound (transaction
        # mode), so a read whose server dies before answering can be re-sent
        # elsewhere; None when not kept (session mode, or too large).
        self.request_chunks = None
        self._request_bytes = 0
        self.rewriter = None          # prepared.Rewriter in transaction mode with a cache
        # Session mode: the client's text is watched for state no command
        # tag shows (_watch) until it is found (``_text_state``).
        self._watch_text = False
        self._text_state = False
        # Statistics: the time of the event being handled (stats.EventClock),
        # an id for the admin console.
        self.clock = factory.clock
        self.id = next(_ids)

    # --- connection -----------------------------------------------------------

    def connectionMade(self):
        self.factory.clients.add(self)
        self.writer = writer_for(self.transport)
        g = self.factory.get_cluster().config.general
        set_keepalive(self.transport, g.tcp_keepalives_idle, g.tcp_keepalives_interval,
                      g.tcp_keepalives_count, g.tcp_user_timeout)
        self._login_timer = self.reactor.callLater(LOGIN_TIMEOUT, self._login_timeout)
        self._startup = Startup(self)
        self.dataReceived = self._startup.data_received

    def _login_timeout(self):
        self._login_timer = None
        self._fatal(ProtocolViolation("login timeout: no complete startup and authentication "
                                      f"within {LOGIN_TIMEOUT:.0f} s", sqlstate="08P01"))

    def _send_error(self, err):
        if self.transport is not None and not self._closing:
            self.transport.write(err.to_message())

    def _fatal(self, err):
        """Tell the client (FATAL) and close."""
        if self._closing:
            return
        if err.severity not in ("FATAL", "PANIC"):
            err.severity = "FATAL"
        self._send_error(err)
        self._close()

    def _close(self):
        self._closing = True
        self.transport.loseConnection()

    def handshakeCompleted(self):
        """IHandshakeListener (declared once TLS starts)."""
        if self.tls_direct:
            check_alpn(self)

    # --- from startup to the work phase ------------------------------------------------

    def begin_login(self, params, startup, rest):
        """The startup phase read a StartupMessage: the login phase runs."""
        self._startup = None
        self._login = login = Login(self, params, startup, rest)
        login.start()

    def logged_in(self, session, rest):
        """The client was greeted: the login phase is over."""
        self._login = None
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        if session.admin:
            self._enter_console(session, rest)
        else:
            self._enter_work_phase(session, rest)

    def _enter_console(self, session, rest=b""):
        """An admin login: the console takes the connection (no scanner,
        waiter or checkout state is ever made)."""
        self.session = session
        self.user, self.database = session.user, session.database
        self.key = session.key
        control = self.factory.admin_control
        if control is None:
            control = self.factory.admin_control = Control(
                self.reactor, self.factory.get_cluster, lambda: self.factory.clients)
        self._console = c = Console(self, session, control)
        self.dataReceived = c.data_received
        if rest:
            c.data_received(rest)

    def _enter_work_phase(self, session, rest=b""):
        self.session = session
        self.user, self.database = session.user, session.database
        self.key = session.key
        up = self.user_pool = session.user_pool
        pool_cfg = up.pool_cfg
        self.transaction_mode = up.mode == "transaction"
        router = up.router
        # The role SET SERVER ROLE would set ('auto': the parser decides), and
        # the role of the next checkout (a router recomputes it per transaction).
        self.role_setting = AUTO if router is not None and router.splitting \
            else pool_cfg.default_role
        self.role = pool_cfg.default_role
        self.primary_reads = pool_cfg.primary_reads_enabled
        self._watch_text = not self.transaction_mode
        if self.transaction_mode and up.statement_cache is not None:
            self.rewriter = Rewriter(up.statement_cache)
        params = session.params
        if type(params) is not ParameterValues:
            params = session.params = ParameterValues(params or {})
        self.params = params
        self.scanner = ClientScanner(self.factory.get_cluster().config.general.max_packet_size)
        self.scanner.params = params
        self._waiter = Waiter(self._got_server, self._checkout_failed, 0.0)
        # The work phase's entry: _work_data, or the plugins' hook before
        # it for pools whose plugins inspect queries (PluginHooks).
        self._entry = self.dataReceived = self._work_entry()
        if rest:
            self._entry(rest)

    # --- work phase ---------------------------------------------------------------------

    def _work_data(self, data):
        # The relay's hot path (one block: every chunk a client sends runs
        # it, and each extra call costs, docs/architecture.rst rule 9).
        sc = self.scanner
        pending = sc.pending
        if self._watch_text:
            self._watch(data)
        try:
            sc.feed(data)
        except FramingError as e:
            self._protocol_error(e)
            return
        if sc.terminate_at is not None:
            self._on_terminate(data)
            return
        if sc.named_parse and self.transaction_mode and self.rewriter is None:
            self._reject_named_parse(data)
            return
        st = self._server_transport
        if st is not None:
            # One whole command-shaped simple Query (an anchored probe, no
            # allocation) that the pooler may answer itself.
            if data[0] == 81 and self.transaction_mode and sc.pending == 1 \
                    and MAYBE_COMMAND.match(data, 5) is not None and whole_query(data) \
                    and self.server.scanner.at_boundary and self._sql_command(data, True):
                return
            if pending <= 0:
                # A request after everything was answered: its query time
                # starts now (stats).
                self.server.scanner.query_start = self.clock.now
            rw = self.rewriter
            if rw is not None:
                data = rw.process(data, self.server.stmts)
                if data:
                    self._write_server(st, data, self.transport)
            else:
                self._write_server(st, data, self.transport)
                rc = self.request_chunks
                if rc is not None:
                    self._request_bytes += len(data)
                    if self._request_bytes > REQUEST_KEEP_LIMIT:
                        self.request_chunks = None
                    else:
                        rc.append(data)
            if sc.copy_ended:
                self._after_copy_end()
            return
        if data[0] == 81 and not self._checking_out and sc.pending == 1 and not self._held \
                and MAYBE_COMMAND.match(data, 5) is not None and whole_query(data):
            answered = self._answer_between_transactions(data)
            if answered is True:
                return
            if answered:
                data = answered   # its leading custom commands were answered
        elif data[0] == 80 and not self._checking_out and not self._held and len(data) > 6 \
                and data[5] == 0 and MAYBE_COMMAND.match(data, 6) is not None \
                and self._answer_extended_custom(data):
            return
        if self.rewriter is not None and not self._checking_out and not self._held \
                and data[0] == codes.F_PARSE and sc.at_boundary \
                and self._parse_answered_locally(data):
            return
        if not self._checking_out:
            # Fast paths: an idle server of the balancer's pick, or else a
            # place in that address's queue (no idle server there at all).
            up = self.user_pool
            router = up.router
            if router is not None and not self._held and self._route(data, router):
                return   # answered: the router refused it
            bal = up.balancer
            server = bal.take_idle(self.role, self.primary_reads, self.shard)
            self._checking_out = True
            self._held.append(data)
            self._held_len += len(data)
            if server is not None:
                self._wait_epoch = bal.epoch
                self._got_server(server)
                return
            pool = bal.picked
            if pool is not None and not pool.idle and not pool.closed and not up.closed:
                self._tried = None
                w = self._waiter
                self._waiting = (pool, w)
                self._wait_epoch = bal.epoch
                pool.enqueue(w)
                return
            self._checkout(False)
            return
        self._held.append(data)
        self._held_len += len(data)
        if self._held_len > HOLD_LIMIT and not self._paused_waiting:
            # Stop reading a client that keeps sending while it waits.
            self._paused_waiting = True
            self.transport.pauseProducing()

    def _parse_answered_locally(self, data):
        """A Parse the shared statement cache can answer without a server."""
        reply = self.rewriter.answer_locally(data)
        if reply is None:
            return False
        sc = self.scanner
        sc.pending = 0
        sc.unsynced = False
        self.transport.write(reply)
        return True

    def _protocol_error(self, err):
        # Whatever reached a server so far leaves it in an unknown state
        # (possibly a partial message): it is closed, never reset and reused.
        if self.server is not None:
            self.scanner.unsynced = True
        self._fatal(err)

    def _on_terminate(self, data):
        sc = self.scanner
        pos = sc.terminate_at
        sc.terminate_at = None
        if pos < 0:
            # The Terminate header started in the previous chunk, which went
            # to the server: it holds a partial message now.
            sc.unsynced = True
        elif pos > 0:
            if self.server is not None:
                head = data[:pos]
                if self.rewriter is not None:
                    head = self.rewriter.process(head, self.server.stmts)
                if head:
                    self._write_server(self._server_transport, head, self.transport)
            else:
                self._held.append(data[:pos])
        self._close()

    def _after_copy_end(self):
        """The client ended a COPY FROM STDIN. If the server had already
        answered (the COPY failed), nothing else will: release now."""
        sc = self.scanner
        sc.copy_ended = False
        server = self.server
        if server is not None and (self.transaction_mode or self.draining) \
                and server.scanner.tx_status == codes.TX_IDLE and sc.idle:
            self.release_server(server)

    # --- bind and release --------------------------------------------------------------

    def _got_server(self, server, params_synced=False):
        """A server for this client's checkout (from its pool's queue, the
        idle fast path or a health check): bind it and send what was held
        for it. Tracked parameters that differ on it are SET first, unless
        that was just done (``params_synced``). One function on purpose:
        this runs for every transaction (rule 9)."""
        now = self.clock.now
        if self._waiting is not None:
            # It queued: its wait ends (stats; ``since`` is when it began).
            self._waiting = None
            server.pool.totals.wait_time += now - self._waiter.since
        transport = self.transport
        if transport is None or self._closing or not transport.connected:
            server.pool.release(server)
            return
        pool = server.pool
        if server.closed:
            # Closing under us (never write to a closing transport).
            pool.discard(server)
            self._waiting = (pool, None)
            self._checkout_failed(ServerConnectionFailed(
                f"{pool.name}: server connection closed before use"))
            return
        bal = self.user_pool.balancer
        if bal.epoch != self._wait_epoch and \
                not bal.serves(pool, self.role, self.primary_reads, self.shard):
            # Its role changed (or it was banned) while we waited for it.
            pool.release(server)
            if self._tried is None:
                self._tried = [pool]
            self._checkout_next(None)
            return
        self._tried = None
        if not params_synced:
            # Equal tracked tuples (cached, see relay.ParameterValues): no
            # SET needed. Otherwise compare the values this client has.
            params = self.params
            sparams = server.params
            mine = params._tracked
            if mine is None:
                mine = params.tracked()
            theirs = sparams._tracked
            if theirs is None:
                theirs = sparams.tracked()
            if mine != theirs:
                for k, v in params.items():
                    if sparams.get(k) != v:
                        self._sync_params(server)
                        return
        st = server.transport
        held = self._held
        rw = self.rewriter
        if held and rw is None:
            # The query first (it is what the server waits for), the
            # bookkeeping after: nothing can arrive before we return.
            self._held = []
            server.writer(st, held[0] if len(held) == 1 else b"".join(held), self.transport)
        self._checking_out = False
        self.server = server
        self._server_transport = st
        self._write_server = server.writer
        # Bind (inline: the hot path; ServerConnection.unbind undoes it).
        server.client = self
        ss = server.scanner
        ss.client = sc = self.scanner
        ss.bound_at = ss.query_start = now
        ss.sent_mark = sc.received - self._held_len
        ss.binds += 1
        server._write_client = self.writer
        server._client_transport = self.transport
        server.state = "active"
        server.dataReceived = server.relay_data
        if self._paused_waiting:
            self._paused_waiting = False
            self.transport.resumeProducing()
        if rw is not None:
            self._send_prepared(server, held)
            return
        if self.transaction_mode:
            # The held list (already replaced by a new one above) becomes
            # request_chunks, kept for a possible re-send: not copied.
            self.request_chunks = held if held else []
            self._request_bytes = self._held_len
        self._held_len = 0

    def _send_prepared(self, server, held):
        """Bind's end with a shared statement cache: the held requests go
        through the rewriter (statement names mapped, Parses added)."""
        stmts = server.stmts
        if stmts is None:
            stmts = server.stmts = ServerStatements(self.rewriter.cache.size,
                                                    self.rewriter.cache)
            server.scanner.use_prepared(stmts)
        if held:
            self._held = []
            self._held_len = 0
            out = self.rewriter.process(held[0] if len(held) == 1 else b"".join(held), stmts)
            if out:
                self._write_server(server.transport, out, self.transport)

    def _watch(self, data):
        """Session mode: does this chunk's text call something that keeps
        state in the session without a telling command tag (an advisory
        lock, set_config, a TEMP table made by CREATE TABLE AS or SELECT
        INTO, a sequence's currval, a dblink connection)? Chunks over
        WATCH_LIMIT (COPY data, huge statements) count as such unread.
        Either way the session ends with a reset, and the watch stops."""
        if len(data) > WATCH_LIMIT or STATEFUL_TEXT.search(data.lower()) is not None:
            self._text_state = True
            self._watch_text = False

    def _needs_reset(self, server):
        """Does the session state on ``server`` need a reset before its next
        client? PgCat's rule, in both modes: only when the client changed
        state. That is a command tag that leaves some (relay._DIRTY_TAGS:
        SET, RESET, PREPARE, LISTEN, DECLARE, LOAD, CREATE TABLE/VIEW/
        SEQUENCE), a named Parse (without a statement cache in transaction
        mode; in session mode always), or, in session mode, text ``_watch``
        flagged. Never with ``cleanup_server_connections = false``: open
        transactions are still rolled back, and half-read servers closed."""
        if not self.user_pool.pool_cfg.cleanup_server_connections:
            return False
        if server.scanner.dirty:
            return True
        if self.transaction_mode:
            return self.scanner.named_parse and self.rewriter is None
        return self.scanner.named_parse or self._text_state

    def release_server(self, server):
        """IBoundClient: the bound server answered everything and is idle
        (transaction mode, backend.ServerConnection._relay_data decides), or
        the client is draining."""
        self.server = None
        self._server_transport = None
        self._write_server = None
        ss = server.scanner
        ss.xact_time += self.clock.now - ss.bound_at
        server.unbind()
        # _needs_reset, inline: every transaction ends here.
        if (ss.dirty or not self.transaction_mode or (
                self.scanner.named_parse and self.rewriter is None)) \
                and self.user_pool.pool_cfg.cleanup_server_connections:
            self.scanner.named_parse = False
            server.reset_and_release([server.reset_query(self.transaction_mode)])
        else:
            server.pool.release(server)
        if self.draining:
            self._fatal(_shutdown_error())

    @property
    def admin(self):
        return self.session is not None and self.session.admin

    def drain(self):
        """Shutdown: close now if between transactions, else after the
        current one (backend's release check sees ``draining``). Admin
        sessions stay."""
        if self.admin or (self._login is not None and self._login.admin):
            return
        self.draining = True
        if self.scanner is None:
            # Still logging in.
            self._fatal(_shutdown_error())
            return
        server = self.server
        if server is None:
            if not self._checking_out:
                self._fatal(_shutdown_error())
            return
        sc = self.scanner
        ss = server.scanner
        if ss.tx_status == codes.TX_IDLE and sc.idle and ss.at_boundary:
            self.release_server(server)

    # --- a server that dies ----------------------------------------------------------------

    @staticmethod
    def _standby(server):
        """Was this server in recovery (a hot standby: it can have written
        nothing) at its last report?"""
        hs = server.params.get("in_hot_standby")
        if hs is not None:
            return hs == "on"
        pool = server.pool
        return pool is not None and pool.health is not None \
            and pool.health.effective_role == "replica"

    def dying_server(self, server, data):
        """IBoundClient: the first answer chunk to a request that could still
        be re-sent starts with an ErrorResponse. A FATAL 57P0x (shutdown,
        crash of another backend, postmaster gone) from a standby means the
        statement did not run there: the server is dropped without passing
        the error on, and ``server_lost`` re-sends the request. -> True if so."""
        if len(data) < 5:
            return False
        n = _LEN.unpack_from(data, 1)[0]
        if n < 4 or len(data) < 1 + n:
            return False
        try:
            fields = m.parse_error_fields(data[5:1 + n])
        except ValueError:
            return False
        if fields.get("V", fields.get("S")) != "FATAL" or not fields.get("C", "").startswith("57P") \
                or not self._standby(server):
            return False
        # Let go of it now, not at its connectionLost: nothing more may be
        # written to a transport that is closing (a writer would register
        # this client as its producer, and Twisted stops the producer of a
        # transport that is lost: the client would be closed).
        server.unbind()
        server.close()
        self.server_lost(server)
        return True

    def server_lost(self, server):
        """IBoundClient: the bound server connection died; a replica is
        banned. If it was a replica (a hot standby: nothing it ran can have
        written anything) and no byte of its answer reached the client since
        it was bound, the request is re-sent to another server and the client
        sees no error. Otherwise the client gets a FATAL error and is closed."""
        self.server = None
        self._server_transport = None
        self._write_server = None
        chunks = self.request_chunks
        self.request_chunks = None
        pool = server.pool
        standby = self._standby(server)
        if pool is not None and pool.health is not None and not pool.closed:
            self.user_pool.server_failed(pool, "server connection lost")
        if self.transport is None or self._closing:
            return
        if chunks is not None and standby and not self._checking_out \
                and server.scanner.tx_status == codes.TX_IDLE and not self.scanner.in_copy:
            self._held = chunks + self._held
            self._held_len = sum(map(len, self._held))
            self._checkout()
            return
        if server.scanner.at_boundary:
            self._send_error(ServerConnectionFailed(
                f"server connection to {server.host}:{server.port} was lost",
                severity="FATAL"))
        self._close()

    # --- disconnect -------------------------------------------------------------------------

    def connectionLost(self, reason):
        self.factory.clients.discard(self)
        self.factory.limits.leave(self)
        self._startup = self._login = None
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        if self.key is not None:
            self.factory.cancel_keys.unregister(self.key)
        if self._waiting is not None:
            (pool, w), self._waiting = self._waiting, None
            if w is not None:
                pool.cancel_wait(w)
        server = self.server
        if server is not None:
            self.server = None
            server.client_left(self.scanner, self.transaction_mode, self._needs_reset(server))
        if self.user is not None and \
                self.factory.get_cluster().config.general.log_client_disconnections:
            log.info("client disconnected: user={user} database={database}",
                     user=self.user, database=self.database)
