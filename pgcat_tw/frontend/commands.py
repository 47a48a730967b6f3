"""The SQL a client's work phase answers itself, without a server.

- PgCat's custom commands between transactions (reference §4.1):
  ``SET/SHOW SERVER ROLE``, ``SET/SHOW PRIMARY READS`` (router/custom.py).
- Transaction mode: SQL-level ``PREPARE``/``EXECUTE`` refused without the
  statement cache (the statement would meet another server later); with
  it, ``PREPARE`` is answered here and maps the client's name onto the
  shared statement of its text (``EXECUTE`` is rewritten on its way,
  prepared.py); ``DEALLOCATE`` answered for the client's own statements
  (router/sql.py), ``DISCARD ALL`` also empties the client's view.
- Transaction mode without a statement cache: a named Parse is refused
  like PostgreSQL refuses a bad message, and everything up to the next Sync
  is skipped (``_SyncFinder``).

``Commands`` is a part of ``ClientProtocol`` (a mixin: these run on the
client's own state, rarely, off the relay's hot path).
"""

import re
import struct

from twisted.logger import Logger

from pgcat_tw.backend import RESET_TIMEOUT
from pgcat_tw.errors import PgError
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import SKIP, FramingError, MessageBuffer, Scanner, want_table
from pgcat_tw.frontend.routing import ANY_SHARD, AUTO, requests as routing_requests
from pgcat_tw.router import custom
from pgcat_tw.router import sql as sqlcmd

log = Logger()

_LEN = struct.Struct("!i")
# An anchored probe (no allocation): could this simple Query be ours?
MAYBE_COMMAND = re.compile(rb"\s*(?:set|show|prepare|execute|deallocate|discard)\s",
                           re.IGNORECASE)


def whole_query(data):
    """``data`` is exactly one simple Query message."""
    return len(data) == 1 + _LEN.unpack_from(data, 1)[0]


class _SyncFinder(Scanner):
    """Finds where the next Sync ends, over chunks (skip-to-Sync after an error)."""

    def __init__(self):
        Scanner.__init__(self, want_table({"S": 1}, default=SKIP))
        self.sync_end = -1

    def feed(self, data):
        self.sync_end = -1
        try:
            Scanner.feed(self, data)
        except _SyncFound:
            pass  # the finder is dropped once the Sync is found

    def on_message(self, t, buf, start, end):
        self.sync_end = end  # a Sync has an empty body: it ends where it starts
        raise _SyncFound()


class _SyncFound(Exception):
    pass


class Commands:
    """Part of ClientProtocol: the SQL the pooler answers itself."""

    _discard_until_sync = None  # a _SyncFinder while skipping to Sync after an error
    _skip_ready = m.READY_IDLE  # the ReadyForQuery that ends the skip

    def _answer_between_transactions(self, data):
        """One whole simple Query, no server bound, nothing held: answer it
        if it is one of ours. -> True if answered; a rewritten Query (bytes)
        when it began with custom commands (answered here) and the rest is
        for a server; False otherwise."""
        cmd = custom.match(data, 5, len(data))
        if cmd is not None:
            self.scanner.pending -= 1
            self.transport.write(self._custom_answer(*cmd) + m.READY_IDLE)
            return True
        found, rest = custom.leading(bytes(data[5:-1]))
        if found:
            replies = []
            for command in found:
                try:
                    replies.append(self._custom_reply(*command))
                except PgError as e:
                    replies.append(e.to_message())
                    rest = b""    # as PostgreSQL: an error ends the string
                    break
            if not rest.strip():
                self.scanner.pending -= 1
                self.transport.write(b"".join(replies) + m.READY_IDLE)
                return True
            self.transport.write(b"".join(replies))
            return m.query(rest.decode("utf-8", "surrogateescape"))
        return self.transaction_mode and self._sql_command(data, False)

    def _sql_command(self, data, bound):
        """Transaction mode: SQL-level PREPARE/EXECUTE (refused: they would
        meet another server later) and DEALLOCATE (answered for the client's
        own statements). ``data`` is one whole Query; True if answered."""
        cmd = sqlcmd.match(data, 5, len(data))
        if cmd is None:
            return False
        kind, arg = cmd
        if kind == "discard_all":
            # The server runs it (and drops its statements, relay.py); the
            # client's own view of its statements is emptied too.
            if self.rewriter is not None:
                self.rewriter.deallocate(None)
            return False
        sc = self.scanner
        status = self.server.scanner.tx_status if bound else codes.TX_IDLE
        if kind in ("prepare", "execute", "deallocate") and status != codes.TX_IDLE:
            # Inside an explicit transaction the server is this client's
            # until it ends (and PREPARE marks it for a reset): the server
            # answers.
            return False
        if kind == "execute" and self.rewriter is not None:
            return False    # mapped onto a shared statement on its way (prepared.py)
        reply = self._sql_prepare(bytes(data[5:-1])) \
            if kind == "prepare" and self.rewriter is not None else None
        if reply is not None:
            pass    # a mapped PREPARE's answer
        elif kind in ("prepare", "execute"):
            err = PgError(
                f"SQL {kind.upper()} is not supported in transaction pooling mode: the "
                "statement would be prepared on one server connection and executed on "
                "another",
                sqlstate="0A000",
                hint="send PREPARE name AS statement alone in its Query (it is then mapped "
                     "onto a shared statement)" if self.rewriter is not None else
                     "use protocol-level prepared statements (enable "
                     "prepared_statements_cache_size for this pool) or session mode")
            reply = err.to_message()
        elif self.rewriter is None:
            return False  # no pooler-side statements: the server answers
        else:
            self.rewriter.deallocate(arg)
            reply = m.command_complete("DEALLOCATE ALL" if arg is None else "DEALLOCATE")
        sc.pending -= 1
        self.transport.write(reply + m.ready_for_query(bytes((status,))))
        return True

    def _sql_prepare(self, text):
        """SQL PREPARE between transactions with the statement cache on:
        the client's name is mapped onto the shared statement of that text
        (prepared on a server at its first EXECUTE there). -> the reply, or
        None to let the server answer."""
        parts = sqlcmd.prepare_parts(text)
        if parts is None:
            return None
        if isinstance(parts, str):
            return PgError(
                f"SQL PREPARE with {parts} is not supported in transaction pooling mode "
                "(the pooler maps PREPARE onto shared statements for the common types)",
                sqlstate="0A000",
                hint="declare a common type, leave the type out, or use "
                     "protocol-level prepared statements").to_message()
        name, oids, statement = parts
        if not self.rewriter.sql_prepare(name, statement, oids):
            return PgError(f'prepared statement "{name.decode("utf-8", "replace")}" '
                           "already exists", sqlstate="42P05").to_message()
        return m.command_complete("PREPARE")

    def _custom_answer(self, cmd, arg):
        """The reply to one custom command, or its ErrorResponse."""
        try:
            return self._custom_reply(cmd, arg)
        except PgError as e:
            return e.to_message()

    def _custom_reply(self, cmd, arg):
        """Do one of PgCat's custom commands (reference §4.1): its reply,
        without ReadyForQuery. Raises PgError for a value it refuses."""
        pool_cfg = self.user_pool.pool_cfg
        router = self.user_pool.router
        if cmd == "set_server_role":
            if arg == "default":
                arg = AUTO if router is not None and router.splitting \
                    else pool_cfg.default_role
            self.role_setting = arg
            if router is None:
                self.role = arg if arg != AUTO else pool_cfg.default_role
            return m.command_complete("SET SERVER ROLE")
        if cmd == "show_server_role":
            return self._show("server role", self.role_setting)
        if cmd == "set_primary_reads":
            self.primary_reads = (pool_cfg.primary_reads_enabled if arg == "default"
                                  else arg == "on")
            return m.command_complete("SET PRIMARY READS")
        if cmd == "show_primary_reads":
            return self._show("primary reads", "on" if self.primary_reads else "off")
        shards = len(pool_cfg.shards)
        if cmd == "set_shard":
            if arg == "any":
                self.shard_setting = ANY_SHARD
            else:
                shard = int(arg)
                if shard >= shards:
                    raise PgError(
                        f"shard {shard} is not configured (the pool has {shards} shard(s), "
                        f"numbered from 0); staying on shard {self._shard_text()}",
                        sqlstate="22023")
                self.shard_setting = shard
            self._shard_changed()
            return m.command_complete("SET SHARD")
        if cmd == "set_sharding_key":
            key = int(arg)
            if not -(1 << 63) <= key < (1 << 63):
                raise PgError(f"sharding key {arg} is out of the bigint range",
                              sqlstate="22003")
            fn = router.shard_of_key if router is not None else (lambda k: 0)
            self.shard_setting = fn(key)
            self._shard_changed()
            return m.command_complete("SET SHARDING KEY")
        # show_shard
        return self._show("shard", self._shard_text())

    def _shard_changed(self):
        if self.user_pool.router is None:
            self.shard = self.shard_setting if self.shard_setting != ANY_SHARD else 0

    def _shard_text(self):
        s = self.shard_setting
        return "unset" if s is None else "any" if s == ANY_SHARD else str(s)

    @staticmethod
    def _show(column, value):
        return (m.row_description([(column, 25)]) + m.data_row([value])
                + m.command_complete("SELECT 1"))

    def _answer_extended_custom(self, data):
        """An unnamed Parse of a custom command with its Bind, Describe,
        Execute and Sync, all in this chunk (what drivers such as psycopg 3
        send for a statement without parameters): answered like the server
        would. -> True if answered."""
        msgs = routing_requests(data)
        if not msgs or msgs[0][0] != b"P" or msgs[0][2] or data[-5:] != _SYNC:
            return False
        cmd = custom.match_text(msgs[0][1])
        if cmd is None:
            return False
        try:
            reply = self._custom_reply(*cmd)
        except PgError as e:
            self._skip_to_sync(e, data)
            return True
        out = [m.PARSE_COMPLETE, m.BIND_COMPLETE]
        if reply[:1] == b"T":
            # RowDescription answers the Describe; the rows and tag the Execute.
            cut = 1 + int.from_bytes(reply[1:5], "big")
            out.append(reply[:cut])
            out.append(reply[cut:])
        else:
            if _DESCRIBE_PORTAL in data:
                out.append(m.NO_DATA)
            out.append(reply)
        sc = self.scanner
        sc.pending = 0
        sc.unsynced = False
        self.transport.write(b"".join(out) + m.READY_IDLE)
        return True

    def _reject_named_parse(self, data):
        """Transaction mode without a statement cache: a named Parse cannot
        work (the next transaction may land on another server)."""
        err = PgError(
            "named prepared statements need a prepared statement cache in transaction "
            "pooling mode: set prepared_statements_cache_size > 0 for this pool "
            "(or use session mode, or unnamed statements)",
            sqlstate="0A000")
        sc = self.scanner
        if self.server is not None or self._checking_out or self._held \
                or data[0] != codes.F_PARSE or not sc.at_boundary:
            self._fatal(err)
            return
        self._skip_to_sync(err, data)

    def _skip_to_sync(self, err, data, ready=m.READY_IDLE):
        """Like PostgreSQL after an error in an extended-protocol request:
        answer ``err``, then skip every message up to the next Sync (whose
        ReadyForQuery, ``ready``, the pooler sends)."""
        self._skip_ready = ready
        sc = self.scanner
        self.transport.write(err.to_message())
        sc.pending = 0
        sc.unsynced = False
        sc.named_parse = False
        self._discard_until_sync = _SyncFinder()
        self.dataReceived = self._discarding
        self._discarding(data)

    def _discarding(self, data):
        finder = self._discard_until_sync
        try:
            finder.feed(data)
        except FramingError as e:
            self._protocol_error(e)
            return
        if finder.sync_end < 0:
            return
        rest = data[finder.sync_end:]
        self._discard_until_sync = None
        self.dataReceived = self._entry
        self.transport.write(self._skip_ready)
        if rest:
            self._entry(rest)

    # --- after an idle-in-transaction timeout -------------------------------------------

    def idle_transaction_timeout(self):
        """The client sat idle inside a transaction longer than
        idle_client_in_transaction_timeout: the server is rolled back (in
        transaction mode it goes back to its pool; in session mode it is
        bound again once clean). Nothing is sent now (the client is not
        waiting for anything); its next request learns it: PgCat's
        ``idle transaction timeout`` error until it ends the transaction
        (``_aborted_data``)."""
        server = self.server
        if server is None:
            return
        log.info("client {user}@{db}: idle transaction timeout: rolled back",
                 user=self.user, db=self.database)
        self.server = None
        self._server_transport = None
        self._write_server = None
        server.unbind()
        queries = ["ROLLBACK"]
        if self._needs_reset(server) and self.transaction_mode:
            self.scanner.named_parse = False
            queries.append(server.reset_query(True))
        if self.transaction_mode:
            server.reset_and_release(queries)
        else:
            self._checking_out = True
            d = server.run(queries, timeout=RESET_TIMEOUT)
            d.addCallbacks(lambda _: self._got_server(server, True),
                           lambda f: self._sync_failed(f, server))
        self._aborted = MessageBuffer()
        self.dataReceived = self._aborted_data

    _aborted = None             # a MessageBuffer while the transaction is lost

    def _aborted_data(self, data):
        buf = self._aborted
        try:
            buf.feed(data)
            while True:
                msg = buf.next_message()
                if msg is None:
                    return
                t, body = msg
                if self._aborted_message(t, body):
                    rest = buf.take_rest()
                    self._aborted = None
                    self.dataReceived = self._entry
                    if rest:
                        self._entry(rest)
                    return
        except FramingError as e:
            self._protocol_error(e)

    def _aborted_message(self, t, body):
        """One message while the timed-out transaction is not ended yet.
        -> True once the client ended it (ROLLBACK, COMMIT, END, ABORT)."""
        out = self.transport
        if t == codes.F_TERMINATE:
            self._close()
            return False
        if t == codes.F_QUERY:
            words = bytes(body[:-1]).decode("utf-8", "replace").strip().rstrip(";").split()
            if words and words[0].lower() in _ENDS_TRANSACTION:
                out.write(m.command_complete("ROLLBACK") + m.READY_IDLE)
                return True
            out.write(_idle_timeout_error() + m.READY_FAILED)
            return False
        if t == codes.F_SYNC:
            if not self._aborted_told:
                out.write(_idle_timeout_error())
            self._aborted_told = False
            out.write(m.READY_FAILED)
            return False
        if not self._aborted_told:   # extended protocol: one error, then skip to Sync
            self._aborted_told = True
            out.write(_idle_timeout_error())
        return False

    _aborted_told = False


_ENDS_TRANSACTION = ("rollback", "commit", "end", "abort")
_SYNC = b"S\x00\x00\x00\x04"
_DESCRIBE_PORTAL = b"D\x00\x00\x00\x06P\x00"


def _idle_timeout_error():
    return PgError("idle transaction timeout", sqlstate="25P03",
                   detail="the transaction was idle longer than "
                          "idle_client_in_transaction_timeout and was rolled back").to_message()
