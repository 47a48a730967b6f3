"""Which server address a transaction goes to, for one (pool, user): roles,
load balancing, bans and replica lag (reference §4.7, PgCat's semantics with
its holes fixed).

Pure bookkeeping, no I/O: ``health.HealthMonitor`` runs the checks and
reports what it saw here; time comes from the reactor passed in.

Per address (a ``pool.ConnectionPool``) an ``AddressState`` holds the role
seen by ``pg_is_in_recovery()`` (None until a connection reported it), the
ban, the last WAL position and the lag behind the primary.

Routes: for each (shard, role, primary_reads) the tuple of addresses that
may serve it is computed once and cached until a ban, a role or a lag
eligibility changes, so the hot path (``take_idle``) is a dict lookup and
one random pick:

- ``primary``: the shard's acting primary (``Balancer.acting``), chosen
  by the role rules below; none while no server qualifies.
- ``replica``: replicas that are not banned and not lagging more than
  ``max_replica_lag`` bytes; the primary too when primary reads are on, or
  when every available replica lags.
- ``any`` (and ``auto``, without the query parser): both.

Bans: a replica that fails a connect, a health check or a query is banned
for ``ban_time``; the primary never is. When every replica of a shard is
banned and a checkout has nowhere else to go (role ``replica`` without
primary reads), the shard's bans are cleared (PgCat's rule).

Roles (issue 13): the configured roles are the truth until a failover
shows otherwise. The acting primary starts as the configured one and keeps
the writes while it answers and is not in recovery. Another server takes
them over only when the acting primary is gone (a connect, check or query
failed and it has not answered since) or in recovery, and that server left
recovery: the pooler saw it in recovery and now it is not, or it says it
streamed WAL as a standby since it started (``pg_last_wal_receive_lsn()`` is
not NULL while it is not in recovery). Exactly one such server must qualify:
with two, nobody gets the writes (their error names them) rather than a
guess. A server that is simply not in recovery (a standalone copy, a
logical subscriber) while the acting primary is healthy is a replica: it
serves reads and is warned about once. A replaced primary that is not in
recovery (back after a failover: split brain) serves nothing until it
reports it is in recovery (it rejoined as a standby), then it is a replica.
Started after a failover (the acting primary never answered as a primary
yet): if the configured primary reports it is in recovery, which proves a
failover, the only server that is not in recovery (every other one having
reported) takes the writes even without having been seen leaving recovery;
an unreachable configured primary proves nothing, and nothing is elected
on that alone. This runs when a report or a failure comes in, never per
transaction: the routes are rebuilt from its result.
"""

import random

from twisted.logger import Logger

from pgcat_tw.errors import ServerConnectionFailed

log = Logger()

PRIMARY = "primary"
REPLICA = "replica"

_random = random.random


class AddressState:
    __slots__ = ("configured", "role", "banned_until", "ban_reason", "seen_in_recovery",
                 "left_recovery_at", "down", "displaced", "warned", "lsn", "lag", "checking",
                 "next_probe", "probe_failed_at", "last_check", "errors", "ban_duration",
                 "admin_ban")

    def __init__(self, configured):
        self.configured = configured    # role in the configuration
        # What the server last reported: REPLICA (in recovery), PRIMARY (not
        # in recovery); None: not yet known. Whether it takes the writes is
        # the balancer's decision (``Balancer.acting``), not this.
        self.role = None
        self.banned_until = None        # reactor time the ban ends; None: not banned
        self.ban_reason = None
        self.ban_duration = 0.0         # seconds the current ban was for
        self.admin_ban = False          # banned by the admin console: no probe lifts it
        self.seen_in_recovery = False   # it reported being in recovery once
        self.left_recovery_at = None    # when it was seen to leave recovery
        self.down = False               # failed, and has not answered since
        self.displaced = False          # a replaced primary, not seen in recovery since
        self.warned = None              # the one warning logged for its state
        self.lsn = None                 # last WAL position seen (replay on a replica)
        self.lag = None                 # bytes behind the primary; None: unknown
        self.checking = False           # a health check or probe is running
        self.next_probe = 0.0           # banned: when to probe next
        self.probe_failed_at = None     # banned: when the last probe failed
        self.last_check = None
        self.errors = 0

    @property
    def effective_role(self):
        """In recovery (REPLICA) or not (PRIMARY) as last reported, else as
        configured: whether it could have written anything."""
        return self.role or self.configured

    @property
    def banned(self):
        return self.banned_until is not None


def address_name(pool):
    a = pool.address
    return f"{a.host}:{a.port}" if a is not None else pool.name


def _names(pools):
    return ", ".join(address_name(p) for p in pools)


def _key(pool):
    a = pool.address
    return (a.host, a.port, a.role, pool.shard.database)


class Balancer:
    def __init__(self, reactor, pools, mode="random", default_role="any", ban_time=60.0,
                 max_lag=None, probe_interval=1.0, name="pool"):
        self.reactor = reactor
        self.pools = list(pools)
        self.loc = mode == "loc"
        self.default_role = default_role
        self.ban_time = ban_time
        self.max_lag = max_lag
        self.probe_interval = probe_interval   # seconds; 0: bans last ban_time
        self.name = name
        self.shards = {}                       # shard index -> pools, in config order
        for p in self.pools:
            if p.health is None:
                p.health = AddressState(p.address.role)
            self.shards.setdefault(p.shard.index, []).append(p)
        self.primary_lsn = {}                  # shard -> WAL position of its primary
        self.discovering = set()               # shards whose primary is being looked for
        # shard -> the configured primary (None if the shard has none), and
        # the acting primary: the one address that takes the writes (None:
        # no primary). Changed only by ``_elect``.
        self.configured_primary = {
            shard: next((p for p in pools if p.address.role == PRIMARY), None)
            for shard, pools in self.shards.items()}
        self.acting = dict(self.configured_primary)
        self.confirmed = set()   # shards whose acting primary answered as a primary
        self.contested = set()   # shards with a replica that left recovery
        self.no_primary = {}     # shard -> why no other server takes over
        # shard -> [routes without primary reads, routes with]: role -> tuple
        # (nested so the hot path allocates no key).
        self._routes = {shard: [{}, {}] for shard in self.shards}
        # Bumped whenever the routes are rebuilt (a ban, a role change, lag):
        # a checkout that queued on an address under the same epoch knows the
        # address still serves its route without looking it up.
        self.epoch = 0
        # The last pick of ``take_idle`` among several addresses: when it had
        # no idle server the slow path queues there (``choose(prefer=)``), so
        # an address with idle servers is not favoured over the pick.
        self.picked = None

    # --- routes ---------------------------------------------------------------

    def _role(self, role):
        if role in (PRIMARY, REPLICA, "any"):
            return role
        if role is None or role == "default":
            role = self.default_role
            return role if role in (PRIMARY, REPLICA) else "any"
        return "any"  # 'auto' without the query parser

    def route(self, shard, role, primary_reads):
        """The addresses that may serve (shard, role), cached."""
        by_pr = self._routes.get(shard)
        if by_pr is None:
            return ()
        cache = by_pr[bool(primary_reads)]
        r = cache.get(role)
        if r is None:
            r = cache[role] = self._build(shard, self._role(role), primary_reads)
        return r

    def invalidate(self):
        self.epoch += 1
        for by_pr in self._routes.values():
            by_pr[0].clear()
            by_pr[1].clear()

    def primary(self, shard):
        """The shard's acting primary (see "Roles" above), or None."""
        return self.acting.get(shard)

    def replicas(self, shard):
        """Addresses of the shard that serve reads as replicas (banned or
        not): all but the acting primary and a replaced primary that is not
        in recovery."""
        primary = self.acting.get(shard)
        return [p for p in self.shards.get(shard, ())
                if p is not primary and not p.health.displaced]

    def lagging(self, pool):
        lag = pool.health.lag
        return self.max_lag is not None and lag is not None and lag > self.max_lag

    def _build(self, shard, role, primary_reads):
        primary = self.primary(shard)
        if role == PRIMARY:
            return (primary,) if primary is not None else ()
        available = [p for p in self.replicas(shard) if p.health.banned_until is None]
        fresh = [p for p in available if not self.lagging(p)]
        out = fresh
        if primary is not None and (role == "any" or primary_reads or (available and not fresh)):
            # Every available replica lags: the primary serves the reads
            # rather than stale data being served.
            out = fresh + [primary]
        return tuple(out)

    # --- choosing ---------------------------------------------------------------

    def take_idle(self, role, primary_reads, shard):
        """Hot path: an idle, recently used server of a balanced pick among
        the route's addresses, or None (the caller's slow path decides)."""
        try:
            route = self._routes[shard][primary_reads][role]
        except (KeyError, TypeError, IndexError):
            route = self.route(shard, role, primary_reads)
        n = len(route)
        if n == 1:
            pool = route[0]
        elif n == 0:
            self.picked = None
            return None
        elif self.loc:
            pool = self._least_busy(route)
        else:
            pool = route[int(_random() * n)]
        self.picked = pool
        return pool.take_idle() if pool.idle else None

    def _least_busy(self, pools):
        best = None
        best_n = 0
        ties = 0
        for p in pools:
            n = len(p.busy) + len(p.waiters)
            if best is None or n < best_n:
                best, best_n, ties = p, n, 1
            elif n == best_n:
                ties += 1
                if _random() * ties < 1.0:  # uniform among the least busy
                    best = p
        return best

    def choose(self, shard, role, primary_reads, exclude=(), prefer=None):
        """Slow path: the next address to try for a checkout, skipping
        ``exclude`` (already tried), ``prefer`` if it is a candidate; None
        when nothing is left."""
        route = self.route(shard, role, primary_reads)
        cands = [p for p in route if p not in exclude]
        if not cands and self._role(role) == REPLICA and not primary_reads:
            reps = self.replicas(shard)
            if reps and all(p.health.banned_until is not None for p in reps) \
                    and any(p not in exclude for p in reps):
                # PgCat's rule: every replica banned and nowhere else to go.
                log.warn("{name}: every replica of shard {shard} is banned: clearing the bans",
                         name=self.name, shard=shard)
                self.clear_bans(shard)
                cands = [p for p in self.route(shard, role, primary_reads) if p not in exclude]
        if not cands:
            if self._role(role) == PRIMARY:
                self.discovering.add(shard)
            return None
        if len(cands) == 1 or prefer in cands:
            return prefer if prefer in cands else cands[0]
        if self.loc:
            return self._least_busy(cands)
        return cands[int(_random() * len(cands))]

    def serves(self, pool, role, primary_reads, shard):
        return pool in self.route(shard, role, primary_reads)

    def unavailable_error(self, shard, role, primary_reads, last=None):
        """The error for a checkout that has nothing (left) to try;
        ``last``: why the last address tried failed."""
        role = self._role(role)
        pools = self.shards.get(shard)
        if pools is None:
            return ServerConnectionFailed(f'{self.name}: shard {shard} is not configured')
        if role == PRIMARY:
            note = self.no_primary.get(shard)
            if last is not None:
                if note and isinstance(last, ServerConnectionFailed):
                    return ServerConnectionFailed(f"{last.message}; no other server takes "
                                                  f"the writes: {note}")
                return last
            return ServerConnectionFailed(
                f"{self.name}: no primary is available for shard {shard} "
                f"({note or 'every server reports it is in recovery'}); "
                "waiting for one to be promoted")
        reps = self.replicas(shard)
        if role == "any" or primary_reads:
            what = "no server"
        elif not reps:
            return ServerConnectionFailed(
                f"{self.name}: no replica is configured for shard {shard} and primary reads "
                "are off")
        else:
            what = "no replica"
        states = []
        for p in self.shards[shard]:
            h = p.health
            if h.banned:
                states.append(f"{address_name(p)} banned: {h.ban_reason}")
            elif self.lagging(p):
                states.append(f"{address_name(p)} lagging {h.lag} bytes")
        msg = f"{self.name}: {what} of shard {shard} is available"
        if what == "no replica":
            msg += " and primary reads are off"
        if states:
            msg += " (" + "; ".join(states) + ")"
        if last is not None:
            msg += f"; last error: {getattr(last, 'message', last)}"
        return ServerConnectionFailed(msg)

    # --- bans -----------------------------------------------------------------------

    def ban(self, pool, reason, duration=None, admin=False):
        """Ban a replica for ban_time (or ``duration`` seconds); the primary
        is never banned. Clients queued on it go to their next candidate at
        once. ``admin``: a ban from the admin console (BAN), which lasts its
        duration whatever the probes see and replaces a running ban. ->
        banned?"""
        h = pool.health
        if not admin:
            h.errors += 1
        if self.is_primary(pool):
            return False
        if h.banned_until is not None and not admin:
            return True
        now = self.reactor.seconds()
        t = self.ban_time if duration is None else duration
        h.banned_until = now + t
        h.ban_duration = t
        h.ban_reason = reason
        h.admin_ban = admin
        h.next_probe = now + self.probe_interval
        h.probe_failed_at = None
        self.invalidate()
        log.warn("{name}: server {addr} banned for {t:.0f} s: {reason}", name=self.name,
                 addr=address_name(pool), t=t, reason=reason)
        pool.fail_waiters(ServerConnectionFailed(
            f"{pool.name}: server banned: {reason}"))
        return True

    def unban(self, pool, why="back in rotation"):
        h = pool.health
        if h.banned_until is None:
            return
        h.banned_until = None
        h.ban_reason = None
        h.admin_ban = False
        h.probe_failed_at = None
        self.invalidate()
        log.info("{name}: server {addr} {why}", name=self.name, addr=address_name(pool), why=why)

    def is_primary(self, pool):
        """Does ``pool``'s address take the writes of its shard now?"""
        return pool is self.acting.get(pool.shard.index)

    def clear_bans(self, shard):
        for p in self.shards.get(shard, ()):
            self.unban(p, "unbanned (every replica was banned)")

    def expire(self, now):
        """End the bans whose ban_time is over, unless the address failed
        its latest probe (it is still down: the ban is renewed)."""
        for p in self.pools:
            h = p.health
            if h.banned_until is not None and now >= h.banned_until:
                if self.probe_interval and h.probe_failed_at is not None and not h.admin_ban \
                        and now - h.probe_failed_at <= 2 * self.probe_interval:
                    h.banned_until = now + self.ban_time
                    continue
                self.unban(p, "ban expired")

    # --- what the health checks saw --------------------------------------------------

    def set_role(self, pool, in_recovery, streamed=False):
        """A connection or check reported whether its server is in recovery;
        ``streamed``: it also said it streamed WAL as a standby since it
        started (``pg_last_wal_receive_lsn()`` not NULL). -> changed?"""
        h = pool.health
        new = REPLICA if in_recovery else PRIMARY
        if h.role == new and not h.down and not (streamed and h.left_recovery_at is None
                                                 and not in_recovery):
            return False
        h.down = False
        h.role = new
        if in_recovery:
            if h.displaced:
                h.displaced = False
                log.warn("{name}: server {addr} is now a {new} (was {old}): routing follows",
                         name=self.name, addr=address_name(pool), new=REPLICA,
                         old="former primary")
            h.seen_in_recovery = True
            h.left_recovery_at = None
            h.warned = None
        elif h.left_recovery_at is None and (h.seen_in_recovery or streamed):
            h.left_recovery_at = self.reactor.seconds()
        shard = pool.shard.index
        self._elect(shard)
        self.invalidate()
        if not in_recovery and pool is not self.acting.get(shard):
            self._warn_not_acting(pool, shard)
        return True

    def server_down(self, pool):
        """A connect, check or query of ``pool``'s server failed: it counts
        as gone (for the role rules) until it reports again."""
        h = pool.health
        if h.down:
            return
        h.down = True
        shard = pool.shard.index
        before = self.acting.get(shard)
        self._elect(shard)
        if self.acting.get(shard) is not before:
            self.invalidate()

    # --- the role rules (module docstring, "Roles") ----------------------------------

    def _elect(self, shard):
        """Keep the acting primary while it is healthy; otherwise hand the
        writes to the one server that qualifies, if any."""
        acting = self.acting.get(shard)
        if acting is not None and acting.health.role != REPLICA and not acting.health.down:
            if acting.health.role == PRIMARY:
                self.confirmed.add(shard)
            self._set_note(shard, None)
            self._contest(shard, acting)
            return
        self.contested.discard(shard)
        new, note, loud = self._successor(shard, acting)
        self._set_note(shard, note, loud)
        if new is not None:
            self._replace(shard, acting, new)
        elif acting is not None and acting.health.role == REPLICA:
            # In recovery with nobody to take over: no primary. (A primary
            # that is only gone keeps the route: writes get its errors.)
            self._replace(shard, acting, None)

    def _successor(self, shard, acting):
        """-> (the server that takes the writes or None, why none does,
        whether that is worth a warning: only when other servers are
        involved; a plain outage of the primary has its own log line in
        ``cluster.UserPool.server_failed``)."""
        others = [p for p in self.shards.get(shard, ())
                  if p is not acting and not p.health.displaced]
        out = [p for p in others if p.health.role == PRIMARY]   # not in recovery
        left = [p for p in out if p.health.left_recovery_at is not None]
        cp = self.configured_primary.get(shard)
        if left:
            cands, what = left, "left recovery"
        elif out and shard not in self.confirmed and cp is not None \
                and cp.health.role == REPLICA:
            # Started after a failover: the configured primary is a standby.
            waiting = [p for p in others if p.health.role is None and not p.health.banned]
            if waiting:
                return (None, f"waiting for {_names(waiting)} to report whether in recovery",
                        False)
            cands, what = out, f"not in recovery while {address_name(cp)} is"
        elif out:
            return None, (f"{_names(out)} {'is' if len(out) == 1 else 'are'} not in recovery "
                          "but never seen leaving it"), True
        elif acting is not None and acting.health.role != REPLICA:
            return None, f"{address_name(acting)} does not answer", False
        elif all(p.health.role is not None for p in others):
            return None, "every server reports it is in recovery", False
        else:
            return None, "no server reported it is out of recovery", False
        if len(cands) > 1:
            return None, (f"{_names(cands)} are all {what}: not choosing one (set the "
                          "primary in the configuration)"), True
        h = cands[0].health
        if h.banned or h.down:
            return None, f"{address_name(cands[0])} ({what}) does not answer", True
        return cands[0], None, False

    def _replace(self, shard, old, new):
        self.acting[shard] = new
        self.invalidate()
        if old is not None:
            if old.health.role != REPLICA:
                # Gone, and not seen in recovery: if it comes back as it
                # was, it holds writes the new primary has not (split brain).
                old.health.displaced = True
                old.health.warned = None
                old.fail_waiters(ServerConnectionFailed(
                    f"{old.name}: no longer the primary of shard {shard}"))
            else:
                log.warn("{name}: server {addr} is now a {new} (was {old}): routing follows",
                         name=self.name, addr=address_name(old), new=REPLICA, old=PRIMARY)
        if new is not None:
            self.confirmed.add(shard)   # it answered as a primary to be chosen
            new.health.displaced = False
            new.health.warned = None
            log.warn("{name}: server {addr} is now a {new} (was {old}): routing follows",
                     name=self.name, addr=address_name(new), new=PRIMARY, old=REPLICA,
                     replaced=address_name(old) if old is not None else None)

    def _contest(self, shard, acting):
        """Note whether a replica left recovery while the acting primary is
        healthy (the health checks then ask the primary every period)."""
        if any(p is not acting and p.health.role == PRIMARY
               and p.health.left_recovery_at is not None for p in self.shards[shard]):
            self.contested.add(shard)
        else:
            self.contested.discard(shard)

    def _set_note(self, shard, note, loud=False):
        if note == self.no_primary.get(shard):
            return
        self.no_primary[shard] = note
        if loud:
            log.warn("{name}: shard {shard}: no server takes over the writes: {why}",
                     name=self.name, shard=shard, why=note)

    def _warn_not_acting(self, pool, shard):
        """One warning per state for a server that is not in recovery and
        does not take the writes."""
        h = pool.health
        primary = self.acting.get(shard)
        pname = address_name(primary) if primary is not None else None
        if h.displaced:
            if h.warned != "displaced":
                h.warned = "displaced"
                log.warn("{name}: server {addr}, a former primary of shard {shard}, is not in "
                         "recovery while {primary} is the primary (split brain): it gets no "
                         "queries until it reports it is in recovery", name=self.name,
                         addr=address_name(pool), shard=shard, primary=pname)
            return
        if h.warned is not None:
            return
        healthy = primary is not None and not primary.health.down
        if not healthy and self.no_primary.get(shard):
            return   # the shard's warning (``_set_note``) says why
        h.warned = "replica"
        if h.left_recovery_at is not None:
            log.warn("{name}: server {addr} left recovery but the primary {primary} answers: "
                     "it stays a replica (reads only) unless that primary fails or enters "
                     "recovery", name=self.name, addr=address_name(pool), shard=shard,
                     primary=pname)
        else:
            log.warn("{name}: server {addr} is not in recovery but was never seen in "
                     "recovery (configured as {configured}): it stays a replica (reads "
                     "only, no writes)", name=self.name, addr=address_name(pool),
                     configured=h.configured, shard=shard, primary=pname)

    def inherit(self, old):
        """After a reload: what ``old`` (the balancer this one replaces)
        learned about roles, for each shard whose servers are unchanged,
        so a reload does not forget a failover."""
        for shard, pools in self.shards.items():
            prev = old.shards.get(shard)
            if prev is None:
                continue
            if [_key(p) for p in prev if p.address.role == PRIMARY] != \
                    [_key(p) for p in pools if p.address.role == PRIMARY]:
                continue  # the primary was edited: the file is the truth again
            by_key = {_key(q): q for q in prev}
            for p in pools:
                q = by_key.get(_key(p))
                if q is None or q.health is p.health:
                    continue  # a new server, or the same pool kept by the reload
                h, g = p.health, q.health
                h.role, h.seen_in_recovery, h.left_recovery_at = \
                    g.role, g.seen_in_recovery, g.left_recovery_at
                h.down, h.displaced, h.warned = g.down, g.displaced, g.warned
            a = old.acting.get(shard)
            if a is None:
                self.acting[shard] = None
            else:
                # The acting primary, if its server is still configured
                # (servers were added or removed around it).
                self.acting[shard] = next((p for p in pools if _key(p) == _key(a)),
                                          self.acting.get(shard))
            if shard in old.confirmed:
                self.confirmed.add(shard)
            if shard in old.contested:
                self.contested.add(shard)
            self.no_primary[shard] = old.no_primary.get(shard)
        self.invalidate()

    def set_lsn(self, pool, lsn):
        """Record a WAL position: the primary's current one, or a replica's
        replay position (its lag is measured against the primary's last)."""
        h = pool.health
        h.lsn = lsn
        shard = pool.shard.index
        if h.effective_role == PRIMARY:
            if pool is self.primary(shard) and lsn is not None:
                self.primary_lsn[shard] = lsn
            h.lag = None
            return
        plsn = self.primary_lsn.get(shard)
        was = self.lagging(pool)
        h.lag = None if plsn is None or lsn is None else max(0, plsn - lsn)
        now = self.lagging(pool)
        if now != was:
            self.invalidate()
            if now:
                log.warn("{name}: replica {addr} is {lag} bytes behind the primary "
                         "(max_replica_lag {max}): no reads until it catches up",
                         name=self.name, addr=address_name(pool), lag=h.lag, max=self.max_lag)
            else:
                log.info("{name}: replica {addr} caught up: back in rotation",
                         name=self.name, addr=address_name(pool))
