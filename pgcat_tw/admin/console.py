"""The admin console: a client logged in to the ``pgcat`` or ``pgbouncer``
database (L2).

Simple Query only; a query may hold several commands separated by
semicolons; commands are case-insensitive. Each answer is a table
(RowDescription, DataRows, CommandComplete) or a tag; a bad command or a
bad argument is an ErrorResponse 58000 with PgCat's text, then
ReadyForQuery: the session stays usable. Anything but a simple Query or a
Terminate is a protocol error (FATAL 08P01). The console never gets a
scanner, a waiter or a server: it keeps working while pools are paused or
exhausted and during a graceful shutdown.

``COMMANDS`` maps a command to a method; the tables themselves are pure
functions (``tables``), over a ``snapshot`` the ``control.Control`` takes.
"""

import time

from twisted.internet import defer
from twisted.logger import Logger

from pgcat_tw.admin import tables
from pgcat_tw.admin.control import AdminError, parse_pool_arg
from pgcat_tw.errors import PgError, ProtocolViolation
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import FramingError, MessageBuffer

log = Logger()

ADMIN_DATABASES = ("pgcat", "pgbouncer")

# What an admin session is greeted with (PgCat's set).
GREETING_PARAMETERS = (("application_name", ""), ("client_encoding", "UTF8"),
                       ("server_encoding", "UTF8"), ("server_version", tables.VERSION),
                       ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"),
                       ("standard_conforming_strings", "on"), ("TimeZone", "UTC"))

_EMPTY_QUERY = m._msg(b"I", b"")


def wallclock(t):
    """A reactor time (seconds since the epoch) as a timestamp."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def table(columns, rows, tag="SHOW"):
    out = [m.row_description(columns)]
    for row in rows:
        out.append(m.data_row([None if v is None else str(v) for v in row]))
    out.append(m.command_complete(tag))
    return b"".join(out)


def unsupported(command):
    return AdminError("Unsupported query against the admin database" if command != "show"
                      else "Unsupported SHOW query against the admin database")


class Console:
    def __init__(self, client, session, control):
        self.client = client
        self.session = session
        self.control = control
        self.buf = MessageBuffer()
        self.running = None     # the Deferred of a command still running (PAUSE)

    def data_received(self, data):
        try:
            self.buf.feed(data)
        except FramingError as e:
            self.client._fatal(ProtocolViolation(e.message))
            return
        self._next()

    def _next(self):
        client = self.client
        while self.running is None and not client._closing:
            try:
                msg = self.buf.next_message()
            except FramingError as e:
                client._fatal(ProtocolViolation(e.message))
                return
            if msg is None:
                return
            t, body = msg
            if t == codes.F_TERMINATE:
                client._close()
                return
            if t != codes.F_QUERY:
                client._fatal(ProtocolViolation(
                    "the admin console accepts only simple queries "
                    f"(got message type {chr(t)!r})"))
                return
            sql = bytes(body[:-1]).decode("utf-8", "replace")
            self.running = self._query(sql)
            if self.running.called:
                self.running = None

    @defer.inlineCallbacks
    def _query(self, sql):
        out = self.client.transport
        commands = [c.strip() for c in sql.split(";") if c.strip()]
        if not commands:
            out.write(_EMPTY_QUERY + m.READY_IDLE)
            return
        try:
            for command in commands:
                reply = yield defer.maybeDeferred(self.execute, command)
                if self.client.transport is None:
                    return
                out.write(reply)
        except PgError as e:
            if e.severity not in ("ERROR", "FATAL", "PANIC"):
                e.severity = "ERROR"
            if e.fatal:
                e.severity = "ERROR"
            out.write(e.to_message())
        except Exception as e:  # noqa: BLE001 - a bug: tell the client, keep the session
            log.failure("admin command failed: {sql}", sql=sql)
            out.write(AdminError(f"internal error: {e}").to_message())
        if self.client.transport is not None and not self.client._closing:
            out.write(m.READY_IDLE)
        if self.running is not None:
            self.running = None
            self.client.reactor.callLater(0, self._next)

    def execute(self, command):
        """One command -> its reply (bytes or a Deferred of bytes)."""
        words = command.split()
        verb = words[0].lower()
        if verb == "show":
            if len(words) != 2:
                raise unsupported("show")
            what = words[1].lower()
            fn = SHOW.get(what)
            if fn is None:
                raise unsupported("show")
            return fn(self)
        if verb == "set":
            return m.command_complete("SET")
        fn = COMMANDS.get(verb)
        if fn is None:
            raise unsupported(verb)
        return fn(self, words[1:])

    # --- SHOW ------------------------------------------------------------------------

    def _snap(self):
        return self.control.snapshot()

    def show_help(self):
        notices = [m.notice_response(line) for line in ["Console usage"] + tables.HELP]
        return b"".join(notices) + m.command_complete("SHOW")

    def show_pools(self):
        return table(*tables.show_pools(self._snap()))

    def show_stats(self):
        return table(*tables.show_stats(self._snap()))

    def show_stats_totals(self):
        return table(*tables.show_stats_totals(self._snap()))

    def show_stats_averages(self):
        return table(*tables.show_stats_averages(self._snap()))

    def show_databases(self):
        return table(*tables.show_databases(self._snap()))

    def show_clients(self):
        return table(*tables.show_clients(self._snap(), wallclock))

    def show_servers(self):
        return table(*tables.show_servers(self._snap(), wallclock))

    def show_config(self):
        return table(*tables.show_config(self.control.get_cluster().config))

    def show_lists(self):
        return table(*tables.show_lists(self._snap()))

    def show_users(self):
        return table(*tables.show_users(self._snap()))

    def show_version(self):
        return table(*tables.show_version(None))

    def show_bans(self):
        return table(*tables.show_bans(self._snap(), wallclock))

    def show_mirrors(self):
        return table(*tables.show_mirrors(self._snap()))

    def show_state(self):
        return table(*tables.show_state(self._snap(), self.control.draining))

    # --- control -----------------------------------------------------------------------

    def ban(self, args):
        if len(args) != 2:
            raise AdminError("usage: BAN host seconds")
        return table(tables.BAN_COLUMNS, self.control.ban(args[0], args[1]), "BAN")

    def unban(self, args):
        if len(args) != 1:
            raise AdminError("usage: UNBAN host")
        return table(tables.BAN_COLUMNS, self.control.unban(args[0]), "UNBAN")

    def reload(self, args):
        if args:
            raise AdminError("usage: RELOAD")
        problem = self.control.reload()
        if problem:
            raise AdminError(f"reload failed, the configuration in force is kept: {problem}")
        return m.command_complete("RELOAD")

    def _pool_arg(self, verb, args):
        if len(args) > 1:
            raise AdminError(f"usage: {verb} [db[,user]] (no space after the comma)")
        return parse_pool_arg(args[0] if args else None)

    def pause(self, args):
        db, user = self._pool_arg("PAUSE", args)
        tag = "PAUSE" if not args else f"PAUSE {args[0]}"
        d = self.control.pause(db, user)
        return d.addCallback(lambda _: m.command_complete(tag))

    def resume(self, args):
        db, user = self._pool_arg("RESUME", args)
        self.control.resume(db, user)
        return m.command_complete("RESUME" if not args else f"RESUME {args[0]}")

    def shutdown(self, args):
        self.control.shutdown()
        return table([("success", tables.TEXT)], [["t"]], "SHUTDOWN")

    def kill_client(self, args):
        if len(args) != 1:
            raise AdminError("usage: KILL_CLIENT id")
        self.control.kill_client(args[0])
        return m.command_complete("KILL_CLIENT")


SHOW = {
    "help": Console.show_help,
    "pools": Console.show_pools,
    "stats": Console.show_stats,
    "stats_totals": Console.show_stats_totals,
    "stats_averages": Console.show_stats_averages,
    "databases": Console.show_databases,
    "clients": Console.show_clients,
    "servers": Console.show_servers,
    "config": Console.show_config,
    "lists": Console.show_lists,
    "users": Console.show_users,
    "version": Console.show_version,
    "bans": Console.show_bans,
    "state": Console.show_state,
    "mirrors": Console.show_mirrors,
}

COMMANDS = {
    "ban": Console.ban,
    "unban": Console.unban,
    "reload": Console.reload,
    "pause": Console.pause,
    "resume": Console.resume,
    "shutdown": Console.shutdown,
    "kill_client": Console.kill_client,
}


def greeting(key):
    """AuthenticationOk, the admin session's ParameterStatus set, its
    BackendKeyData and ReadyForQuery."""
    out = [m.auth_ok()]
    for name, value in GREETING_PARAMETERS:
        out.append(m.parameter_status(name, value))
    out.append(m.backend_key_data(*key))
    out.append(m.READY_IDLE)
    return b"".join(out)
