"""Client connection limits (PgBouncer's): ``max_client_conn`` in all,
``max_db_client_connections`` per pool and ``max_user_client_connections``
per user, each 0 for no limit; a pool's and a user's own setting override
``[general]``'s. A client is counted from the moment its startup packet names
its pool until it leaves (so logins in progress count); admin sessions are
never counted nor refused, so an operator can always get in."""


class ClientLimits:
    def __init__(self):
        self.total = 0
        self.per_db = {}
        self.per_user = {}

    def admit(self, client, config, database, user):
        """Count ``client`` in, or return why it may not come (the message
        of its FATAL 53300)."""
        g = config.general
        pool = config.pool(database)
        db_limit = g.max_db_client_connections
        user_limit = g.max_user_client_connections
        if pool is not None:
            if pool.max_db_client_connections is not None:
                db_limit = pool.max_db_client_connections
            ucfg = pool.user(user)
            if ucfg is not None and ucfg.max_user_client_connections is not None:
                user_limit = ucfg.max_user_client_connections
        if g.max_client_conn and self.total >= g.max_client_conn:
            return (f"no more connections allowed (max_client_conn = {g.max_client_conn})")
        if db_limit and self.per_db.get(database, 0) >= db_limit:
            return (f'too many client connections to pool "{database}" '
                    f"(max_db_client_connections = {db_limit})")
        if user_limit and self.per_user.get(user, 0) >= user_limit:
            return (f'too many client connections for user "{user}" '
                    f"(max_user_client_connections = {user_limit})")
        self.total += 1
        self.per_db[database] = self.per_db.get(database, 0) + 1
        self.per_user[user] = self.per_user.get(user, 0) + 1
        client.counted = (database, user)
        return None

    def leave(self, client):
        counted = client.counted
        if counted is None:
            return
        client.counted = None
        database, user = counted
        self.total -= 1
        for table, key in ((self.per_db, database), (self.per_user, user)):
            n = table.get(key, 0) - 1
            if n > 0:
                table[key] = n
            else:
                table.pop(key, None)
