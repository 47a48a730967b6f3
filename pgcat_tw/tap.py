"""twistd plugin glue: ``twistd [-n] pgcat -c pgcat.toml``."""

from twisted.python import usage

from pgcat_tw.config import ConfigError, load


class Options(usage.Options):
    synopsis = "[-c pgcat.toml]"
    longdesc = "Run the pgcat_tw PostgreSQL pooler with a PgCat-format configuration file."
    optParameters = [
        ["config", "c", "pgcat.toml", "Path to the PgCat-format configuration file."],
    ]

    def postOptions(self):
        try:
            self.loaded = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        # Certificates and keys must load (PgCat validates them at start too).
        from pgcat_tw.tls import TLSError, TLSState

        try:
            TLSState(self.loaded[0].general)
        except TLSError as e:
            raise usage.UsageError(f"{self['config']}: general: {e}")


def makeService(options):
    from twisted.internet import reactor

    from pgcat_tw.service import PgCatService

    from pgcat_tw import fastpoll

    config, warnings = options.loaded
    fastpoll.install(reactor)
    svc = PgCatService(reactor, config, config_path=options["config"], warnings=warnings)
    reactor.callWhenRunning(svc.install_signals)
    return svc
