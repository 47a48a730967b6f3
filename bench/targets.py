"""What pgbench connects to: a throwaway Postgres cluster (``Postgres``)
and the targets in front of it (direct, PgBouncer, pgcat_tw on CPython and
on PyPy), each started with a generated configuration. Standard library
only; see bench/README.rst."""

import glob
import os
import shutil
import signal
import subprocess
import time

from procs import BenchError, ServerProcess, free_port, log, proc_cpu_times, tail, wait_for_port

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)

USER = "bench"
PASSWORD = "bench"
DBNAME = "bench"
ALL_TARGETS = ("direct", "pgbouncer", "pgcat_tw", "pgcat_tw_pypy", "pgcat_tw_parser",
               "pgcat_tw_pypy_parser")
# pgcat_tw targets, each compared with PgBouncer: the --venv one and the
# --pypy-venv one (bench/README.rst, "Interpreter"); the *_parser ones (only
# when asked for with --targets) have the query parser and read/write
# splitting on (one primary: every query still goes to it).
PGCAT_TARGETS = ("pgcat_tw", "pgcat_tw_pypy", "pgcat_tw_parser", "pgcat_tw_pypy_parser")
PARSER_POOL = "query_parser_enabled = true\nquery_parser_read_write_splitting = true\n"


# ---------------------------------------------------------------------------
# TLS (--tls)
# ---------------------------------------------------------------------------

class Certificate:
    """One self-signed certificate (EC P-256, CN and SAN 127.0.0.1) made with
    ``openssl`` in ``workdir``; every TLS-terminating target serves it."""

    def __init__(self, workdir, runas):
        d = os.path.join(workdir, "tls")
        os.mkdir(d, 0o755)
        self.cert = os.path.join(d, "server.crt")
        self.key = os.path.join(d, "server.key")
        res = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", self.key, "-out", self.cert], capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError("openssl req failed:\n" + res.stderr)
        os.chmod(self.key, 0o600)
        # PgBouncer and Postgres run as runas (Postgres takes its own copy:
        # it wants a key owned by its user).
        runas.chown(self.key)
        runas.chown(self.cert)


def tls_session(port, host="127.0.0.1", timeout=10):
    """(protocol, cipher) that a libpq-like client negotiates with the
    target: SSLRequest, then a handshake without verification."""
    import socket
    import ssl
    import struct

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        if raw.recv(1) != b"S":
            raise BenchError("port %d refused TLS" % port)
        with ctx.wrap_socket(raw) as s:
            return s.version(), s.cipher()[0]


# ---------------------------------------------------------------------------
# Postgres
# ---------------------------------------------------------------------------

def find_pg_bin():
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if cands:
        return os.path.dirname(cands[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else "/usr/lib/postgresql/15/bin"


class Postgres:
    def __init__(self, workdir, runas, pg_bin, scale, tls=None):
        self.tls = tls  # a Certificate: ssl = on with it (target direct, --tls)
        self.workdir = workdir
        self.runas = runas
        self.pg_bin = pg_bin
        self.scale = scale
        self.datadir = os.path.join(workdir, "pgdata")
        self.port = free_port()
        self.proc = None

    def _run(self, argv, **kw):
        res = subprocess.run(argv, env=self.runas.env(), capture_output=True,
                             text=True, cwd=self.workdir,
                             **self.runas.popen_kwargs(), **kw)
        if res.returncode != 0:
            raise BenchError("%s failed (%d):\n%s%s" % (
                " ".join(argv), res.returncode, res.stdout, res.stderr))
        return res

    def psql_super(self, sql):
        return self._run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                          "-h", self.workdir, "-p", str(self.port),
                          "-U", "postgres", "-d", "postgres", "-c", sql])

    def start(self):
        log("initdb into %s" % self.datadir)
        self._run([os.path.join(self.pg_bin, "initdb"), "-D", self.datadir,
                   "-U", "postgres", "-E", "UTF8", "--locale=C",
                   "--auth-local=trust", "--auth-host=md5", "--no-sync"])
        settings = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.workdir,
            "max_connections": 200,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "md5",
            "logging_collector": "off",
        }
        if self.tls is not None:
            os.mkdir(self.datadir + "_tls", 0o700)
            self.runas.chown(self.datadir + "_tls")
            for src, name in ((self.tls.cert, "server.crt"), (self.tls.key, "server.key")):
                with open(src) as f:
                    self.runas.write(os.path.join(self.datadir + "_tls", name), f.read())
            settings.update(ssl="on", ssl_cert_file=os.path.join(self.datadir + "_tls",
                                                                 "server.crt"),
                            ssl_key_file=os.path.join(self.datadir + "_tls", "server.key"))
        argv = [os.path.join(self.pg_bin, "postgres"), "-D", self.datadir]
        for k, v in settings.items():
            argv += ["-c", "%s=%s" % (k, v)]
        self.proc = ServerProcess("postgres", argv,
                                  os.path.join(self.workdir, "postgres.log"),
                                  env=self.runas.env(), cwd=self.workdir,
                                  runas=self.runas)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise BenchError("postgres exited:\n" + tail(self.proc.logfile))
            try:
                self.psql_super("select 1")
                break
            except BenchError:
                if time.monotonic() > deadline:
                    raise BenchError("postgres did not come up:\n"
                                     + tail(self.proc.logfile))
                time.sleep(0.2)
        log("postgres up on port %d" % self.port)

    def setup(self):
        self.psql_super("CREATE ROLE %s LOGIN PASSWORD '%s'" % (USER, PASSWORD))
        self.psql_super("CREATE DATABASE %s OWNER %s" % (DBNAME, USER))
        log("pgbench -i -s %d" % self.scale)
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        res = subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(self.scale), "-h", "127.0.0.1",
             "-p", str(self.port), "-U", USER, DBNAME],
            env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError("pgbench -i failed:\n" + res.stdout + res.stderr)
        self.psql_super("CHECKPOINT")

    def stop(self):
        if self.proc:
            # SIGINT = fast shutdown
            self.proc.stop(signal.SIGINT, timeout=30)


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------

class Target:
    """Something pgbench connects to.  ``pid`` is the pooler (or None)."""

    name = None
    host = "127.0.0.1"
    pgcat = False  # a pgcat_tw target

    def __init__(self, workdir, pg, args):
        self.base = type(self).name  # the name without a --code label
        self.workdir = workdir
        self.pg = pg
        self.args = args
        self.port = None
        self.proc = None
        self.tls = getattr(args, "tls_files", None)  # a Certificate with --tls
        self.tls_session = None  # (protocol, cipher) a client gets, with --tls

    def wrapped(self, argv):
        """The pooler's command line, through ``args.wrap(target, argv)``
        when a caller set one (bench/counts.py: valgrind, a profiler)."""
        wrap = getattr(self.args, "wrap", None)
        return wrap(self, argv) if wrap is not None else argv

    def client_env(self, **extra):
        """The environment of a libpq client (pgbench, psql) of this target:
        the password and, with --tls, sslmode=require."""
        env = dict(os.environ, PGPASSWORD=PASSWORD, **extra)
        if self.tls is not None:
            env["PGSSLMODE"] = "require"
        else:
            env.pop("PGSSLMODE", None)
        return env

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self):
        pass

    def stop(self):
        if self.proc:
            self.proc.stop(signal.SIGTERM)

    def alive(self):
        return self.proc is None or self.proc.poll() is None

    def cpu_times(self):
        """(user, system) CPU seconds of the pooler, or None."""
        return proc_cpu_times(self.pid) if self.pid else None

    def describe_failure(self):
        if self.proc:
            return "log tail (%s):\n%s" % (self.proc.logfile,
                                           tail(self.proc.logfile))
        return ""

    def check(self):
        """One query through the target, to fail early with a clear error."""
        env = self.client_env(PGCONNECT_TIMEOUT="10")
        try:
            res = subprocess.run(
                ["psql", "-X", "-At", "-h", self.host, "-p", str(self.port),
                 "-U", USER, "-d", DBNAME,
                 "-c", "select count(*) from pgbench_branches"],
                env=env, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError("%s: check query timed out\n%s"
                             % (self.name, self.describe_failure()))
        if res.returncode != 0:
            raise BenchError("%s: check query failed: %s\n%s"
                             % (self.name, res.stderr.strip(),
                                self.describe_failure()))
        if self.tls is not None:
            self.tls_session = tls_session(self.port)
            log("%s: TLS %s %s" % ((self.name,) + self.tls_session))


class DirectTarget(Target):
    name = "direct"

    def start(self):
        self.port = self.pg.port

    def stop(self):
        pass  # Postgres is stopped separately

    def cpu_times(self):
        return None


class PgBouncerTarget(Target):
    name = "pgbouncer"

    def start(self):
        runas = self.args.runas
        d = os.path.join(self.workdir, "pgbouncer")
        os.mkdir(d, 0o700)
        runas.chown(d)
        self.port = free_port()
        userlist = os.path.join(d, "userlist.txt")
        runas.write(userlist, '"%s" "%s"\n' % (USER, PASSWORD))
        ini = os.path.join(d, "pgbouncer.ini")
        pool = self.args.pool_size
        runas.write(ini, "\n".join([
            "[databases]",
            "%s = host=127.0.0.1 port=%d dbname=%s" % (DBNAME, self.pg.port, DBNAME),
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            "listen_port = %d" % self.port,
            "unix_socket_dir =",
            "auth_type = md5",
            "auth_file = %s" % userlist,
            "pool_mode = transaction",
            "default_pool_size = %d" % pool,
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "max_client_conn = %d" % max(1000, 4 * max(self.args.clients)),
            "max_db_connections = 0",
            "ignore_startup_parameters = extra_float_digits",
            "logfile = %s" % os.path.join(d, "pgbouncer.log"),
            "log_connections = 0",
            "log_disconnections = 0",
            "log_pooler_errors = 1",
            "stats_period = 3600",
            "server_round_robin = %d" % int(self.args.server_round_robin),
        ] + ([
            # The same certificate as pgcat_tw; TLS 1.2 and 1.3 (PgBouncer's
            # "secure"), OpenSSL's default TLS 1.3 suites.
            "client_tls_sslmode = require",
            "client_tls_key_file = %s" % self.tls.key,
            "client_tls_cert_file = %s" % self.tls.cert,
            "client_tls_protocols = secure",
        ] if self.tls is not None else []) + [""]))
        self.proc = ServerProcess(
            "pgbouncer", self.wrapped([self.args.pgbouncer, ini]),
            os.path.join(d, "stdout.log"), env=runas.env(), cwd=d, runas=runas)
        if not wait_for_port(self.port, self.proc.popen,
                             timeout=getattr(self.args, "start_timeout", 20)):
            raise BenchError("pgbouncer did not start\n" + self.describe_failure())
        log("pgbouncer (pid %d) on port %d" % (self.pid, self.port))

    def describe_failure(self):
        d = os.path.join(self.workdir, "pgbouncer")
        return "pgbouncer log:\n%s%s" % (
            tail(os.path.join(d, "stdout.log")), tail(os.path.join(d, "pgbouncer.log")))


class PgcatTwTarget(Target):
    """pgcat_tw run by ``<venv>/bin/twistd`` from the code of ``code_dir``
    (``--code``; default: this checkout): that directory comes first on
    ``PYTHONPATH``, ahead of the venv's installed copy. With a label
    (``--code LABEL=DIR,...``) the target is named ``<name>@<label>``."""

    name = "pgcat_tw"
    pgcat = True
    pool_extra = ""

    def __init__(self, workdir, pg, args, code_dir=None, label=None):
        super().__init__(workdir, pg, args)
        self.code_dir = os.path.abspath(code_dir or REPO_DIR)
        if label:
            self.name = "%s@%s" % (self.base, label)
        self.code = None  # where pgcat_tw was imported from (check_code)

    def venv(self):
        return self.args.venv

    def pooler_env(self):
        env = dict(os.environ)
        # the code_dir's twisted/plugins and package first, ahead of whatever
        # the venv has installed (a non-editable copy)
        env["PYTHONPATH"] = os.pathsep.join(
            [self.code_dir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env

    def check_code(self, cwd):
        """Which files the pooler's interpreter imports pgcat_tw and the
        twistd plugin's module from, with the pooler's environment and
        working directory; a BenchError unless under ``code_dir``."""
        python = os.path.join(os.path.abspath(self.venv()), "bin", "python")
        res = subprocess.run(
            [python, "-c", "import pgcat_tw, pgcat_tw.tap; "
             "print(pgcat_tw.__file__); print(pgcat_tw.tap.__file__)"],
            env=self.pooler_env(), cwd=cwd, capture_output=True, text=True)
        files = res.stdout.split()
        if res.returncode != 0 or len(files) != 2:
            raise BenchError("%s: cannot import pgcat_tw: %s" % (self.name, res.stderr))
        root = os.path.realpath(self.code_dir) + os.sep
        if not all(os.path.realpath(f).startswith(root) for f in files):
            raise BenchError("%s: pgcat_tw comes from %s, not from %s"
                             % (self.name, files, self.code_dir))
        try:  # and the running pooler's own environment says the same
            with open("/proc/%d/environ" % self.pid, "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            pythonpath = env.get(b"PYTHONPATH", b"").decode()
        except OSError:
            pythonpath = "?"
        self.code = {"dir": self.code_dir, "pgcat_tw": files[0], "tap": files[1],
                     "PYTHONPATH": pythonpath}
        log("%s imports %s (PYTHONPATH=%s)" % (self.name, files[0], pythonpath))

    def start(self):
        twistd = os.path.join(os.path.abspath(self.venv()), "bin", "twistd")
        if not os.path.exists(twistd):
            raise BenchError("no twistd at %s" % twistd)
        d = os.path.join(self.workdir, self.name)
        os.mkdir(d)
        self.port = free_port()
        toml = os.path.join(d, "pgcat.toml")
        with open(toml, "w") as f:
            f.write(PGCAT_TOML.format(port=self.port, pool_size=self.args.pool_size,
                                      pg_port=self.pg.port, user=USER,
                                      password=PASSWORD, db=DBNAME,
                                      pool_extra=self.pool_extra,
                                      round_robin=str(self.args.server_round_robin).lower(),
                                      tls=(PGCAT_TLS.format(cert=self.tls.cert, key=self.tls.key)
                                           if self.tls is not None else "")))
        env = self.pooler_env()
        self.proc = ServerProcess(
            self.name, self.wrapped([twistd, "-n", "--pidfile=", "pgcat", "-c", toml]),
            os.path.join(d, "twistd.log"), env=env, cwd=d)
        if not wait_for_port(self.port, self.proc.popen,
                             timeout=getattr(self.args, "start_timeout", 30)):
            raise BenchError("pgcat_tw did not start\n" + self.describe_failure())
        log("%s (pid %d) on port %d" % (self.name, self.pid, self.port))
        self.interpreter = pooler_interpreter(self.pid)
        log("%s runs on %s" % (self.name, self.interpreter))
        self.check_code(d)


class PgcatTwPyPyTarget(PgcatTwTarget):
    """pgcat_tw, the same code, run by the PyPy venv's twistd."""
    name = "pgcat_tw_pypy"

    def venv(self):
        return self.args.pypy_venv


def pooler_interpreter(pid):
    """Which Python runs the pooler (pid): its executable and whether it
    loads libpython as a shared library (a default pyenv or source build
    does; a distribution's PGO/LTO build with libpython in the executable
    runs the same Python code about 15% faster, see README "Interpreter")."""
    try:
        exe = os.path.realpath("/proc/%d/exe" % pid)
        with open("/proc/%d/maps" % pid) as f:
            shared = any("libpython" in line for line in f)
    except OSError:
        return "unknown"
    return "%s (libpython %s)" % (exe, "shared" if shared else "in the executable")


PGCAT_TOML = """\
[general]
host = "127.0.0.1"
port = {port}
admin_username = "admin"
admin_password = "admin"
connect_timeout = 5000
# Reuse idle servers in the same order as the PgBouncer it is compared with
# (--server-round-robin: both FIFO; default: both LIFO, PgBouncer's default).
server_round_robin = {round_robin}
{tls}
[pools.{db}]
pool_mode = "transaction"
{pool_extra}
[pools.{db}.users.0]
username = "{user}"
password = "{password}"
pool_size = {pool_size}

[pools.{db}.shards.0]
database = "{db}"
servers = [["127.0.0.1", {pg_port}, "primary"]]

# Mode "prepared" connects here: the same database, with named statements
# shared across clients. Plain simple/extended traffic uses the pool above
# (PgCat's default: no cache), so it does not pay for the rewriter.
[pools.{db}_prepared]
pool_mode = "transaction"
prepared_statements_cache_size = 500
{pool_extra}
[pools.{db}_prepared.users.0]
username = "{user}"
password = "{password}"
pool_size = {pool_size}

[pools.{db}_prepared.shards.0]
database = "{db}"
servers = [["127.0.0.1", {pg_port}, "primary"]]
"""

# With --tls: the same certificate as PgBouncer's (TLS 1.2 at least, 1.3
# allowed, as pgcat_tw always does).
PGCAT_TLS = """\
tls_certificate = "{cert}"
tls_private_key = "{key}"
"""

class PgcatTwParserTarget(PgcatTwTarget):
    name = "pgcat_tw_parser"
    pool_extra = PARSER_POOL


class PgcatTwPyPyParserTarget(PgcatTwPyPyTarget):
    name = "pgcat_tw_pypy_parser"
    pool_extra = PARSER_POOL


TARGET_CLASSES = {c.name: c for c in (DirectTarget, PgBouncerTarget, PgcatTwTarget,
                                      PgcatTwPyPyTarget, PgcatTwParserTarget,
                                      PgcatTwPyPyParserTarget)}


def make_target(name, workdir, pg, args):
    """The target of ``name`` (``<base>`` or ``<base>@<label>``, the label
    one of ``args.code``'s versions)."""
    base, _, label = name.partition("@")
    cls = TARGET_CLASSES[base]
    if not getattr(cls, "pgcat", False):
        return cls(workdir, pg, args)
    versions = dict(getattr(args, "code", None) or {})
    return cls(workdir, pg, args, code_dir=versions.get(label or None), label=label or None)
