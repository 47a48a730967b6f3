"""The session record: what the startup and login phases hand to the work
phase (or to the admin console) once a client is greeted.

The startup and login objects are dropped after the greeting; everything
the rest of a connection's life needs from them is here, in one small
record, plus the bytes the client sent that were not consumed yet.
"""


class Session:
    __slots__ = ("user", "database", "pool_cfg", "user_cfg", "user_pool", "startup_params",
                 "params", "key", "tls", "tls_direct", "admin")

    def __init__(self, user, database, pool_cfg=None, user_cfg=None, user_pool=None,
                 startup_params=None, params=None, key=None, tls=False, tls_direct=False,
                 admin=False):
        self.user = user
        self.database = database
        self.pool_cfg = pool_cfg          # config.Pool (None for the admin console)
        self.user_cfg = user_cfg          # config.User
        self.user_pool = user_pool        # cluster.UserPool
        self.startup_params = startup_params if startup_params is not None else {}
        self.params = params              # relay.ParameterValues: the tracked values
        self.key = key                    # (pid, secret) the client was given
        self.tls = tls                    # the connection is encrypted
        self.tls_direct = tls_direct      # ... by direct TLS (no SSLRequest)
        self.admin = admin                # a login to the admin console

    def __repr__(self):
        return (f"<Session {self.user}@{self.database}{' admin' if self.admin else ''}"
                f"{' tls' if self.tls else ''}>")
