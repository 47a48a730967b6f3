"""The plugins' side of the work phase (L2): a part of ``ClientProtocol``.

A client of a pool with plugins that inspect queries (``query_logger``,
``intercept``, ``table_access``; ``router.plugins.Plugins``) has
``_plugin_data`` as its work-phase entry instead of ``_work_data``: clients
of other pools never run a line of this module. ``_plugin_data`` cuts the
chunk at message boundaries (a Query or Parse split across chunks is held
until it is whole; other messages pass as they come) and for each Query
and Parse:

- logs it (``query_logger``: ``[pool: p][user: u] <text>`` at info, with
  the pool and user as fields; a Bind's parameters are never logged);
- answers it from the configured rows (``intercept``), without a server,
  for a simple Query and for an extended-protocol group (Parse, Bind,
  Describe, Execute, Close, Flush up to Sync, also a later Bind of an
  intercepted named statement, as asyncpg sends it);
- refuses it (``table_access``: ``42501 permission for table "t" denied``)
  when the parser finds a listed table anywhere in it (subqueries, CTEs,
  joins); the connection stays usable.

The pooler answers by itself only when nothing the client sent before is
still unanswered (what drivers do between statements); the answer's
ReadyForQuery has the status of the client's transaction. Otherwise
(pipelined requests) a refused statement is replaced by one the server
rejects with the same error, so that every answer keeps its order, and an
intercepted one goes to the server.
"""

from twisted.logger import Logger

from pgcat_tw.errors import PgError
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import _unpack_header
from pgcat_tw.router import custom
from pgcat_tw.router.plugins import UNCHECKED

log = Logger()

_Q, _P, _B, _D, _E, _C, _H, _S = b"QPBDECHS"
_LOCAL_GROUP = frozenset(b"PBDECHS")    # what an intercepted group may hold
_CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
_WAIT = object()            # _plugin_message: hold the chunk until more comes
_GROUP_LIMIT = 65536        # bytes an intercepted group may be held for


def _denied_error(table):
    if table == UNCHECKED:
        return PgError("permission denied: table_access could not check this query "
                       "(the query parser did not read it)", sqlstate="42501")
    return PgError(f'permission for table "{table}" denied', sqlstate="42501")


def _server_side_error(err):
    """SQL that makes the server raise ``err`` (for a pipelined request)."""
    text = err.message.replace("'", "''")
    return ("DO $pgcat_tw$BEGIN RAISE EXCEPTION USING ERRCODE = '%s', MESSAGE = '%s'; "
            "END$pgcat_tw$" % (err.sqlstate, text)).encode()


def _cstrings(body, count):
    """The first ``count`` NUL-terminated strings of a message body."""
    out, pos = [], 0
    for _ in range(count):
        end = body.index(b"\0", pos)
        out.append(bytes(body[pos:end]))
        pos = end + 1
    return out, pos


class PluginHooks:
    """Part of ClientProtocol: queries through the pool's plugins."""

    _plugin_tail = b""        # a Query/Parse (or a header) not yet whole
    _plugin_skip = 0          # bytes of a passed-through message still to come
    _intercepted = None       # statement/portal name -> Intercept (extended protocol)

    def _work_entry(self):
        """The work phase's dataReceived for this client's pool now."""
        plugins = self.user_pool.plugins
        return self._plugin_data if plugins is not None and plugins.inspects \
            else self._work_data

    def plugins_reloaded(self):
        """A reload may have enabled or removed the pool's plugins: take the
        entry that fits, at a message boundary."""
        if self.scanner is None or self._closing:
            return    # not in the work phase
        entry = self._work_entry()
        if self.dataReceived not in (self._work_data, self._plugin_data):
            self._entry = entry     # a detour (skip to Sync, aborted): it returns there
            return
        if self._plugin_tail or self._plugin_skip or not self.scanner.at_boundary:
            self.reactor.callLater(0.05, self.plugins_reloaded)
            return
        self._entry = self.dataReceived = entry

    def _plugin_data(self, data):
        plugins = self.user_pool.plugins
        if self._plugin_tail:
            data = self._plugin_tail + data
            self._plugin_tail = b""
        if plugins is None or not plugins.inspects:      # removed by a reload
            self._entry = self.dataReceived = self._work_data
            self._work_data(data)
            return
        n = len(data)
        pos = self._plugin_skip
        if pos >= n:
            self._plugin_skip = pos - n
            self._work_data(data)
            return
        self._plugin_skip = 0
        start = 0       # data[start:pos] is passed on as it is
        while pos + 5 <= n:
            t, ln = _unpack_header(data, pos)
            end = pos + 1 + ln
            if t == _B and pos == 0 and self._intercepted is not None and end <= n \
                    and self._nothing_in_flight():
                # A Bind of an intercepted statement (asyncpg's second round).
                answered = self._answer_group(data)
                if answered is not False:
                    if answered is None:
                        self._plugin_tail = bytes(data)     # the rest of its group is coming
                    return
            if t != _Q and t != _P:
                if end > n:
                    self._plugin_skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if ln < 4 or ln > self.scanner.max_len:
                break           # the scanner answers the framing error
            if end > n:
                break           # held until whole
            action = self._plugin_message(t, data, pos, end, plugins)
            if action is _WAIT:
                self._plugin_tail = bytes(data)     # an intercepted group, not whole yet
                return
            if action is None:
                pos = end
                continue
            if action is not True:          # a replacement message for the server
                self._pass(data[start:pos] + action)
                start = pos = end
                continue
            # Answered here (nothing was in flight): what came before went
            # on first; the answer consumed data[pos:] up to its Sync.
            if pos > start:
                self._pass(data[start:pos])
            return
        if pos < n:
            self._plugin_tail = bytes(data[pos:])
        if pos > start:
            self._pass(data[start:pos] if start or pos < n else data)

    def _pass(self, data):
        """Bytes on to the work phase (which may detour: then it returns to
        ``_entry``, which is this hook)."""
        if self.dataReceived == self._plugin_data:
            self._work_data(data)
        else:
            self.dataReceived(data)

    def _plugin_message(self, t, data, pos, end, plugins):
        """One whole Query or Parse at ``data[pos:end]``. -> None (pass it
        on), True (answered here: the rest of ``data`` was handled too), or
        the bytes of a replacement message."""
        body = data[pos + 5:end]
        if t == _Q:
            name, text = b"", bytes(body[:-1])
        else:
            (name, text), _ = _cstrings(body, 2)
        if not name and self._intercepted is not None:
            # The server's unnamed statement replaces (or, for a Query,
            # drops) an intercepted one.
            self._intercepted.pop(b"s:", None)
        action = self._plugin_action(t, data, pos, end, name, text, plugins)
        if plugins.log_queries and action is not _WAIT:   # (held: logged when whole)
            log.info("[pool: {pool}][user: {user}] {query}",
                     pool=self.user_pool.pool_cfg.name, user=self.user,
                     query=text.decode("utf-8", "replace"))
        return action

    def _plugin_action(self, t, data, pos, end, name, text, plugins):
        quiet = pos == 0 and self._nothing_in_flight()
        canned = plugins.intercepted(text)
        if canned is not None and quiet:
            if t == _Q and end == len(data):
                self.transport.write(canned.description()
                                     + canned.rows_and_tag(self.user, self.database)
                                     + self._ready())
                return True
            if t == _P:
                answered = self._answer_group(data)
                if answered is not False:
                    return True if answered else _WAIT
        if plugins.tables:
            if text[:1].isspace() or text[:3].lower() in (b"set", b"sho"):
                # PgCat's custom commands (answered by the pooler, not SQL
                # the parser reads): only what follows them is checked.
                text = custom.leading(text)[1]
                if not text.strip():
                    return None
            table = plugins.denied(self.user_pool.router.classify(text))
            if table is not None:
                return self._refuse_query(t, data, pos, end, name, _denied_error(table), quiet)
        return None

    def _nothing_in_flight(self):
        sc = self.scanner
        if sc.pending or sc.unsynced or sc.in_copy or not sc.at_boundary \
                or self._checking_out or self._held:
            return False
        return self.server is None or self.server.scanner.at_boundary

    def _ready(self):
        server = self.server
        status = server.scanner.tx_status if server is not None else codes.TX_IDLE
        return m.ready_for_query(bytes((status,)))

    def _refuse_query(self, t, data, pos, end, name, err, quiet):
        log.info("client {user}@{db}: refused by table_access: {err}", user=self.user,
                 db=self.database, err=err.message)
        if quiet:
            if t == _Q:
                self.transport.write(err.to_message() + self._ready())
                rest = data[end:]
                if rest:
                    self._entry(rest)
                return True
            self._skip_to_sync(err, data, self._ready())
            return True
        sql = _server_side_error(err)
        if t == _Q:
            return m.query(sql.decode())
        return b"P" + (len(name) + len(sql) + 8).to_bytes(4, "big") + name + b"\0" \
            + sql + b"\0\0\0"

    def _answer_group(self, data):
        """An extended-protocol group at offset 0 (an intercepted Parse, or a
        Bind of an intercepted statement) that ends with a Sync, or a Flush
        at the end of ``data``: every message answered as the server would.
        -> True; False (nothing sent) if the group holds anything else; None
        if it may still be answered once more of it has come."""
        names = dict(self._intercepted or {})
        out = []
        pos, n = 0, len(data)
        while pos + 5 <= n:
            t, ln = _unpack_header(data, pos)
            end = pos + 1 + ln
            if t not in _LOCAL_GROUP or ln < 4:
                return False
            if end > n:
                break
            reply = self._local_reply(t, data[pos + 5:end], names)
            if reply is None:
                return False
            out.append(reply)
            pos = end
            if t == _S or (t == _H and end == n):
                # Statements stay (a later Bind may use them: asyncpg binds
                # its unnamed one after a Flush or a Sync); portals end at
                # a Sync.
                if t == _S:
                    names = {k: v for k, v in names.items() if k[:2] == b"s:"}
                    out.append(self._ready())
                self._intercepted = names or None
                self.transport.write(b"".join(out))
                rest = data[end:]
                if rest:
                    self._entry(rest)
                return True
        return None if n <= _GROUP_LIMIT else False

    def _local_reply(self, t, body, names):
        """The answer to one message of an intercepted group (without
        ReadyForQuery), or None if the pooler cannot give it. ``names``:
        b"s:" + statement or b"p:" + portal -> (Intercept, formats)."""
        if t == _P:
            (name, text), _ = _cstrings(body, 2)
            found = self.user_pool.plugins.intercepted(text)
            if found is None:
                return None
            names[b"s:" + name] = (found, None)
            return m.PARSE_COMPLETE
        if t == _B:
            (portal, stmt), pos = _cstrings(body, 2)
            entry = names.get(b"s:" + stmt)
            if entry is None:
                return None
            formats = entry[0].formats(_result_formats(body, pos))
            if formats is None:
                return None
            names[b"p:" + portal] = (entry[0], formats)
            return m.BIND_COMPLETE
        if t == _D:
            kind, name = body[:1], bytes(body[1:-1])
            entry = names.get((b"s:" if kind == b"S" else b"p:") + name)
            if entry is None:
                return None
            found, formats = entry
            if kind == b"S":
                return found.parameters() + found.description()
            return found.description(formats)
        if t == _E:
            (portal,), _ = _cstrings(body, 1)
            entry = names.get(b"p:" + portal)
            if entry is None:
                return None
            return entry[0].rows_and_tag(self.user, self.database, entry[1])
        if t == _C:
            kind, name = body[:1], bytes(body[1:-1])
            names.pop((b"s:" if kind == b"S" else b"p:") + name, None)
            return _CLOSE_COMPLETE
        return b""      # Flush, Sync (its ReadyForQuery is added by the caller)


def _result_formats(body, pos):
    """A Bind's result-column format codes (its names end at ``pos``)."""
    try:
        nfmt = int.from_bytes(body[pos:pos + 2], "big")
        pos += 2 + 2 * nfmt
        nparams = int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
        for _ in range(nparams):
            size = int.from_bytes(body[pos:pos + 4], "big", signed=True)
            pos += 4 + max(size, 0)
        nres = int.from_bytes(body[pos:pos + 2], "big")
        raw = body[pos + 2:pos + 2 + 2 * nres]
        return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]
    except IndexError:
        return [1]      # unreadable: answered by the server
