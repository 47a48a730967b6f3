"""Real PostgreSQL servers for the integration tests.

Plain Python (subprocess), no Twisted.  One topology per test run::

    from tests.pgharness import topology, USERS
    topo = topology()               # primary only, started lazily
    topo = topology(replicas=1)     # same object, plus a streaming replica
    topo.primary.psql("select 1")   # -> "1"

The cluster is created with ``initdb`` once per run in a fresh temp directory,
listens on free loopback ports only, and is stopped and removed at interpreter
exit (set ``PGHARNESS_KEEP=1`` to keep the directory for post-mortems).

``initdb``/``postgres`` refuse to run as root: when the effective uid is 0 they
(and every other server-side tool) run as the ``postgres`` system user via
``runuser -u postgres --`` (override with ``PGHARNESS_USER``), which is given
the temp directory.  Client tools (psql) run as the calling user.

Environment knobs: ``PG_BINDIR`` (server binaries), ``PGHARNESS_USER``,
``PGHARNESS_KEEP``.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

__all__ = ["BINDIR", "USERS", "PgNode", "PgTopology", "topology"]

# name -> password (None: no password).  The auth method each one uses is in
# USER_METHODS; the superuser `postgres` has trust over TCP from 127.0.0.1.
USERS = {
    "pgcat_md5": "md5_pw",
    "pgcat_scram": "scram_pw",
    "pgcat_clear": "clear_pw",
    "pgcat_trust": None,
}

# name -> (pg_hba method, password_encryption used when storing the password)
USER_METHODS = {
    "pgcat_md5": ("md5", "md5"),
    "pgcat_scram": ("scram-sha-256", "scram-sha-256"),
    "pgcat_clear": ("password", "scram-sha-256"),
    "pgcat_trust": ("trust", None),
}

DATABASES = ["pgcat_test", "shard0", "shard1", "shard2"]
DB_OWNER = "pgcat_md5"

_TMP_PREFIX = "pgcat_tw_pg_"
_OWNER_FILE = "harness.pid"
_LOGFILE = "postgres.log"
_NODE_CONF = "harness_node.conf"


# --------------------------------------------------------------------------
# binaries


def _version_key(path):
    m = re.search(r"/(\d+)(?:\.(\d+))?/bin$", path)
    if not m:
        return (0, 0)
    return (int(m.group(1)), int(m.group(2) or 0))


def _find_bindir() -> str:
    env = os.environ.get("PG_BINDIR")
    if env and os.path.exists(os.path.join(env, "pg_ctl")):
        return env
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=30
        )
        cand = out.stdout.strip()
        if out.returncode == 0 and cand and os.path.exists(os.path.join(cand, "pg_ctl")):
            return cand
    except (OSError, subprocess.SubprocessError):
        pass
    cands = [
        d
        for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.path.exists(os.path.join(d, "pg_ctl"))
    ]
    if cands:
        return max(cands, key=_version_key)
    for d in ("/usr/local/pgsql/bin", "/usr/pgsql/bin"):
        if os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    which = shutil.which("pg_ctl")
    if which:
        return os.path.dirname(os.path.realpath(which))
    return ""


BINDIR: str = _find_bindir()


def _bin(name: str) -> str:
    if not BINDIR:
        raise RuntimeError(
            "PostgreSQL server binaries not found (no pg_ctl in `pg_config --bindir` "
            "nor /usr/lib/postgresql/*/bin); run scripts/test.sh, which installs them"
        )
    path = os.path.join(BINDIR, name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"{name} not found in {BINDIR} nor on PATH")


# --------------------------------------------------------------------------
# process helpers


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _server_user():
    """(name, uid, gid) of the user that runs server-side tools, or None."""
    if not _is_root():
        return None
    import pwd

    name = os.environ.get("PGHARNESS_USER", "postgres")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"running as root but there is no {name!r} system user to run "
            "initdb/postgres as (install the postgresql package or set PGHARNESS_USER)"
        ) from None
    return (name, pw.pw_uid, pw.pw_gid)


def _clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env.pop("LANGUAGE", None)
    if extra:
        env.update(extra)
    return env


def _run(args, *, as_server=False, timeout=60, cwd=None, env=None, input=None,
         check=True, what=None, log=None):
    """Run a command; raise RuntimeError with its output (and log tail) on failure."""
    args = [str(a) for a in args]
    if as_server:
        su = _server_user()
        if su is not None:
            args = ["runuser", "-u", su[0], "--"] + args
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=env if env is not None else _clean_env(),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"{what or args[0]} timed out after {timeout}s: {' '.join(args)}\n"
            f"stdout: {e.stdout}\nstderr: {e.stderr}" + _log_suffix(log)
        ) from None
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{what or args[0]} failed (exit {proc.returncode}): {' '.join(args)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
            + _log_suffix(log)
        )
    return proc


def _tail(path, lines=40):
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _log_suffix(log):
    if not log:
        return ""
    t = _tail(log)
    return f"\n--- tail of {log} ---\n{t}" if t else f"\n(no log at {log})"


def _chown(path):
    su = _server_user()
    if su is not None:
        os.chown(path, su[1], su[2])


def _write(path, text, mode=0o600):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    _chown(path)


_used_ports = set()
_port_lock = threading.Lock()


def _free_port() -> int:
    with _port_lock:
        for _ in range(50):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            finally:
                s.close()
            if port not in _used_ports:
                _used_ports.add(port)
                return port
    raise RuntimeError("could not find a free port")


def _proc_state(pid):
    """'R', 'S', 'Z', ... for a live pid, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return data[data.rindex(")") + 2]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
            return "?"
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"


def _alive(pid) -> bool:
    # A SIGKILLed postmaster is re-parented to PID 1, which may not reap it:
    # a zombie counts as dead.
    st = _proc_state(pid)
    return st is not None and st not in ("Z", "X")


def _children(pid):
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                data = f.read()
            ppid = int(data[data.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(e))
    return out


def _quote_dsn(v) -> str:
    v = str(v)
    if v and not re.search(r"[\s'\\]", v):
        return v
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_lit(v) -> str:
    return "'" + str(v).replace("'", "''") + "'"


# --------------------------------------------------------------------------
# nodes


class PgNode:
    host = "127.0.0.1"

    def __init__(self, name: str, base: str, port: int):
        self.name = name
        self.base = base
        self.port = port
        self.datadir = os.path.join(base, name)
        self.sockdir = self._make_sockdir(base, name)
        self.logfile = os.path.join(self.datadir, _LOGFILE)

    def __repr__(self):
        return f"<PgNode {self.name} {self.host}:{self.port} {self.datadir}>"

    @staticmethod
    def _make_sockdir(base, name):
        d = os.path.join(base, "sock_" + name)
        if len(d) + len("/.s.PGSQL.65535") > 100:  # sun_path limit
            d = tempfile.mkdtemp(prefix="pgs_", dir="/tmp")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o700)
        _chown(d)
        return d

    # -- configuration

    def _write_node_conf(self):
        _write(
            os.path.join(self.datadir, _NODE_CONF),
            "# written by tests/pgharness.py: per-node settings\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = {_sql_lit(self.sockdir)}\n"
            f"cluster_name = {_sql_lit(self.name)}\n",
            mode=0o644,
        )

    # -- lifecycle

    def _pid(self):
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self._pid()
        return pid is not None and _alive(pid)

    def log_tail(self, lines=40) -> str:
        return _tail(self.logfile, lines)

    def _pg_ctl(self, *args, timeout=90, what=None):
        return _run(
            [_bin("pg_ctl"), "-D", self.datadir] + list(args),
            as_server=True,
            timeout=timeout,
            cwd=self.base,
            what=what or f"pg_ctl {args[0] if args else ''} ({self.name})",
            log=self.logfile,
        )

    def start(self) -> None:
        if self.is_running():
            return
        self._clear_stale_pidfile()
        self._pg_ctl("-l", self.logfile, "-w", "-t", "60", "start", what=f"start {self.name}")
        # pg_ctl -w waits for "ready"; make sure TCP answers too.
        deadline = time.monotonic() + 30
        while True:
            try:
                self.psql("select 1", timeout=10)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def stop(self, mode="fast") -> None:
        if not self.is_running():
            self._clear_stale_pidfile()
            return
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop", what=f"stop {self.name}")

    def kill(self) -> None:
        """SIGKILL the postmaster, then its children, and wait until they are gone.

        The children are killed too so that a later start() cannot fail with
        "pre-existing shared memory block is still in use" and so that clients
        see their connections die at once, as in a real crash of the machine.
        """
        pid = self._pid()
        if pid is None or not _alive(pid):
            return
        kids = _children(pid)
        for p in [pid] + kids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Children forked after the listing: sweep once more.
        for p in _children(pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in [pid] + kids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: processes survived SIGKILL")
            time.sleep(0.02)
        self._clear_stale_pidfile()

    def _clear_stale_pidfile(self):
        # A SIGKILLed postmaster may stay a zombie (PID 1 does not always reap),
        # and postgres would take that pid as a live postmaster: drop the file.
        # Same for the socket lock file (".s.PGSQL.<port>.lock").
        pid = self._pid()
        if pid is not None and not _alive(pid):
            stale = [os.path.join(self.datadir, "postmaster.pid")]
            stale += glob.glob(os.path.join(self.sockdir, ".s.PGSQL.*"))
            for path in stale:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def promote(self) -> None:
        self._pg_ctl("-w", "-t", "60", "promote", what=f"promote {self.name}")
        deadline = time.monotonic() + 30
        while self.psql("select pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} still in recovery after promote" + _log_suffix(self.logfile))
            time.sleep(0.05)

    # -- clients

    def dsn(self, user="postgres", db="postgres", password=None) -> str:
        parts = [
            f"host={self.host}",
            f"port={self.port}",
            f"user={_quote_dsn(user)}",
            f"dbname={_quote_dsn(db)}",
        ]
        if password is not None:
            parts.append(f"password={_quote_dsn(password)}")
        return " ".join(parts)

    def psql(self, sql: str, db="postgres", user="postgres", timeout=60) -> str:
        """Run ``sql`` with ``psql -c`` (one round trip: a multi-statement
        string is one implicit transaction and only the last result is
        printed).  Passwords of USERS are supplied automatically."""
        extra = {"PGCONNECT_TIMEOUT": "10"}
        pw = USERS.get(user)
        if pw is not None:
            extra["PGPASSWORD"] = pw
        proc = _run(
            [_bin("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", self.port, "-U", user, "-d", db, "-c", sql],
            timeout=timeout,
            env=_clean_env(extra),
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"psql on {self.name} (user={user} db={db}) failed: {proc.stderr.strip()}"
            )
        return proc.stdout.strip()

    def psql_script(self, sql: str, db="postgres", user="postgres", timeout=60) -> str:
        """Run a script through psql's stdin: each statement on its own (so
        CREATE DATABASE works among others), quiet, stops at the first error."""
        extra = {"PGCONNECT_TIMEOUT": "10"}
        pw = USERS.get(user)
        if pw is not None:
            extra["PGPASSWORD"] = pw
        proc = _run(
            [_bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", self.port, "-U", user, "-d", db, "-f", "-"],
            timeout=timeout,
            env=_clean_env(extra),
            input=sql,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"psql script on {self.name} (user={user} db={db}) failed: {proc.stderr.strip()}"
            )
        return proc.stdout.strip()


# --------------------------------------------------------------------------
# topology

_POSTGRESQL_CONF = """
# ---- tests/pgharness.py ----
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
wal_level = replica
max_wal_senders = 10
wal_keep_size = '256MB'
hot_standby = on
shared_buffers = '64MB'
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
log_destination = 'stderr'
logging_collector = off
include_if_exists = '{node_conf}'
"""


def _pg_hba() -> str:
    lines = [
        "# written by tests/pgharness.py",
        "local all all trust",
        "host replication postgres 127.0.0.1/32 trust",
        "host all postgres 127.0.0.1/32 trust",
    ]
    for user, (method, _enc) in USER_METHODS.items():
        lines.append(f"host all {user} 127.0.0.1/32 {method}")
    lines.append("host all all 127.0.0.1/32 reject")
    return "\n".join(lines) + "\n"


class PgTopology:
    def __init__(self):
        self.base = self._make_base()
        self.primary: PgNode = None
        self.replicas: list = []
        self._lock = threading.RLock()
        self._closed = False

    @property
    def nodes(self):
        return ([self.primary] if self.primary else []) + list(self.replicas)

    # -- temp dir

    @staticmethod
    def _make_base() -> str:
        _reap_leftovers()
        base = tempfile.mkdtemp(prefix=_TMP_PREFIX)
        if _is_root():
            os.chmod(base, 0o700)
            _chown(base)
            su = _server_user()
            probe = _run(["test", "-w", base], as_server=True, check=False, timeout=30)
            if probe.returncode != 0:
                # The server user cannot reach $TMPDIR: fall back to /tmp.
                shutil.rmtree(base, ignore_errors=True)
                base = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir="/tmp")
                os.chmod(base, 0o700)
                _chown(base)
                _run(["test", "-w", base], as_server=True, timeout=30,
                     what=f"access check for user {su[0]}")
        with open(os.path.join(base, _OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        return base

    # -- primary

    def _init_primary(self):
        node = PgNode("primary", self.base, _free_port())
        _run(
            [_bin("initdb"), "-D", node.datadir, "-A", "trust", "-U", "postgres",
             "--no-sync", "-E", "UTF8", "--locale=C"],
            as_server=True, timeout=180, cwd=self.base, what="initdb",
        )
        with open(os.path.join(node.datadir, "postgresql.conf"), "a") as f:
            f.write(_POSTGRESQL_CONF.format(node_conf=_NODE_CONF))
        _write(os.path.join(node.datadir, "pg_hba.conf"), _pg_hba())
        node._write_node_conf()
        self._start_with_retry(node)
        self.primary = node
        self._setup_roles(node)

    def _start_with_retry(self, node: PgNode):
        for attempt in range(4):
            try:
                node.start()
                return
            except RuntimeError as e:
                msg = str(e) + node.log_tail()
                if attempt < 3 and ("could not bind" in msg or "already in use" in msg
                                    or "could not create any TCP/IP sockets" in msg):
                    node.stop(mode="immediate")
                    node.port = _free_port()
                    node._write_node_conf()
                    continue
                raise

    def _setup_roles(self, node: PgNode):
        sql = []
        for user, (_method, enc) in USER_METHODS.items():
            pw = USERS.get(user)
            if pw is not None:
                sql.append(f"SET password_encryption = {_sql_lit(enc)};")
                sql.append(f"CREATE ROLE {user} LOGIN CREATEDB PASSWORD {_sql_lit(pw)};")
            else:
                sql.append(f"CREATE ROLE {user} LOGIN CREATEDB;")
        others = ", ".join(u for u in USERS if u != DB_OWNER)
        for db in DATABASES:
            sql.append(f"CREATE DATABASE {db} OWNER {DB_OWNER};")
            sql.append(f"GRANT ALL ON DATABASE {db} TO {others};")
        node.psql_script("\n".join(sql) + "\n")
        for db in DATABASES:
            node.psql_script(f"GRANT ALL ON SCHEMA public TO {others};\n", db=db)

    # -- replicas

    def add_replica(self) -> PgNode:
        with self._lock:
            if not self.primary.is_running():
                raise RuntimeError("add_replica: the primary is not running")
            name = f"replica{len(self.replicas) + 1}"
            while os.path.exists(os.path.join(self.base, name)):
                name += "x"
            node = PgNode(name, self.base, _free_port())
            _run(
                [_bin("pg_basebackup"), "-h", self.primary.host, "-p", self.primary.port,
                 "-U", "postgres", "-D", node.datadir, "-R", "-X", "stream",
                 "--checkpoint=fast", "--no-sync"],
                as_server=True, timeout=180, cwd=self.base,
                env=_clean_env({"PGCONNECT_TIMEOUT": "10"}),
                what=f"pg_basebackup for {name}", log=self.primary.logfile,
            )
            # The primary's log came along: start the replica's afresh.
            try:
                os.unlink(node.logfile)
            except OSError:
                pass
            node._write_node_conf()
            self._start_with_retry(node)
            self._wait_streaming(node)
            self.replicas.append(node)
            return node

    def _wait_streaming(self, node: PgNode, timeout=60):
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                rec = node.psql("select pg_is_in_recovery()")
                state = self.primary.psql(
                    "select state from pg_stat_replication "
                    f"where application_name = {_sql_lit(node.name)}"
                )
                if rec == "t" and state == "streaming":
                    lsn = self.primary.psql("select pg_current_wal_lsn()")
                    caught = node.psql(
                        f"select pg_last_wal_replay_lsn() >= {_sql_lit(lsn)}::pg_lsn"
                    )
                    if caught == "t":
                        return
                last = f"in_recovery={rec} state={state!r}"
            except RuntimeError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{node.name} not streaming after {timeout}s ({last})"
                    + _log_suffix(node.logfile)
                )
            time.sleep(0.05)

    # -- teardown

    def close(self):
        if self._closed:
            return
        self._closed = True
        for node in reversed(self.nodes):
            try:
                if node.is_running():
                    node.stop(mode="immediate")
            except Exception:
                try:
                    node.kill()
                except Exception:
                    pass
        if os.environ.get("PGHARNESS_KEEP"):
            print(f"pgharness: kept {self.base}")
            return
        shutil.rmtree(self.base, ignore_errors=True)
        for node in self.nodes:
            if not node.sockdir.startswith(self.base):
                shutil.rmtree(node.sockdir, ignore_errors=True)


def _reap_leftovers():
    """Stop and remove temp dirs of earlier runs whose process died."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), _TMP_PREFIX + "*")):
        try:
            with open(os.path.join(d, _OWNER_FILE)) as f:
                owner = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        for pidfile in glob.glob(os.path.join(d, "*", "postmaster.pid")):
            try:
                with open(pidfile) as f:
                    pid = int(f.readline().strip())
                if _alive(pid):
                    os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            except (OSError, ValueError):
                pass
        if not os.environ.get("PGHARNESS_KEEP"):
            shutil.rmtree(d, ignore_errors=True)


_topology: PgTopology = None
_topology_lock = threading.Lock()


def topology(replicas: int = 0) -> PgTopology:
    """The run's single topology: created on first call, replicas added on
    demand; a stopped or killed primary is started again."""
    global _topology
    with _topology_lock:
        if _topology is None:
            topo = PgTopology()
            atexit.register(topo.close)
            try:
                topo._init_primary()
            except BaseException:
                topo.close()
                raise
            _topology = topo
        topo = _topology
        if not topo.primary.is_running():
            topo.primary.start()
        while len(topo.replicas) < replicas:
            topo.add_replica()
        return topo
