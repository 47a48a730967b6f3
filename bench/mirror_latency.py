#!/usr/bin/env python3
"""Mirroring's cost to the main traffic: pgbench through pgcat_tw with no
mirror, with a mirror up, and with a mirror that is unreachable.

Two PostgreSQL servers (the main one and the mirror, both initialized with
``pgbench -i``), one pgcat_tw per configuration (same pool, ``pool_size``
servers), and ``pgbench -n -N`` (simple-update: writes, the traffic one
mirrors) with ``--clients`` clients for ``--duration`` s, the three
configurations interleaved and their order rotated every round. Reported
per configuration: median tps and median average latency over the rounds,
and both as ratios to the unmirrored pooler's; and, with the mirror up,
how many of the main server's updates reached the mirror
(``pgbench_history`` rows) and what the pooler dropped (``SHOW MIRRORS``).

Standard library only. See bench/README.rst ("Mirroring").
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import (BenchError, RunAs, ServerProcess, free_port, log,  # noqa: E402
                   proc_cpu_seconds, wait_for_port)
from targets import DBNAME, PASSWORD, REPO_DIR, USER, Postgres, find_pg_bin  # noqa: E402
import pgbench_compare as pc  # noqa: E402

TOML = """\
[general]
host = "127.0.0.1"
port = {port}
admin_username = "admin"
admin_password = "admin"
connect_timeout = 5000

[pools.{db}]
pool_mode = "transaction"

[pools.{db}.users.0]
username = "{user}"
password = "{password}"
pool_size = {pool_size}

[pools.{db}.shards.0]
database = "{db}"
servers = [["127.0.0.1", {pg_port}, "primary"]]
{mirrors}
"""

CONFIGS = ("no_mirror", "mirror_up", "mirror_down")


class Pooler:
    def __init__(self, workdir, name, args, pg_port, mirror_port):
        self.name = name
        self.dir = os.path.join(workdir, name)
        os.mkdir(self.dir)
        self.port = free_port()
        mirrors = "" if mirror_port is None else \
            'mirrors = [["127.0.0.1", %d, 0]]' % mirror_port
        self.toml = os.path.join(self.dir, "pgcat.toml")
        with open(self.toml, "w") as f:
            f.write(TOML.format(port=self.port, db=DBNAME, user=USER, password=PASSWORD,
                                pool_size=args.pool_size, pg_port=pg_port, mirrors=mirrors))
        twistd = os.path.join(os.path.abspath(args.venv), "bin", "twistd")
        env = dict(os.environ, PYTHONPATH=REPO_DIR)
        self.proc = ServerProcess(name, [twistd, "-n", "--pidfile=", "pgcat", "-c", self.toml],
                                  os.path.join(self.dir, "twistd.log"), env=env, cwd=self.dir)
        if not wait_for_port(self.port, self.proc.popen, timeout=30):
            raise BenchError("%s did not start" % name)
        log("%s on port %d" % (name, self.port))

    def env(self):
        return dict(os.environ, PGPASSWORD=PASSWORD, PGSSLMODE="disable")

    def admin(self, sql):
        return subprocess.run(
            ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(self.port), "-U", "admin",
             "-d", "pgcat", "-c", sql], env=dict(self.env(), PGPASSWORD="admin"),
            capture_output=True, text=True).stdout

    def stop(self):
        self.proc.stop()


def pgbench(pooler, clients, duration, rate):
    argv = ["pgbench", "-n", "-N", "-c", str(clients), "-j", str(min(clients, 2)),
            "-T", str(duration), "-h", "127.0.0.1", "-p", str(pooler.port), "-U", USER,
            DBNAME] + (["-R", str(rate)] if rate else [])
    cpu0 = proc_cpu_seconds(pooler.proc.pid)
    res = subprocess.run(argv, env=pooler.env(), capture_output=True, text=True,
                         timeout=duration * 3 + 60)
    cpu = proc_cpu_seconds(pooler.proc.pid) - cpu0
    r = pc.parse_pgbench(res.stdout + res.stderr)
    if res.returncode != 0 or r["failed"]:
        raise BenchError("pgbench through %s failed:\n%s" % (pooler.name, res.stderr[-2000:]))
    r["cpu_us_per_txn"] = cpu / r["processed"] * 1e6 if r["processed"] else None
    return r


def history_rows(pg):
    out = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(pg.port),
                          "-U", USER, "-d", DBNAME, "-c", "select count(*) from pgbench_history"],
                         env=dict(os.environ, PGPASSWORD=PASSWORD),
                         capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def run(args):
    runas = RunAs(args.run_as)
    workdir = tempfile.mkdtemp(prefix="mirror-latency-")
    os.chmod(workdir, 0o755)
    started = []
    try:
        dbs = {}
        for name in ("main", "mirror"):
            d = os.path.join(workdir, name)
            os.mkdir(d)
            runas.chown(d)
            pg = Postgres(d, runas, args.pg_bin, args.scale)
            started.append(pg)
            pg.start()
            pg.setup()
            dbs[name] = pg
        down = free_port()     # nothing listens there
        poolers = {
            "no_mirror": Pooler(workdir, "no_mirror", args, dbs["main"].port, None),
            "mirror_up": Pooler(workdir, "mirror_up", args, dbs["main"].port,
                                dbs["mirror"].port),
            "mirror_down": Pooler(workdir, "mirror_down", args, dbs["main"].port, down),
        }
        started.extend(poolers.values())
        results = {name: [] for name in CONFIGS}
        order = list(CONFIGS)
        up_rows = [0, 0]      # rows the mirror_up runs added on main, on the mirror
        for rnd in range(args.rounds):
            for name in order:
                main0 = history_rows(dbs["main"])
                mirror0 = history_rows(dbs["mirror"])
                r = pgbench(poolers[name], args.clients, args.duration, args.rate)
                if name == "mirror_up":
                    time.sleep(2)    # the mirror catches up with its queue
                    up_rows[0] += history_rows(dbs["main"]) - main0
                    up_rows[1] += history_rows(dbs["mirror"]) - mirror0
                log("round %d %-12s tps %8.1f  latency %.3f ms  pooler CPU %.1f us/txn"
                    % (rnd + 1, name, r["tps"], r["latency_ms"], r["cpu_us_per_txn"]))
                results[name].append(r)
            order = order[1:] + order[:1]
        report(results, up_rows, poolers, args)
    finally:
        for p in reversed(started):
            try:
                p.stop()
            except Exception as e:     # keep stopping the others
                log("stop failed: %s" % e)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def report(results, up_rows, poolers, args):
    base_tps = statistics.median(r["tps"] for r in results["no_mirror"])
    base_lat = statistics.median(r["latency_ms"] for r in results["no_mirror"])
    print()
    base_cpu = statistics.median(r["cpu_us_per_txn"] for r in results["no_mirror"])
    print("pgbench -n -N -c %d%s, %d s x %d rounds, pool_size %d"
          % (args.clients, " -R %d" % args.rate if args.rate else "", args.duration,
             args.rounds, args.pool_size))
    print("%-12s %10s %8s %12s %8s %14s %8s" % ("config", "tps", "ratio", "latency ms",
                                                "ratio", "pooler us/txn", "ratio"))
    for name in CONFIGS:
        tps = statistics.median(r["tps"] for r in results[name])
        lat = statistics.median(r["latency_ms"] for r in results[name])
        cpu = statistics.median(r["cpu_us_per_txn"] for r in results[name])
        print("%-12s %10.1f %8.3f %12.3f %8.3f %14.1f %8.3f"
              % (name, tps, tps / base_tps, lat, lat / base_lat, cpu, cpu / base_cpu))
    print("mirror_up: %d updates on the main server, %d reached the mirror"
          % tuple(up_rows))
    for name in ("mirror_up", "mirror_down"):
        print("SHOW MIRRORS (%s):" % name)
        print(poolers[name].admin("SHOW MIRRORS").rstrip())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool-size", type=int, default=4)
    p.add_argument("--scale", type=int, default=5)
    p.add_argument("--rate", type=int, default=0,
                   help="pgbench -R: a fixed rate (tps) under capacity, 0: as fast as it goes")
    p.add_argument("--venv", default=pc.default_venv())
    p.add_argument("--pg-bin", default=find_pg_bin())
    p.add_argument("--run-as", default="postgres")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    try:
        run(args)
    except BenchError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
