"""The slow path of a client's checkout: everything but "an idle, fresh
server of the balancer's pick" (which ``ClientProtocol._work_data`` takes
inline) and the bind itself (``ClientProtocol._got_server``).

The balancer picks an address for (shard, role); its idle server is
health-checked first if it rested longer than healthcheck_delay; without
one the client queues on that address, in its turn (pool.py: first come,
first served). A connect error or timeout, a failed health check or a lost
server bans a replica and the transaction goes to the next candidate,
keeping the client's place; an exhausted pool bans nobody (its error says
so). Tracked parameters that differ on the server the client was handed are
SET on it before the client's query (``_sync_params``): the client pays for
that SET, it does not lose its turn.

``Checkout`` is a part of ``ClientProtocol`` (a mixin over the client's own
checkout state).
"""

from twisted.logger import Logger
from twisted.python.failure import Failure

from pgcat_tw.backend import RESET_TIMEOUT
from pgcat_tw.cluster import set_parameter_sql
from pgcat_tw.errors import PgError, ServerConnectionFailed
from pgcat_tw.protocol import messages as m

log = Logger()


class Checkout:
    """Part of ClientProtocol: the checkout's slow path and its failures."""

    _tried = None             # addresses tried by the running checkout
    _checkout_failures = 0    # checkouts that failed (checkout_failure_limit)

    def _checkout(self, try_idle=True):
        """Start a checkout on the slow path. ``try_idle`` False: the fast
        path's pick had no idle server; queue there."""
        self._checking_out = True
        # The wait begins now; a move to another address keeps this place
        # (pool.requeue).
        self._waiter.since = self.reactor.seconds()
        up = self.user_pool
        if up.closed:
            # A reload removed this (pool, user) (a kept one is reconfigured
            # in place): use the one in force now, if any.
            _, _, fresh = self.factory.get_cluster().find(self.database, self.user)
            if fresh is None:
                self._checking_out = False
                self._fatal(ServerConnectionFailed(
                    f'pool "{self.database}" user "{self.user}" was removed from the '
                    "configuration", sqlstate="08006", severity="FATAL"))
                return
            self.user_pool = up = fresh
        self._tried = []
        self._checkout_next(None, None if try_idle else up.balancer.picked)

    def _checkout_next(self, err, prefer=None):
        """Try the next candidate address; ``err``: why the last one failed."""
        bal = self.user_pool.balancer
        tried = self._tried
        if tried is None:
            tried = self._tried = []
        pool = bal.choose(self.shard, self.role, self.primary_reads, tried, prefer)
        if pool is None:
            self._tried = None
            self._checkout_failed(bal.unavailable_error(self.shard, self.role,
                                                        self.primary_reads, err))
            return
        tried.append(pool)
        self._wait_epoch = bal.epoch
        server = pool.take_idle_any()
        if server is not None:
            if pool.is_stale(server):
                d = server.run([";"], timeout=pool.healthcheck_timeout)
                d.addCallbacks(self._health_checked, self._health_failed,
                               callbackArgs=(server,), errbackArgs=(server,))
                return
            self._got_server(server)
            return
        w = self._waiter
        self._waiting = (pool, w)
        pool.requeue(w)

    def _health_checked(self, results, server):
        self.user_pool.note_role(server)
        self._got_server(server)

    def _health_failed(self, failure, server):
        pool = server.pool
        pool.discard(server)
        self._waiting = (pool, None)
        self._checkout_failed(ServerConnectionFailed(
            f"{pool.name}: health check failed: {failure.getErrorMessage()}"))

    # --- tracked parameters ---------------------------------------------------------

    def _sync_params(self, server):
        """SET the tracked parameters whose values differ on ``server``,
        then attach it (``_params_synced``)."""
        sparams = server.params
        diff = [(k, v) for k, v in self.params.items() if sparams.get(k) != v]
        d = server.run([set_parameter_sql(k, v) for k, v in diff], timeout=RESET_TIMEOUT)
        d.addCallbacks(self._params_synced, self._sync_failed,
                       callbackArgs=(server, diff), errbackArgs=(server,))

    def _params_synced(self, results, server, diff):
        for (k, v), r in zip(diff, results):
            if r.error:
                server.pool.release(server)
                self._checking_out = False
                self._fail_held(PgError(
                    f"could not apply {k}={v!r} on the server: {r.error.get('M')}",
                    sqlstate=r.error.get("C", "22023")))
                return
        # Adopt the server's spelling of the values, and tell the client if
        # it differs from what it was told.
        news = []
        for k, v in diff:
            new = server.params.get(k, v)
            if new != v:
                self.params[k] = new
                news.append(m.parameter_status(k, new))
        if self.transport is None or self._closing:
            server.pool.release(server)
            return
        if news:
            self.transport.write(b"".join(news))
        self._got_server(server, True)

    def _sync_failed(self, failure, server):
        pool = server.pool
        pool.discard(server)
        self._waiting = (pool, None)
        self._checkout_failed(failure)

    # --- failures ------------------------------------------------------------------------

    def _checkout_failed(self, err):
        """``err``: an exception (from the pool) or a Failure. A server
        failure on the address we waited for (``self._waiting``) bans it
        (a replica) and tries the next candidate; anything else (an
        exhausted pool, nothing left to try) is the client's error."""
        waiting, self._waiting = self._waiting, None
        if isinstance(err, Failure):
            err = err.value
        if waiting is not None and isinstance(err, ServerConnectionFailed):
            pool = waiting[0]
            if not pool.closed:
                self.user_pool.server_failed(pool, err)
            if self.transport is not None and not self._closing:
                tried = self._tried
                if tried is None:
                    tried = self._tried = []
                if pool not in tried:
                    tried.append(pool)
                self._checkout_next(err)
                return
        self._tried = None
        self._checking_out = False
        if self.transport is None or self._closing:
            return
        if not isinstance(err, PgError):
            err = ServerConnectionFailed(f"could not get a server connection: {err}")
        log.warn("client {user}@{db}: checkout failed: {err}", user=self.user,
                 db=self.database, err=err.message)
        self._checkout_failures += 1
        limit = self.user_pool.pool_cfg.checkout_failure_limit
        if limit and self._checkout_failures >= limit:
            # PgCat's checkout_failure_limit: this client is disconnected.
            self._fatal(PgError(
                f"{err.message}; checkout failure limit reached "
                f"({self._checkout_failures} / {limit})", sqlstate=err.sqlstate,
                severity="FATAL"))
            return
        if self._paused_waiting:
            self._paused_waiting = False
            self.transport.resumeProducing()
        self._fail_held(err)

    def _fail_held(self, err):
        """Answer every request held for a server with ``err``."""
        sc = self.scanner
        self._held = []
        self._held_len = 0
        if sc.unsynced or sc.in_copy or not sc.at_boundary:
            self._fatal(err)
            return
        n = max(sc.pending, 1)
        sc.pending = 0
        self.transport.write((err.to_message() + m.READY_IDLE) * n)
