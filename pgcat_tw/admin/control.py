"""What the admin console may do to the service (L2).

The service builds one ``Control`` with the callables it lends (the cluster
in force, the clients, reload, graceful shutdown); the console gets it at
construction and imports nothing above it. Each method checks its arguments
and raises ``AdminError`` (58000, PgCat's) with a clear message.
"""

from twisted.internet import defer, task

from pgcat_tw.admin import snapshot
from pgcat_tw.errors import PgError

PAUSE_POLL = 0.02   # seconds between two looks at the paused pools' servers


class AdminError(PgError):
    sqlstate = "58000"


def parse_pool_arg(arg):
    """``db`` or ``db,user`` (PgCat's one token) -> (db, user or None)."""
    if not arg:
        return None, None
    if arg.count(",") > 1:
        raise AdminError(f'invalid argument "{arg}": expected db or db,user')
    db, _, user = arg.partition(",")
    db, user = db.strip().strip('"'), user.strip().strip('"') or None
    if not db:
        raise AdminError(f'invalid argument "{arg}": expected db or db,user')
    return db, user


class Control:
    def __init__(self, reactor, get_cluster, get_clients, reload=None, shutdown=None,
                 is_draining=None, get_auth_queries=None):
        self.reactor = reactor
        self.get_cluster = get_cluster
        self.get_clients = get_clients
        self._reload = reload
        self._shutdown = shutdown
        self._is_draining = is_draining or (lambda: False)
        self._get_auth_queries = get_auth_queries or (lambda: None)

    @property
    def draining(self):
        return self._is_draining()

    def snapshot(self):
        return snapshot.take(self.get_cluster(), list(self.get_clients()),
                             self.reactor.seconds(), self._get_auth_queries())

    # --- PAUSE / RESUME ------------------------------------------------------------------

    def user_pools(self, db=None, user=None):
        """The UserPools that ``db[,user]`` names (all of them without an
        argument); AdminError when it names none."""
        ups = [up for (pool_name, username), up in self.get_cluster().user_pools.items()
               if (db is None or pool_name == db) and (user is None or username == user)]
        if not ups and db is not None:
            what = f'pool "{db}"' + (f' user "{user}"' if user else "")
            raise AdminError(f"no such pool: {what}")
        return ups

    def pause(self, db=None, user=None):
        """Pause; the Deferred fires once no server of those pools is in use
        (the clients inside a transaction have finished it)."""
        pools = [p for up in self.user_pools(db, user) for p in up.address_pools]
        for p in pools:
            p.pause()
        return self._drained(pools)

    @defer.inlineCallbacks
    def _drained(self, pools):
        while not all(p.drained or not p.paused for p in pools):
            yield task.deferLater(self.reactor, PAUSE_POLL, lambda: None)

    def resume(self, db=None, user=None):
        for up in self.user_pools(db, user):
            for p in up.address_pools:
                p.resume()

    # --- BAN / UNBAN ---------------------------------------------------------------------

    def _addresses(self, target):
        """(UserPool, address pool) pairs whose server is ``host`` or
        ``host:port``."""
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            host, port = target, None
        out = []
        for up in self.get_cluster().user_pools.values():
            for p in up.address_pools:
                a = p.address
                if a.host == host and (port is None or a.port == int(port)):
                    out.append((up, p))
        if not out:
            raise AdminError(f'no server "{target}" in any pool')
        return out, port is not None

    def ban(self, target, seconds):
        try:
            duration = float(seconds)
        except (TypeError, ValueError):
            raise AdminError(f'invalid ban duration "{seconds}": expected seconds') from None
        if duration <= 0:
            raise AdminError(f"invalid ban duration {seconds}: it must be positive")
        found, exact = self._addresses(target)
        replicas = [(up, p) for up, p in found if not up.balancer.is_primary(p)]
        if not replicas or (exact and len(replicas) < len(found)):
            raise AdminError(f'cannot ban "{target}": it is the primary of its shard '
                             "(a primary is never banned)")
        rows = []
        for up, p in replicas:
            up.balancer.ban(p, f"banned by the admin console for {duration:g} s",
                            duration=duration, admin=True)
            rows.append([up.pool_cfg.name, up.user_cfg.username, "replica",
                         f"{p.address.host}:{p.address.port}"])
        return rows

    def unban(self, target):
        found, _ = self._addresses(target)
        rows = []
        for up, p in found:
            if p.health is not None and p.health.banned_until is not None:
                up.balancer.unban(p, "unbanned by the admin console")
                rows.append([up.pool_cfg.name, up.user_cfg.username,
                             "primary" if up.balancer.is_primary(p) else "replica",
                             f"{p.address.host}:{p.address.port}"])
        return rows

    # --- the rest ---------------------------------------------------------------------------

    def kill_client(self, text):
        try:
            wanted = int(text, 16) if text.lower().startswith("0x") else int(text)
        except ValueError:
            raise AdminError(f'invalid client id "{text}"') from None
        for c in list(self.get_clients()):
            if getattr(c, "id", None) == wanted and c.session is not None:
                c._fatal(PgError("terminating connection due to administrator command "
                                 "(KILL_CLIENT)", sqlstate="57P01", severity="FATAL"))
                return
        raise AdminError(f"no client with id {text}")

    def reload(self):
        """None, or the reason the file was not loaded (the old one stays)."""
        if self._reload is None:
            raise AdminError("RELOAD is not available: the service has no config file")
        return self._reload()

    def shutdown(self):
        if self._shutdown is None:
            raise AdminError("SHUTDOWN is not available")
        self._shutdown()
