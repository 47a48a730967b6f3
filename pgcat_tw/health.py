"""Background health checks for the addresses of one (pool, user), driven
by the janitor's tick (``tick(now)``). What they learn goes to the
``balancer.Balancer``:

- banned addresses are probed every ``ban_probe_interval`` with a fresh
  connection; the first that answers ends the ban (PgCat waits for
  ``ban_time``); the connection joins the pool;
- every ``healthcheck_interval`` each address answers ``CHECK_SQL`` on an
  idle connection: ``pg_is_in_recovery()``, whether it streamed WAL as a
  standby since it started (``pg_last_wal_receive_lsn()`` is not NULL: a
  promoted standby, not a standalone server) and its WAL position (replica
  lag, when ``max_replica_lag`` is set: then a connection is opened if none
  is idle). The balancer's role rules decide what that means for the
  writes. A connection is also opened, if none is idle, for the acting
  primary of a shard where a replica left recovery (is the primary really
  still there?) and for a replaced primary (has it come back, as a standby
  or not?);
- while a shard has no primary that answers (its checkout failed, or every
  server reports it is in recovery) every address of the shard is checked on
  every tick, opening connections as needed, until one reports it is a
  primary.

A failed check bans a replica; the acting primary is never banned.
"""

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

CHECK_SQL = ("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() "
             "THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, "
             "pg_last_wal_receive_lsn() IS NOT NULL")
# At a new connection whose login did not settle the question: in
# recovery? streamed WAL as a standby since it started?
RECOVERY_SQL = "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn() IS NOT NULL"


def parse_lsn(text):
    """'16/B374D848' -> int; None for NULL or garbage."""
    if not text:
        return None
    try:
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        return None


def parse_check(results):
    """-> (in_recovery, lsn, streamed) from CHECK_SQL's results."""
    r = results[0]
    if r.error:
        raise ValueError(r.error.get("M", "health check query failed"))
    if not r.rows:
        raise ValueError("health check returned no row")
    row = r.rows[0]
    return (row[0] == "t", parse_lsn(row[1] if len(row) > 1 else None),
            len(row) > 2 and row[2] == "t")


class HealthMonitor:
    def __init__(self, reactor, balancer, interval=5.0, probe_interval=1.0, timeout=1.0,
                 on_failure=None):
        self.reactor = reactor
        self.balancer = balancer
        self.interval = interval              # seconds; 0: no periodic checks
        self.probe_interval = probe_interval  # seconds; 0: no probes
        self.timeout = timeout                # healthcheck_timeout, seconds
        self.on_failure = on_failure          # (pool, exception): a check failed
        self.closed = False
        self._pending = set()                 # Deferreds of running checks
        self._extra = set()                   # probe connections not in a pool yet

    # --- the tick ------------------------------------------------------------------

    def tick(self, now):
        if self.closed:
            return
        bal = self.balancer
        bal.expire(now)
        for shard, pools in bal.shards.items():
            # A shard with one server has no role to discover, no lag to
            # measure: only its probes (if it is a banned replica) run.
            multi = len(pools) > 1
            discovering = multi and shard in bal.discovering
            primary = bal.primary(shard)
            # The primary first: replica lag is measured against its position.
            order = pools if primary is None else [primary] + [p for p in pools
                                                                if p is not primary]
            contested = shard in bal.contested
            for pool in order:
                h = pool.health
                if h.checking or pool.closed:
                    continue
                if h.banned_until is not None:
                    # (An admin's BAN lasts its duration: no probe ends it.)
                    if self.probe_interval and now >= h.next_probe and not h.admin_ban:
                        self.probe(pool)
                elif discovering or (multi and self.interval and (
                        h.last_check is None or now - h.last_check >= self.interval - 1e-6)):
                    self.check(pool, open_one=discovering or bal.max_lag is not None
                               or h.displaced or (contested and pool is primary))

    def connections(self):
        """Probe connections open outside the pools."""
        return len(self._extra)

    # --- checks ------------------------------------------------------------------------

    def check(self, pool, open_one=False):
        """Run CHECK_SQL on an idle connection of ``pool`` (or, with
        ``open_one``, a new one if there is room). Returns the Deferred, or
        None when nothing was checked (every connection is busy: it is
        alive, and its role was reported at connect)."""
        h = pool.health
        h.last_check = self.reactor.seconds()
        conn = pool.take_idle_any()
        if conn is None:
            if not open_one or pool.waiters or pool.total >= pool.pool_size:
                return None
            d = pool.acquire()
            if not isinstance(d, defer.Deferred):
                d = defer.succeed(d)
        else:
            d = defer.succeed(conn)
        h.checking = True
        d.addCallback(self._run, pool)
        d.addCallbacks(self._checked, self._failed, errbackArgs=(pool, "health check"))
        d.addBoth(self._done, pool)
        return self._track(d)

    def _run(self, conn, pool):
        d = conn.run([CHECK_SQL], timeout=self.timeout)

        def ran(results):
            try:
                in_recovery, lsn, streamed = parse_check(results)
            except Exception:
                pool.discard(conn)
                raise
            pool.release(conn, used=False)
            return pool, in_recovery, lsn, streamed

        def failed(f):
            pool.discard(conn)
            return f

        return d.addCallbacks(ran, failed)

    def _checked(self, result):
        pool, in_recovery, lsn, streamed = result
        self.observe(pool, in_recovery, lsn, streamed)

    def observe(self, pool, in_recovery, lsn=None, streamed=False):
        bal = self.balancer
        bal.set_role(pool, in_recovery, streamed)
        shard = pool.shard.index
        if not in_recovery and pool is bal.primary(shard) and shard in bal.discovering:
            bal.discovering.discard(shard)
            log.info("{name}: shard {shard}: primary {addr} answers", name=bal.name,
                     shard=shard, addr=f"{pool.address.host}:{pool.address.port}")
        bal.set_lsn(pool, lsn)

    def _failed(self, f, pool, what):
        if self.closed or f.check(defer.CancelledError):
            return None
        err = f.value
        msg = getattr(err, "message", None) or f.getErrorMessage()
        if self.on_failure is not None:
            self.on_failure(pool, f"{what} failed: {msg}")
        return None

    def _done(self, result, pool):
        pool.health.checking = False
        return result

    def _track(self, d):
        self._pending.add(d)
        d.addBoth(self._untrack, d)
        return d

    def _untrack(self, result, d):
        self._pending.discard(d)
        return result

    # --- probes of banned addresses -------------------------------------------------------

    def probe(self, pool):
        """Try a fresh connection to a banned address; it ends the ban if
        it logs in and answers CHECK_SQL within healthcheck_timeout."""
        h = pool.health
        h.checking = True
        d = pool.connect_extra()
        d.addCallback(self._probe_run, pool)
        d.addCallbacks(self._probe_ok, self._probe_failed, callbackArgs=(pool,),
                       errbackArgs=(pool,))
        d.addBoth(self._done, pool)
        return self._track(d)

    def _probe_run(self, conn, pool):
        self._extra.add(conn)
        d = conn.run([CHECK_SQL], timeout=self.timeout)

        def failed(f):
            self._extra.discard(conn)
            conn.close()
            return f

        def ran(results):
            try:
                in_recovery, lsn, streamed = parse_check(results)
            except Exception:
                self._extra.discard(conn)
                conn.close()
                raise
            return conn, in_recovery, lsn, streamed

        return d.addCallbacks(ran, failed)

    def _probe_ok(self, result, pool):
        conn, in_recovery, lsn, streamed = result
        self._extra.discard(conn)
        if self.closed or pool.closed:
            conn.close()
            return
        bal = self.balancer
        bal.unban(pool, "answers its health probe" if pool.health.displaced
                  else "answers its health probe: back in rotation")
        self.observe(pool, in_recovery, lsn, streamed)
        pool.adopt(conn)

    def _probe_failed(self, f, pool):
        if self.closed or f.check(defer.CancelledError):
            return None
        h = pool.health
        now = self.reactor.seconds()
        h.probe_failed_at = now
        h.next_probe = now + self.probe_interval
        return None

    # --- end -------------------------------------------------------------------------------

    def close(self):
        self.closed = True
        for d in list(self._pending):
            d.cancel()
        for conn in list(self._extra):
            conn.close()
        self._extra.clear()


__all__ = ["HealthMonitor", "CHECK_SQL", "RECOVERY_SQL", "parse_lsn", "parse_check"]
