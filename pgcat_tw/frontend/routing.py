"""Routing at the start of a transaction: which shard, which role (L2).

``Routing`` is a part of ``ClientProtocol`` (a mixin). ``_route`` runs once
per transaction, when its first chunk arrives and the pool has a router
(``router.pool_router.PoolRouter``; pools that neither parse nor shard have
none and pay one ``is None`` test). It sets the two flat attributes the
checkout reads, ``shard`` and ``role``, and they hold until the transaction
ends:

- the shard: a comment hint (``shard_id_regex`` / ``sharding_key_regex``),
  else the statement's automatic sharding key (its literals or its Bind
  parameters), else what ``SET SHARD`` / ``SET SHARDING KEY`` chose, else
  ``default_shard`` (a number, ``random``, or ``random_healthy``: the shard
  whose servers failed least);
- the role: what ``SET SERVER ROLE`` chose, or with ``auto`` (the default
  when ``query_parser_read_write_splitting`` is on) the parser's inference
  over every statement the chunk holds: any write, and anything it cannot
  parse, goes to the primary.

A statement the router cannot send to one shard is answered with its error
(no server involved) and the client goes on.
"""

import random

from twisted.logger import Logger

from pgcat_tw.errors import PgError
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import _unpack_header

log = Logger()

AUTO = "auto"
ANY_SHARD = -1        # SET SHARD TO ANY: a random shard for each transaction


def requests(data):
    """(kind, text, name, bind body) for the Query, Parse and Bind messages
    wholly inside ``data``: kind is b"Q", b"P" or b"B"; text the SQL (bytes,
    None for a Bind); name the statement's name."""
    out = []
    pos, n = 0, len(data)
    while pos + 5 <= n:
        t, ln = _unpack_header(data, pos)
        end = pos + 1 + ln
        if ln < 4 or end > n:
            break
        body = data[pos + 5:end]
        if t == codes.F_QUERY:
            out.append((b"Q", bytes(body[:-1]), b"", None))
        elif t == codes.F_PARSE:
            cut = body.find(b"\0")
            stop = body.find(b"\0", cut + 1)
            if cut >= 0 and stop > cut:
                out.append((b"P", bytes(body[cut + 1:stop]), bytes(body[:cut]), None))
        elif t == codes.F_BIND:
            cut = body.find(b"\0")
            stop = body.find(b"\0", cut + 1)
            if cut >= 0 and stop > cut:
                out.append((b"B", None, bytes(body[cut + 1:stop]), bytes(body)))
        pos = end
    return out


_Q, _P = codes.F_QUERY, codes.F_PARSE
_FOLLOW_PARSE = frozenset(b"BDESH")   # what may follow an unnamed Parse in the fast shape


def _single_request(data):
    """The SQL of ``data`` when it is one whole Query, or one unnamed Parse
    followed only by Bind (of the unnamed statement), Describe, Execute,
    Sync or Flush: bytes; else None (the general walk decides)."""
    n = len(data)
    if n < 6:
        return None
    t, ln = _unpack_header(data, 0)
    end = 1 + ln
    if t == _Q:
        return data[5:-1] if end == n and ln > 4 else None
    if t != _P or data[5] != 0 or end > n:
        return None
    stop = data.find(b"\0", 6, end)
    if stop < 0:
        return None
    pos = end
    while pos < n:
        if pos + 5 > n:
            return None
        t, ln = _unpack_header(data, pos)
        nxt = pos + 1 + ln
        if t not in _FOLLOW_PARSE or ln < 4 or nxt > n:
            return None
        if t == 66:     # Bind: its statement must be the unnamed one
            cut = data.find(b"\0", pos + 5, nxt)
            if cut < 0 or cut + 1 >= nxt or data[cut + 1] != 0:
                return None
        pos = nxt
    return data[6:stop]


class Routing:
    """Part of ClientProtocol: the route of each transaction."""

    role_setting = None       # SET SERVER ROLE's choice ('auto' lets the parser decide)
    shard_setting = None      # SET SHARD / SET SHARDING KEY's choice (None: default_shard)
    _routes = None            # statement name -> Inference (named Parses seen)

    def _route(self, data, router):
        """Choose this transaction's shard and role. -> True if the request
        was answered here (an error), False to go on with the checkout."""
        try:
            shard, role = self._decide(data, router)
        except PgError as e:
            self._refuse(e, data)
            return True
        self.shard = shard
        self.role = role
        return False

    def _decide(self, data, router):
        setting = self.role_setting
        parse = router.splitting and setting == AUTO
        if router.hints is None and not router.auto_key:
            # No text picks the shard: the parser only decides the role, and
            # the usual shapes (one Query; one unnamed Parse with its Bind,
            # Describe, Execute, Sync) skip the general walk.
            shard = self.shard_setting
            if shard is None and type(router.default_shard) is int:
                shard = router.default_shard        # (the usual case, inline)
            else:
                shard = self._settled_shard(shard, router)
            if not parse:
                return shard, setting if setting != AUTO else "any"
            found = _single_request(data)
            if found is not None:
                inference = router.classifier.classify(found)
                return shard, "primary" if inference.role == "primary" \
                    or shard not in router.replicated else "replica"
        need = parse or router.auto_key
        shard = None
        known = 0            # requests whose inference is known
        doubtful = False     # a Bind of a statement not seen here, or a write
        inferences = {}
        for kind, text, name, bind in requests(data):
            if text is not None and shard is None:
                shard = router.hinted(text)
            if not need:
                continue
            if kind == b"B":
                found = inferences.get(name) or (self._routes or {}).get(name)
                if found is None:
                    doubtful = True
                    continue
                if router.auto_key and shard is None:
                    shard = router.keyed(found, bind)
            else:
                found = router.classify(text)
                inferences[name] = found
                if name:
                    if self._routes is None:
                        self._routes = {}
                    self._routes[name] = found
                # (A Parse's keys may be parameters: the Bind after it resolves them.)
                if router.auto_key and shard is None and (kind == b"Q" or found.keys
                                                          or found.shard_error):
                    shard = router.keyed(found)
            known += 1
            if found.role == "primary":
                doubtful = True
        shard = self._settled_shard(shard, router)
        if parse:
            # Anything that writes, or that could not be classified, goes to
            # the primary; so do reads on a shard without replicas.
            role = "primary" if doubtful or not known or shard not in router.replicated \
                else "replica"
        else:
            role = setting if setting != AUTO else "any"
        return shard, role

    def _settled_shard(self, shard, router):
        """``shard`` (from the text), else SET SHARD's, else the default."""
        if shard is None:
            shard = self.shard_setting
            if shard == ANY_SHARD:
                shard = random.randrange(router.shards)
        if shard is None:
            shard = self._default_shard(router)
        return shard

    def _default_shard(self, router):
        d = router.default_shard
        if type(d) is int:
            return d
        if d == "random":
            return random.randrange(router.shards)
        # random_healthy: among the shards whose servers failed least.
        errors = {}
        for pool in self.user_pool.address_pools:
            h = pool.health
            s = pool.shard.index
            errors[s] = errors.get(s, 0) + (h.errors if h is not None else 0)
        least = min(errors.values())
        return random.choice(sorted(s for s, e in errors.items() if e == least))

    def _refuse(self, err, data):
        """Answer a request the router will not send anywhere with ``err``,
        as PostgreSQL answers an error: a simple Query gets it and
        ReadyForQuery; an extended request gets it and everything up to the
        next Sync is skipped."""
        sc = self.scanner
        log.info("client {user}@{db}: not routed: {err}", user=self.user, db=self.database,
                 err=err.message)
        if data[0] == codes.F_QUERY and len(requests(data)) == 1 and sc.at_boundary \
                and not sc.unsynced:
            sc.pending -= 1
            self.transport.write(err.to_message() + m.READY_IDLE)
            return
        self._skip_to_sync(err, data)
