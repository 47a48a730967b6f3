#!/usr/bin/env python3
"""Compare ``pgbench -S`` against direct Postgres, PgBouncer and pgcat_tw.

One run sets up a throwaway Postgres cluster, starts PgBouncer and pgcat_tw
in front of it (both in transaction mode with the same pool size), and runs
``pgbench -n -S`` against every target, interleaved and rotating the target
order each round.  It reports per (mode, clients, target) the medians over
rounds of tps, mean latency, the pooler's CPU seconds per 1000 transactions
and failed transactions, plus pgcat_tw/PgBouncer ratios.

Standard library only.  See bench/README.rst for usage.
"""

import argparse
import contextlib
import datetime
import getpass
import glob
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")

USER = "bench"
PASSWORD = "bench"
DBNAME = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_TARGETS = ("direct", "pgbouncer", "pgcat_tw", "pgcat_tw_pypy")
# pgcat_tw targets, each compared with PgBouncer: the --venv one and the
# --pypy-venv one (bench/README.rst, "Interpreter").
PGCAT_TARGETS = ("pgcat_tw", "pgcat_tw_pypy")


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc=None, timeout=30.0, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _read_stat(pid):
    """(ppid, utime ticks, stime ticks) from /proc/<pid>/stat, or None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    # the command name may contain spaces/parens: split after the last ')'
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is stat field 3 (state); ppid is 4, utime/stime are 14/15
    return int(fields[1]), int(fields[11]), int(fields[12])


def proc_cpu_times(pid):
    """(user, system) CPU seconds, all threads, of ``pid`` plus any live
    descendants (in case the pooler runs worker processes), or None."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    if pid not in stats:
        return None
    children = {}
    for p, st in stats.items():
        children.setdefault(st[0], []).append(p)
    user = system = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        user += stats[p][1]
        system += stats[p][2]
        todo.extend(children.get(p, ()))
    return user / CLK_TCK, system / CLK_TCK


def proc_cpu_seconds(pid):
    """User + system CPU seconds of ``pid`` and its descendants, or None."""
    t = proc_cpu_times(pid)
    return None if t is None else t[0] + t[1]


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


class RunAs:
    """Run helper processes as an unprivileged OS user when we are root.

    initdb/postgres and pgbouncer refuse to run as root.  We drop privileges
    with subprocess's user=/group= (same effect as ``runuser -u postgres --``)
    so that the Popen pid is the server's own pid, which we need for
    /proc/<pid>/stat CPU accounting.
    """

    def __init__(self, username):
        self.is_root = os.geteuid() == 0
        if self.is_root:
            pw = pwd.getpwnam(username)
            self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
            self.name = username
        else:
            self.uid, self.gid = os.geteuid(), os.getegid()
            self.home = os.path.expanduser("~")
            self.name = getpass.getuser()

    def popen_kwargs(self):
        if not self.is_root:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self, base=None):
        env = dict(os.environ if base is None else base)
        if self.is_root:
            env.update(HOME=self.home, USER=self.name, LOGNAME=self.name)
        return env

    def chown(self, path):
        if self.is_root:
            os.chown(path, self.uid, self.gid)

    def write(self, path, text, mode=0o600):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        self.chown(path)


class ServerProcess:
    """A long-running child process in its own session, logging to a file."""

    def __init__(self, name, argv, logfile, env=None, cwd=None, runas=None):
        self.name = name
        self.logfile = logfile
        kwargs = runas.popen_kwargs() if runas else {}
        self._log = open(logfile, "ab")
        log("starting %s: %s" % (name, " ".join(argv)))
        # own session: Ctrl-C in the terminal must not reach the servers,
        # we stop them ourselves in order during cleanup.
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True, **kwargs)
        self.pid = self.popen.pid

    def poll(self):
        return self.popen.poll()

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log("%s did not stop, killing pid %d" % (self.name, self.pid))
                self.popen.kill()
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()


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
    def __init__(self, workdir, runas, pg_bin, scale):
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

    def __init__(self, workdir, pg, args):
        self.workdir = workdir
        self.pg = pg
        self.args = args
        self.port = None
        self.proc = None

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
        env = dict(os.environ, PGPASSWORD=PASSWORD, PGCONNECT_TIMEOUT="10")
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
            "",
        ]))
        self.proc = ServerProcess(
            "pgbouncer", [self.args.pgbouncer, ini],
            os.path.join(d, "stdout.log"), env=runas.env(), cwd=d, runas=runas)
        if not wait_for_port(self.port, self.proc.popen, timeout=20):
            raise BenchError("pgbouncer did not start\n" + self.describe_failure())
        log("pgbouncer (pid %d) on port %d" % (self.pid, self.port))

    def describe_failure(self):
        d = os.path.join(self.workdir, "pgbouncer")
        return "pgbouncer log:\n%s%s" % (
            tail(os.path.join(d, "stdout.log")), tail(os.path.join(d, "pgbouncer.log")))


class PgcatTwTarget(Target):
    name = "pgcat_tw"

    def venv(self):
        return self.args.venv

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
                                      round_robin=str(self.args.server_round_robin).lower()))
        env = dict(os.environ)
        # make the repo's twisted/plugins + package importable even when the
        # venv does not have it installed
        env["PYTHONPATH"] = os.pathsep.join(
            [REPO_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.proc = ServerProcess(
            self.name, [twistd, "-n", "--pidfile=", "pgcat", "-c", toml],
            os.path.join(d, "twistd.log"), env=env, cwd=d)
        if not wait_for_port(self.port, self.proc.popen, timeout=30):
            raise BenchError("pgcat_tw did not start\n" + self.describe_failure())
        log("%s (pid %d) on port %d" % (self.name, self.pid, self.port))
        self.interpreter = pooler_interpreter(self.pid)
        log("%s runs on %s" % (self.name, self.interpreter))


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

[pools.{db}]
pool_mode = "transaction"

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

[pools.{db}_prepared.users.0]
username = "{user}"
password = "{password}"
pool_size = {pool_size}

[pools.{db}_prepared.shards.0]
database = "{db}"
servers = [["127.0.0.1", {pg_port}, "primary"]]
"""

TARGET_CLASSES = {c.name: c for c in (DirectTarget, PgBouncerTarget, PgcatTwTarget,
                                      PgcatTwPyPyTarget)}


# ---------------------------------------------------------------------------
# pgbench runs
# ---------------------------------------------------------------------------

RE_TPS = re.compile(r"^tps = ([0-9.]+) \((without initial connection time|excluding connections establishing)\)", re.M)
RE_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
RE_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
RE_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def parse_pgbench(out):
    def grab(rx, conv):
        m = rx.search(out)
        return conv(m.group(1)) if m else None
    return {
        "tps": grab(RE_TPS, float),
        "latency_ms": grab(RE_LAT, float),
        "processed": grab(RE_PROCESSED, int),
        "failed": grab(RE_FAILED, int) or 0,
    }


def pgbench_mode(target, mode):
    """The -M flag for a target. Mode "prepared" is pgbench -M prepared
    everywhere except PgBouncer (1.18 in Debian 12 cannot keep named
    statements in transaction mode): it runs -M extended, so the row compares
    pgcat_tw's shared prepared statements with PgBouncer's best option."""
    if mode == "prepared" and target.name == "pgbouncer":
        return "extended"
    return mode


def target_db(target, mode):
    """The database a client connects to: mode "prepared" uses pgcat_tw's
    ``bench_prepared`` pool (shared prepared statements)."""
    if mode == "prepared" and target.name in PGCAT_TARGETS:
        return DBNAME + "_prepared"
    return DBNAME


def run_pgbench(target, mode, clients, duration):
    argv = ["pgbench", "-n", "-S", "-M", pgbench_mode(target, mode), "-c", str(clients),
            "-j", str(min(clients, 2)), "-T", str(duration),
            "-h", target.host, "-p", str(target.port), "-U", USER,
            target_db(target, mode)]
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    sys.stdout.flush()
    cpu0 = target.cpu_times()
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, env=env, capture_output=True, text=True,
                             timeout=duration * 3 + 60)
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = "timeout: %s" % e, -1
    wall = time.monotonic() - t0
    cpu1 = target.cpu_times() if target.alive() else None
    r = parse_pgbench(out)
    r.update(target=target.name, mode=mode, clients=clients, rc=rc,
             wall_s=round(wall, 3))
    r["cpu_s"] = r["cpu_s_per_1k"] = r["usr_us_per_txn"] = r["sys_us_per_txn"] = None
    if cpu0 is not None and cpu1 is not None:
        user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        r["cpu_s"] = round(user + system, 3)
        if r["processed"]:
            r["cpu_s_per_1k"] = r["cpu_s"] / r["processed"] * 1000
            # Where the pooler's time goes: its own code (user) or the
            # kernel's socket and poll work on its behalf (system).
            r["usr_us_per_txn"] = user / r["processed"] * 1e6
            r["sys_us_per_txn"] = system / r["processed"] * 1e6
    if rc != 0 or r["tps"] is None:
        r["error"] = out.strip()[-2000:]
        r["tps"] = None if rc != 0 else r["tps"]
    return r


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs, modes, clients_list, target_names):
    summary = []
    for mode in modes:
        for clients in clients_list:
            for name in target_names:
                rs = [r for r in runs if r["mode"] == mode
                      and r["clients"] == clients and r["target"] == name]
                ok = [r for r in rs if r.get("tps") is not None]
                lat = median(r["latency_ms"] for r in ok)
                summary.append({
                    "mode": mode, "clients": clients, "target": name,
                    "runs": len(rs), "ok_runs": len(ok),
                    "tps": median(r["tps"] for r in ok),
                    "latency_us": lat * 1000 if lat is not None else None,
                    "cpu_s_per_1k": median(r["cpu_s_per_1k"] for r in ok),
                    "usr_us_per_txn": median(r.get("usr_us_per_txn") for r in ok),
                    "sys_us_per_txn": median(r.get("sys_us_per_txn") for r in ok),
                    "failed": median(r["failed"] for r in rs),
                })
    return summary


def comparisons(summary, b="pgbouncer"):
    out = []
    for a in PGCAT_TARGETS:
        out += _comparisons(summary, a, b)
    return out


def _comparisons(summary, a, b):
    out = []
    idx = {(s["mode"], s["clients"], s["target"]): s for s in summary}
    keys = []
    for s in summary:
        if (s["mode"], s["clients"]) not in keys:
            keys.append((s["mode"], s["clients"]))
    for mode, clients in keys:
        sa, sb = idx.get((mode, clients, a)), idx.get((mode, clients, b))
        if not sa or not sb:
            continue

        def ratio(k):
            if sa[k] is None or not sb[k]:
                return None
            return sa[k] / sb[k]
        diff = (sa["latency_us"] - sb["latency_us"]
                if sa["latency_us"] is not None and sb["latency_us"] is not None
                else None)
        out.append({"mode": mode, "clients": clients, "compare": "%s/%s" % (a, b),
                    "tps_ratio": ratio("tps"),
                    "cpu_per_txn_ratio": ratio("cpu_s_per_1k"),
                    "latency_diff_us": diff})
    return out


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def rst_table(headers, rows, left=3):
    """RST simple table; the first ``left`` columns are left-aligned."""
    widths = [max(len(str(r[i])) for r in [headers] + rows)
              for i in range(len(headers))]
    sep = "  ".join("=" * w for w in widths)

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [sep, line(headers), sep]
    out += [line(r) for r in rows]
    out.append(sep)
    return "\n".join(out)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(summary, comps):
    rows = [[s["mode"], str(s["clients"]), s["target"], fmt(s["tps"], ".0f"),
             fmt(s["latency_us"], ".0f"), fmt(s["cpu_s_per_1k"], ".4f"),
             fmt(s.get("usr_us_per_txn"), ".1f"), fmt(s.get("sys_us_per_txn"), ".1f"),
             fmt(s["failed"], "g")]
            for s in summary]
    text = rst_table(["mode", "clients", "target", "tps", "lat_us",
                      "cpu_s/1k_txn", "usr_us/txn", "sys_us/txn", "failed"], rows)
    if comps:
        crow = [[c["mode"], str(c["clients"]), c["compare"],
                 fmt(c["tps_ratio"], ".3f"), fmt(c["cpu_per_txn_ratio"], ".3f"),
                 fmt(c["latency_diff_us"], "+.0f")]
                for c in comps]
        text += "\n\n" + rst_table(["mode", "clients", "compare", "tps_ratio",
                                    "cpu/txn_ratio", "lat_diff_us"], crow)
    return text


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def csv_list(conv=str):
    def parse(s):
        return [conv(x.strip()) for x in s.split(",") if x.strip()]
    return parse


def default_venv():
    local = os.path.join(REPO_DIR, ".venv")
    return local if os.path.exists(os.path.join(local, "bin", "twistd")) else "/work/venv"


def has_twistd(venv):
    return os.path.exists(os.path.join(venv, "bin", "twistd"))


def build_parser(description=__doc__.split("\n\n")[0], clients="1,64",
                 modes="simple,extended,prepared"):
    """The options; bench/newcomer.py adds its own and other defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--clients", type=csv_list(int), default=clients,
                   help="comma-separated pgbench client counts (default: %(default)s)")
    p.add_argument("--modes", type=csv_list(), default=modes,
                   help="comma-separated pgbench -M modes (default: %(default)s)")
    p.add_argument("--targets", type=csv_list(), default=None,
                   help="comma-separated subset of %s (default: all; pgcat_tw_pypy "
                        "when --pypy-venv has bin/twistd)" % ",".join(ALL_TARGETS))
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds; medians are reported (default: 3)")
    p.add_argument("--pool-size", type=int, default=4,
                   help="server connections per pool, both poolers (default: 4)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    p.add_argument("--warmup", type=int, default=2,
                   help="seconds of untimed pgbench first, per target, mode and the "
                        "most and fewest clients (0 = off)")
    p.add_argument("--venv", default=default_venv(),
                   help="venv whose bin/twistd runs pgcat_tw (default: %(default)s)")
    p.add_argument("--pypy-venv", default=os.path.join(REPO_DIR, ".venv-pypy"),
                   help="venv whose bin/twistd runs pgcat_tw_pypy (default: %(default)s, "
                        "made by scripts/pypy-venv.sh)")
    p.add_argument("--pgbouncer", default=shutil.which("pgbouncer") or "/usr/sbin/pgbouncer",
                   help="pgbouncer binary (default: %(default)s)")
    p.add_argument("--pg-bin", default=find_pg_bin(),
                   help="dir with initdb/postgres (default: %(default)s)")
    p.add_argument("--run-as", default="postgres",
                   help="OS user for postgres/pgbouncer when running as root")
    p.add_argument("--server-round-robin", action="store_true",
                   help="both poolers reuse idle servers FIFO (PgCat's default); without "
                        "it both reuse the most recently used one first (PgBouncer's "
                        "default). One client then lands on one Postgres backend, not "
                        "on each in turn")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--no-json", action="store_true",
                   help="do not write bench/results/<timestamp>.json")
    return p


def parse_args(argv=None, parser=None):
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.targets is None:
        args.targets = [t for t in ALL_TARGETS
                        if t != "pgcat_tw_pypy" or has_twistd(args.pypy_venv)]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad:
        p.error("unknown target(s) %s; choose from %s" % (bad, ",".join(ALL_TARGETS)))
    bad = [m for m in args.modes if m not in ("simple", "extended", "prepared")]
    if bad:
        p.error("unknown mode(s) %s" % bad)
    # keep canonical order: direct, pgbouncer, pgcat_tw
    args.targets = [t for t in ALL_TARGETS if t in args.targets]
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


@contextlib.contextmanager
def environment(args):
    """Postgres and the targets of ``args.targets``, started and checked.
    On exit (normal, error, Ctrl-C) stops every process it started and
    removes the temp dir (``--keep`` keeps it)."""
    args.runas = RunAs(args.run_as)
    # explicit handlers: SIGINT may be inherited as ignored (background jobs)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    workdir = tempfile.mkdtemp(prefix="pgbench-compare-")
    os.chmod(workdir, 0o755)
    args.runas.chown(workdir)
    pg = None
    targets = []
    try:
        pg = Postgres(workdir, args.runas, args.pg_bin, args.scale)
        pg.start()
        pg.setup()
        for name in args.targets:
            t = TARGET_CLASSES[name](workdir, pg, args)
            targets.append(t)
            t.start()
            t.check()
        yield targets
    finally:
        # cleanup must not be interrupted by a second Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for t in reversed(targets):
            try:
                t.stop()
            except Exception as e:  # keep cleaning up
                log("stopping %s: %s" % (t.name, e))
        if pg is not None:
            try:
                pg.stop()
            except Exception as e:
                log("stopping postgres: %s" % e)
        if args.keep:
            log("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def warm_up(targets, args):
    """Every mode at the most and the fewest clients, untimed: PyPy's JIT
    compiles each path the first time it runs hot."""
    if args.warmup <= 0:
        return
    for t in targets:
        for mode in args.modes:
            for clients in sorted({max(args.clients), min(args.clients)}, reverse=True):
                log("warmup %s %s c=%d (%ds)" % (t.name, mode, clients, args.warmup))
                run_pgbench(t, mode, clients, args.warmup)


def rotated(targets, rnd):
    """The target order of round ``rnd``: rotated by one every round."""
    k = rnd % len(targets)
    return targets[k:] + targets[:k]


def run_rounds(targets, args):
    runs = []
    combos = [(m, c) for m in args.modes for c in args.clients]
    total = args.rounds * len(combos) * len(targets)
    n = 0
    for rnd in range(args.rounds):
        order = rotated(targets, rnd)
        for mode, clients in combos:
            for t in order:
                n += 1
                if not t.alive():
                    raise BenchError("%s died\n%s" % (t.name, t.describe_failure()))
                r = run_pgbench(t, mode, clients, args.duration)
                r["round"] = rnd
                runs.append(r)
                log("[%d/%d] round %d %-8s c=%-3d %-9s tps=%s lat=%sms cpu/1k=%s failed=%s%s"
                    % (n, total, rnd, mode, clients, t.name, fmt(r["tps"], ".0f"),
                       fmt(r["latency_ms"], ".3f"), fmt(r["cpu_s_per_1k"], ".4f"),
                       r["failed"], "" if "error" not in r else
                       "  ERROR: " + r["error"].splitlines()[-1]))
    return runs


def interpreters(targets):
    """{target name: interpreter} of the pgcat_tw targets."""
    return {t.name: t.interpreter for t in targets if getattr(t, "interpreter", None)}


def save_json(args, targets, data, suffix=""):
    """Writes bench/results/<timestamp><suffix>.json: host, config and
    ``data``; returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(RESULTS_DIR, "%s%s.json" % (stamp, suffix))
    interps = interpreters(targets)
    cfg = {k: v for k, v in vars(args).items() if k != "runas"}
    with open(path, "w") as f:
        json.dump(dict({
            "timestamp": stamp,
            "host": {"node": platform.node(), "cpus": os.cpu_count(),
                     "python": platform.python_version(),
                     "pgcat_tw_interpreter": interps.get("pgcat_tw"),
                     "interpreters": interps},
            "config": cfg,
        }, **data), f, indent=2)
    return path


def main(argv=None):
    args = parse_args(argv)
    try:
        with environment(args) as targets:
            warm_up(targets, args)
            runs = run_rounds(targets, args)
            names = [t.name for t in targets]
            summary = summarize(runs, args.modes, args.clients, names)
            comps = comparisons(summary)
            text = render(summary, comps)
            print("pgbench -S: medians of %d round(s) x %ds, pool_size=%d, scale=%d"
                  % (args.rounds, args.duration, args.pool_size, args.scale))
            for name, interp in interpreters(targets).items():
                print("%s on %s" % (name, interp))
            print(text)
            if not args.no_json:
                path = save_json(args, targets, {
                    "summary": summary, "comparisons": comps, "runs": runs,
                    "table": text})
                print("\nwrote %s" % os.path.relpath(path))
        return 0
    except BenchError as e:
        log("ERROR: %s" % e)
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
