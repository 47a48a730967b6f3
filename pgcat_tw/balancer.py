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

- ``primary``: the shard's primary: the address that reports it is not in
  recovery (the most recently promoted one if several do); before anything
  was reported, the configured primary.
- ``replica``: replicas that are not banned and not lagging more than
  ``max_replica_lag`` bytes; the primary too when primary reads are on, or
  when every available replica lags.
- ``any`` (and ``auto``, without the query parser): both.

Bans: a replica that fails a connect, a health check or a query is banned
for ``ban_time``; the primary never is. When every replica of a shard is
banned and a checkout has nowhere else to go (role ``replica`` without
primary reads), the shard's bans are cleared (PgCat's rule).
"""

import random

from twisted.logger import Logger

from pgcat_tw.errors import ServerConnectionFailed

log = Logger()

PRIMARY = "primary"
REPLICA = "replica"

_random = random.random


class AddressState:
    __slots__ = ("configured", "role", "banned_until", "ban_reason", "promoted_at", "lsn",
                 "lag", "checking", "next_probe", "probe_failed_at", "last_check", "errors")

    def __init__(self, configured):
        self.configured = configured    # role in the configuration
        self.role = None                # reported: PRIMARY / REPLICA; None: not yet known
        self.banned_until = None        # reactor time the ban ends; None: not banned
        self.ban_reason = None
        self.promoted_at = -1.0         # when it was seen to become a primary
        self.lsn = None                 # last WAL position seen (replay on a replica)
        self.lag = None                 # bytes behind the primary; None: unknown
        self.checking = False           # a health check or probe is running
        self.next_probe = 0.0           # banned: when to probe next
        self.probe_failed_at = None     # banned: when the last probe failed
        self.last_check = None
        self.errors = 0

    @property
    def effective_role(self):
        return self.role or self.configured

    @property
    def banned(self):
        return self.banned_until is not None


def address_name(pool):
    a = pool.address
    return f"{a.host}:{a.port}" if a is not None else pool.name


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
        """The shard's primary: reported not in recovery (the most recently
        promoted if several are), else the configured one; None if none."""
        best = None
        for p in self.shards.get(shard, ()):
            h = p.health
            if h.effective_role == PRIMARY and (best is None
                                                or h.promoted_at > best.health.promoted_at):
                best = p
        return best

    def replicas(self, shard):
        """Addresses of the shard that are replicas now (banned or not)."""
        primary = self.primary(shard)
        return [p for p in self.shards.get(shard, ())
                if p is not primary and p.health.effective_role == REPLICA]

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
            if last is not None:
                return last
            return ServerConnectionFailed(
                f"{self.name}: no primary is available for shard {shard} (every server "
                "reports it is in recovery); waiting for one to be promoted")
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

    def ban(self, pool, reason):
        """Ban a replica for ban_time; the primary is never banned. Clients
        queued on it go to their next candidate at once. -> banned?"""
        h = pool.health
        h.errors += 1
        if h.effective_role == PRIMARY:
            return False
        if h.banned_until is not None:
            return True
        now = self.reactor.seconds()
        h.banned_until = now + self.ban_time
        h.ban_reason = reason
        h.next_probe = now + self.probe_interval
        h.probe_failed_at = None
        self.invalidate()
        log.warn("{name}: server {addr} banned for {t:.0f} s: {reason}", name=self.name,
                 addr=address_name(pool), t=self.ban_time, reason=reason)
        pool.fail_waiters(ServerConnectionFailed(
            f"{pool.name}: server banned: {reason}"))
        return True

    def unban(self, pool, why="back in rotation"):
        h = pool.health
        if h.banned_until is None:
            return
        h.banned_until = None
        h.ban_reason = None
        h.probe_failed_at = None
        self.invalidate()
        log.info("{name}: server {addr} {why}", name=self.name, addr=address_name(pool), why=why)

    def clear_bans(self, shard):
        for p in self.shards.get(shard, ()):
            self.unban(p, "unbanned (every replica was banned)")

    def expire(self, now):
        """End the bans whose ban_time is over, unless the address failed
        its latest probe (it is still down: the ban is renewed)."""
        for p in self.pools:
            h = p.health
            if h.banned_until is not None and now >= h.banned_until:
                if self.probe_interval and h.probe_failed_at is not None \
                        and now - h.probe_failed_at <= 2 * self.probe_interval:
                    h.banned_until = now + self.ban_time
                    continue
                self.unban(p, "ban expired")

    # --- what the health checks saw --------------------------------------------------

    def set_role(self, pool, in_recovery):
        """A connection reported whether its server is in recovery."""
        h = pool.health
        new = REPLICA if in_recovery else PRIMARY
        if h.role == new:
            return False
        before = h.effective_role
        h.role = new
        if new == PRIMARY and before != PRIMARY:
            h.promoted_at = self.reactor.seconds()
        if new == PRIMARY and h.banned_until is not None:
            self.unban(pool, "is a primary now")
        self.invalidate()
        if new != before:
            log.warn("{name}: server {addr} is now a {new} (was {old}): routing follows",
                     name=self.name, addr=address_name(pool), new=new, old=before)
        return True

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
