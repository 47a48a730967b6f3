"""twistd plugin glue: ``twistd [-n] pgcat -c pgcat.toml``."""

import sys

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


def _line_buffered_stderr():
    """When the daemon fails to start (e.g. its port is in use), twistd's
    parent process writes the error to ``sys.__stderr__`` and leaves with
    ``os._exit``, which flushes nothing. CPython's stderr is line-buffered
    even when it is a file or a pipe; PyPy 3.9's is not, and there the
    message was lost. Line buffering makes it reach the caller on both."""
    err = sys.__stderr__
    try:
        if err is not None and not err.line_buffering:
            err.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):
        pass


def makeService(options):
    from twisted.internet import reactor

    _line_buffered_stderr()

    from pgcat_tw.service import PgCatService

    from pgcat_tw import fastpoll

    from pgcat_tw.stats import EventClock

    config, warnings = options.loaded
    clock = EventClock(reactor.seconds())
    if not fastpoll.install(reactor, clock=clock):
        clock = None  # the service reads the reactor's time instead
    svc = PgCatService(reactor, config, config_path=options["config"], warnings=warnings,
                       clock=clock)
    reactor.callWhenRunning(svc.install_signals)
    return svc
