"""The single maintenance timer (PgBouncer's janitor): idle and lifetime
timeouts and min_pool_size for every pool, ban expiry, probes of banned
servers and background health checks (``health.HealthMonitor.tick``), once
per tick."""

from twisted.application.internet import TimerService

TICK = 1.0


class Janitor(TimerService):
    def __init__(self, reactor, get_cluster, interval=TICK):
        self._reactor = reactor
        self._get_cluster = get_cluster
        TimerService.__init__(self, interval, self.tick)
        self.clock = reactor

    def tick(self):
        self._get_cluster().reap(self._reactor.seconds())
