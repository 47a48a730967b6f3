"""Wires the listener, the janitor and reload into one MultiService."""

import hashlib
import os
import signal

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from pgcat_tw.admin.control import Control
from pgcat_tw.cancel import CancelKeys
from pgcat_tw.cluster import Cluster
from pgcat_tw.config import ConfigError, load
from pgcat_tw.auth_query import AuthQueries
from pgcat_tw.frontend import ClientFactory
from pgcat_tw.janitor import Janitor
from pgcat_tw.stats import LiveClock
from pgcat_tw.tap import check_parser
from pgcat_tw.timeouts import Timeouts
from pgcat_tw.tls import TLSError, TLSState

log = Logger()


def _file_signature(path):
    """What autoreload compares: the file's bytes (a hash), or None."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def unix_socket_path(general):
    return os.path.join(general.unix_socket_dir, f".s.PGSQL.{general.port}")


def listen_description(general):
    host = general.host.replace(":", "\\:")
    return f"tcp:{general.port}:interface={host}"


class PgCatService(service.MultiService):
    def __init__(self, reactor, config, config_path=None, warnings=(), clock=None):
        service.MultiService.__init__(self)
        self.reactor = reactor
        # The time of the event being handled (stats.EventClock, set by the
        # loop), or one that reads the reactor's time.
        self.clock = clock if clock is not None else LiveClock(reactor.seconds)
        self.config_path = config_path
        try:
            self.tls = TLSState(config.general)
        except TLSError as e:
            raise ConfigError(config.path, "general", str(e)) from None
        self.auth_queries = AuthQueries(reactor, self.tls)
        self.cluster = Cluster(reactor, config, tls=self.tls, clock=self.clock)
        self.cancel_keys = CancelKeys()
        self.factory = ClientFactory(reactor, lambda: self.cluster, self.cancel_keys,
                                     clock=self.clock)
        self.factory.tls = self.tls
        self.factory.auth_queries = self.auth_queries
        self.factory.admin_control = Control(
            reactor, lambda: self.cluster, lambda: self.factory.clients,
            reload=self.reload_problem, shutdown=lambda: self.drain(self.reactor.stop),
            is_draining=lambda: self.factory.draining,
            get_auth_queries=lambda: self.auth_queries)
        self.port = None              # IListeningPort once listening
        self.janitor = Janitor(reactor, lambda: self.cluster)
        self.janitor.setServiceParent(self)
        self.timeouts = Timeouts(reactor, lambda: self.cluster, lambda: self.factory.clients)
        self.timeouts.setServiceParent(self)
        # Prometheus exporter (metrics.py): a child service, so it listens
        # in startService (a port in use fails the start) and stops in
        # stopService. Imported only when enabled.
        self.metrics = None
        if config.general.enable_prometheus_exporter:
            from pgcat_tw.metrics import MetricsService

            self.metrics = MetricsService(reactor, config.general,
                                          self.factory.admin_control.snapshot)
            self.metrics.setServiceParent(self)
        self._warnings = list(warnings)
        # autoreload (ms, PgCat's): the file is looked at that often and
        # reloaded when its content changed (a restart picks a new period).
        self._file_seen = _file_signature(config_path)
        every = config.general.autoreload
        if config_path and every:
            from twisted.application.internet import TimerService

            t = TimerService(every / 1000.0, self._autoreload)
            t.clock = reactor
            t.setServiceParent(self)

    @property
    def config(self):
        return self.cluster.config

    def privilegedStartService(self):
        # Bind before twistd drops privileges / daemonizes; errors (port in
        # use) surface as a failed start.
        endpoint = serverFromString(self.reactor, listen_description(self.config.general))
        self.listening = endpoint.listen(self.factory)
        self.listening.addCallback(self._listening)
        failed = []
        self.listening.addErrback(failed.append)
        if failed:
            # TCP listens synchronously: a port in use fails the start (twistd
            # exits non-zero with the message) instead of running deaf.
            failed[0].raiseException()
        self._listen_unix()
        service.MultiService.privilegedStartService(self)

    unix_port = None          # IListeningPort of the Unix socket, if any

    def _listen_unix(self):
        """``unix_socket_dir``: also listen on <dir>/.s.PGSQL.<port>, the
        socket psql and libpq look for with ``-h <dir>``."""
        g = self.config.general
        if not g.unix_socket_dir:
            return
        path = unix_socket_path(g)
        desc = ("unix:" + path.replace("\\", "\\\\").replace(":", "\\:")
                + ":mode=777:lockfile=1")
        d = serverFromString(self.reactor, desc).listen(self.factory)
        failed = []
        d.addCallbacks(lambda p: setattr(self, "unix_port", p), failed.append)
        if failed:
            failed[0].raiseException()
        log.info("pgcat_tw listening on {path}", path=path)

    def _listening(self, port):
        self.port = port
        log.info("pgcat_tw listening on {host}:{port} with {n} pool(s)",
                 host=self.config.general.host, port=port.getHost().port,
                 n=len(self.config.pools))
        log.info("Waiting for clients")  # PgCat's ready line (supervisors wait for it)
        return port

    def startService(self):
        if not hasattr(self, "listening"):
            self.privilegedStartService()
        for w in self._warnings:
            log.warn("config: {text}", text=w)
        service.MultiService.startService(self)

    @defer.inlineCallbacks
    def stopService(self):
        yield service.MultiService.stopService(self)
        if self.port is not None:
            yield self.port.stopListening()
        if self.unix_port is not None:
            yield self.unix_port.stopListening()
        self.cluster.close()
        self.auth_queries.close()
        for client in list(self.factory.clients):
            if client.transport is not None:
                client.transport.loseConnection()

    def reload(self):
        """Re-read the config file; on any error keep the config in force."""
        return self.reload_problem() is None

    def _autoreload(self):
        seen = _file_signature(self.config_path)
        if seen is not None and seen != self._file_seen:
            self._file_seen = seen   # a broken file is not retried until it changes
            self.reload_problem()

    def reload_problem(self):
        """Reload; None when done, else why not (the config in force stays)."""
        if not self.config_path:
            return "the service was not started from a config file"
        log.info("Reloading config", path=self.config_path)
        try:
            config, warnings = load(self.config_path)
            check_parser(config)   # before anything in force is touched
        except ConfigError as e:
            # PgCat's wording: the error's own text, at ERROR (scripts grep it).
            log.error("{error}", error=str(e), path=self.config_path)
            log.warn("reload failed, keeping the current configuration: {path}",
                     path=self.config_path)
            return str(e)
        for w in warnings:
            log.warn("config: {text}", text=w)
        old = self.cluster
        if (config.general.host, config.general.port) != (old.config.general.host,
                                                           old.config.general.port):
            log.warn("reload: host/port changes need a restart; keeping the listener")
        # Certificates and keys are re-read even if their paths did not
        # change; one that cannot be read keeps the previous in force.
        for problem in self.tls.reload(config.general):
            log.error("reload: {problem}", problem=problem)
        self._file_seen = _file_signature(self.config_path)
        self.cluster = Cluster(self.reactor, config, previous=old)
        old.retire(self.cluster)
        for client in list(self.factory.clients):
            client.plugins_reloaded()   # plugins enabled or removed take effect
        log.info("configuration reloaded from {path}", path=self.config_path)
        return None

    def drain(self, done):
        """Graceful shutdown (PgCat's SIGINT): new clients are refused with
        57P03, clients between transactions are closed with 57P01 at once,
        clients inside a transaction (or a session with one open) finish it
        and are closed then; ``done()`` is called when no client is left or
        after ``shutdown_timeout``."""
        if getattr(self, "_draining", False):
            return
        self._draining = True
        self.factory.draining = True
        timeout = self.config.general.shutdown_timeout / 1000.0
        log.info("graceful shutdown: {n} client(s), waiting up to {t} s",
                 n=len(self.factory.clients), t=timeout)
        for client in list(self.factory.clients):
            client.drain()
        deadline = self.reactor.seconds() + timeout

        def left():
            # Admin sessions keep working until the end; they do not hold it up.
            return [c for c in self.factory.clients if not c.admin]

        def check():
            if not left() or self.reactor.seconds() >= deadline:
                if left():
                    log.warn("shutdown_timeout reached with {n} client(s) left",
                             n=len(left()))
                done()
            else:
                self.reactor.callLater(0.05, check)

        check()

    def install_signals(self):
        """SIGHUP reloads; SIGINT drains then stops (SIGTERM: twistd's
        immediate stop)."""
        def on_hup(signum, frame):
            self.reactor.callFromThread(self.reload)

        def on_int(signum, frame):
            self.reactor.callFromThread(self.drain, self.reactor.stop)

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGINT, on_int)
