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
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from procs import BenchError, RunAs, log  # noqa: F401 (re-exported for bench/newcomer.py)
from targets import (  # noqa: F401 (re-exported)
    ALL_TARGETS,
    BENCH_DIR,
    DBNAME,
    PASSWORD,
    PGCAT_TARGETS,
    REPO_DIR,
    TARGET_CLASSES,
    USER,
    Certificate,
    Postgres,
    find_pg_bin,
    make_target,
)

RESULTS_DIR = os.path.join(BENCH_DIR, "results")


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
    if mode == "prepared" and target.pgcat:
        return DBNAME + "_prepared"
    return DBNAME


def run_pgbench(target, mode, clients, duration):
    argv = ["pgbench", "-n", "-S", "-M", pgbench_mode(target, mode), "-c", str(clients),
            "-j", str(min(clients, 2)), "-T", str(duration),
            "-h", target.host, "-p", str(target.port), "-U", USER,
            target_db(target, mode)]
    env = target.client_env()
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


def comparison_pairs(names):
    """(a, b) pairs to compare, in the order of ``names``: every pgcat_tw
    target with PgBouncer; a *_parser target with the same one without the
    parser (--parser); a target of a later --code version with the same one
    of the first version."""
    pairs = []
    if "pgbouncer" in names:
        pairs += [(a, "pgbouncer") for a in names if a.partition("@")[0] in PGCAT_TARGETS]
    for a in names:
        base, at, label = a.partition("@")
        if base.endswith("_parser") and base[:-len("_parser")] + at + label in names:
            pairs.append((a, base[:-len("_parser")] + at + label))
    labels = []
    for a in names:
        label = a.partition("@")[2]
        if label and label not in labels:
            labels.append(label)
    for label in labels[1:]:
        for a in names:
            base, _, lab = a.partition("@")
            if lab == label and "%s@%s" % (base, labels[0]) in names:
                pairs.append((a, "%s@%s" % (base, labels[0])))
    return pairs


def comparisons(summary, pairs=None):
    if pairs is None:
        names = []
        for s in summary:
            if s["target"] not in names:
                names.append(s["target"])
        pairs = comparison_pairs(names)
    out = []
    for a, b in pairs:
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


def code_versions(s):
    """--code: {None: DIR} or {LABEL: DIR, ...} in the given order."""
    items = [x.strip() for x in s.split(",") if x.strip()]
    if len(items) == 1 and "=" not in items[0]:
        versions = {None: items[0]}
    else:
        versions = {}
        for item in items:
            label, eq, d = item.partition("=")
            if not eq or not label or not d or "@" in label or label in versions:
                raise argparse.ArgumentTypeError("want DIR or LABEL=DIR,...: %r" % item)
            versions[label] = d
    for d in versions.values():
        if not os.path.isdir(os.path.join(d, "pgcat_tw")):
            raise argparse.ArgumentTypeError("no pgcat_tw package in %s" % d)
    return versions


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
    p.add_argument("--tls", action="store_true",
                   help="clients use TLS (sslmode=require): PgBouncer, pgcat_tw and direct "
                        "Postgres serve one self-signed certificate made in the temp dir")
    p.add_argument("--parser", action="store_true",
                   help="for each pgcat_tw target also run <target>_parser: its pools have "
                        "query_parser_enabled and query_parser_read_write_splitting on "
                        "(one primary: every query still goes to it), in the same rounds")
    p.add_argument("--code", type=code_versions, default=None,
                   help="where pgcat_tw's code comes from (prepended to PYTHONPATH; the venvs "
                        "may have a non-editable copy): DIR for one, or LABEL=DIR,... to run "
                        "each pgcat_tw target once per version, named <target>@<label>, "
                        "interleaved in the same rounds (default: this checkout)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--no-json", action="store_true",
                   help="do not write bench/results/<timestamp>.json")
    return p


def parse_args(argv=None, parser=None):
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.targets is None:
        args.targets = [t for t in ALL_TARGETS if not t.endswith("_parser")
                        and (t != "pgcat_tw_pypy" or has_twistd(args.pypy_venv))]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad:
        p.error("unknown target(s) %s; choose from %s" % (bad, ",".join(ALL_TARGETS)))
    bad = [m for m in args.modes if m not in ("simple", "extended", "prepared")]
    if bad:
        p.error("unknown mode(s) %s" % bad)
    if getattr(args, "parser", False):
        args.targets += [t + "_parser" for t in args.targets
                         if t in ("pgcat_tw", "pgcat_tw_pypy")]
    # keep canonical order: direct, pgbouncer, pgcat_tw
    args.targets = [t for t in ALL_TARGETS if t in args.targets]
    labels = [k for k in (getattr(args, "code", None) or {}) if k is not None]
    if labels:
        # each pgcat_tw target once per version, the versions side by side
        args.targets = [t for t in args.targets if t not in PGCAT_TARGETS] + [
            "%s@%s" % (t, label) for t in args.targets if t in PGCAT_TARGETS
            for label in labels]
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
        args.tls_files = Certificate(workdir, args.runas) if args.tls else None
        pg = Postgres(workdir, args.runas, args.pg_bin, args.scale, tls=args.tls_files)
        pg.start()
        pg.setup()
        for name in args.targets:
            t = make_target(name, workdir, pg, args)
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
    cfg = {k: v for k, v in vars(args).items() if k not in ("runas", "tls_files")}
    with open(path, "w") as f:
        json.dump(dict({
            "timestamp": stamp,
            "tls_sessions": {t.name: t.tls_session for t in targets if t.tls_session},
            "code": {t.name: t.code for t in targets if getattr(t, "code", None)},
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
            print("pgbench -S%s: medians of %d round(s) x %ds, pool_size=%d, scale=%d"
                  % (" over TLS (sslmode=require)" if args.tls else "", args.rounds,
                     args.duration, args.pool_size, args.scale))
            for name, interp in interpreters(targets).items():
                print("%s on %s" % (name, interp))
            for t in targets:
                if getattr(t, "code", None):
                    print("%s: pgcat_tw from %s" % (t.name, t.code["pgcat_tw"]))
            for t in targets:
                if t.tls_session:
                    print("%s: %s %s" % ((t.name,) + t.tls_session))
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
