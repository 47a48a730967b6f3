"""twistd plugin glue: ``twistd [-n] pgcat -c pgcat.toml``."""

import os
import sys

from twisted.python import usage

from pgcat_tw.config import ConfigError, load


class _BadConfig(usage.UsageError):
    """The configuration file cannot be used (not a command-line mistake)."""


class Options(usage.Options):
    synopsis = "[-c pgcat.toml]"
    longdesc = "Run the pgcat_tw PostgreSQL pooler with a PgCat-format configuration file."
    optParameters = [
        ["config", "c", "pgcat.toml", "Path to the PgCat-format configuration file."],
    ]

    def parseOptions(self, options=None):
        """As usage.Options does, but a usage error or a file that cannot be
        used ends the process with status 1 here. twistd's own handler
        prints the error and, before Twisted 26.10 (twisted#12656), returns
        normally, so twistd exited 0: Twisted 26.10 needs Python 3.10, and
        PyPy 3.9 has 26.4 at most."""
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            _exit_with_error(str(e), None if isinstance(e, _BadConfig) else str(self))

    def postOptions(self):
        try:
            self.loaded = load(self["config"])
            check_tls_files(self.loaded[0])
            check_parser(self.loaded[0])
        except ConfigError as e:
            raise _BadConfig(str(e)) from None


def check_tls_files(config):
    """Load the certificates and keys of ``config`` with the code that will
    serve them (pgcat_tw.tls.TLSState: pyOpenSSL), as PgCat validates them
    at start. Raises ConfigError naming the file, the key path and the
    problem."""
    from pgcat_tw.tls import TLSError, TLSState

    try:
        TLSState(config.general)
    except TLSError as e:
        raise ConfigError(config.path, f"general.{e.setting}", e.problem) from None


def check_parser(config):
    """A pool with ``query_parser_enabled`` needs libpg_query (the router's
    parser): ConfigError naming the key and the package when it cannot load."""
    from pgcat_tw.router import pgquery

    for pool in config.pools:
        if pool.query_parser_enabled:
            try:
                pgquery.load()
            except pgquery.ParserUnavailable as e:
                raise ConfigError(config.path, f"pools.{pool.name}.query_parser_enabled",
                                  str(e)) from None
            return


def _exit_with_error(message, usage_text=None):
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "twistd"
    if usage_text:
        sys.stderr.write(usage_text.rstrip("\n") + "\n")
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


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
