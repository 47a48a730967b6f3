"""The admin console (the ``pgcat`` and ``pgbouncer`` databases).

- ``snapshot`` (L2): one walk over the live objects into plain records;
- ``tables`` (L0): records -> (columns, rows), PgCat's and PgBouncer's;
- ``control`` (L2): what the console may do to the service (PAUSE, BAN,
  RELOAD, SHUTDOWN, KILL_CLIENT), lent by the service at construction;
- ``console`` (L2): the session itself, after an admin login.
"""
