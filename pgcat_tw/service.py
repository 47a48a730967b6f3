"""Wires the listener, the janitor and reload into one MultiService."""

import signal

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from pgcat_tw.cancel import CancelKeys
from pgcat_tw.cluster import Cluster
from pgcat_tw.config import ConfigError, load
from pgcat_tw.frontend import ClientFactory
from pgcat_tw.janitor import Janitor

log = Logger()


def listen_description(general):
    host = general.host.replace(":", "\\:")
    return f"tcp:{general.port}:interface={host}"


class PgCatService(service.MultiService):
    def __init__(self, reactor, config, config_path=None, warnings=()):
        service.MultiService.__init__(self)
        self.reactor = reactor
        self.config_path = config_path
        self.cluster = Cluster(reactor, config)
        self.cancel_keys = CancelKeys()
        self.factory = ClientFactory(reactor, lambda: self.cluster, self.cancel_keys)
        self.port = None              # IListeningPort once listening
        self.janitor = Janitor(reactor, lambda: self.cluster)
        self.janitor.setServiceParent(self)
        self._warnings = list(warnings)

    @property
    def config(self):
        return self.cluster.config

    def privilegedStartService(self):
        # Bind before twistd drops privileges / daemonizes; errors (port in
        # use) surface as a failed start.
        endpoint = serverFromString(self.reactor, listen_description(self.config.general))
        self.listening = endpoint.listen(self.factory)
        self.listening.addCallback(self._listening)
        service.MultiService.privilegedStartService(self)

    def _listening(self, port):
        self.port = port
        log.info("pgcat_tw listening on {host}:{port} with {n} pool(s)",
                 host=self.config.general.host, port=port.getHost().port,
                 n=len(self.config.pools))
        return port

    def startService(self):
        if not hasattr(self, "listening"):
            self.privilegedStartService()
        for w in self._warnings:
            log.warn("config: {warning}", warning=w)
        service.MultiService.startService(self)

    @defer.inlineCallbacks
    def stopService(self):
        yield service.MultiService.stopService(self)
        if self.port is not None:
            yield self.port.stopListening()
        self.cluster.close()
        for client in list(self.factory.clients):
            if client.transport is not None:
                client.transport.loseConnection()

    def reload(self):
        """Re-read the config file; on any error keep the config in force."""
        if not self.config_path:
            return False
        try:
            config, warnings = load(self.config_path)
        except ConfigError as e:
            log.error("reload failed, keeping the current configuration: {error}", error=str(e))
            return False
        for w in warnings:
            log.warn("config: {warning}", warning=w)
        old = self.cluster
        if (config.general.host, config.general.port) != (old.config.general.host,
                                                           old.config.general.port):
            log.warn("reload: host/port changes need a restart; keeping the listener")
        self.cluster = Cluster(self.reactor, config, previous=old)
        old.retire(self.cluster)
        log.info("configuration reloaded from {path}", path=self.config_path)
        return True

    def install_sighup(self):
        def on_hup(signum, frame):
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, on_hup)
