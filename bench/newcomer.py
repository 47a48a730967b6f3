#!/usr/bin/env python3
"""Newcomer latency: how long a fresh client waits while pgbench saturates the pool.

While ``pgbench -n -S -c C`` runs through a target, a fresh
``psql -X -c 'select 1'`` (new connection, login, one query) starts every
``--interval`` seconds, one at a time, each given ``--timeout`` seconds to
answer.  psql sends its own startup parameters (``application_name``,
``client_encoding``), which pgbench's clients do not: the newcomer is a
client unlike the ones holding the pool, and it must not starve.

The targets are pgbench_compare's (direct Postgres as the baseline,
PgBouncer, pgcat_tw on CPython and PyPy), set up the same way and run
interleaved, the order rotated every round.  Reported per (mode, clients,
target): pgbench's tps (median over rounds), the newcomers' median and
max time in ms over all rounds' answered samples, how many failed (a psql
error or no answer within ``--timeout``), how many were answered only
after pgbench had stopped, and the median and max as ratios to PgBouncer's.

Standard library only.  See bench/README.rst ("Newcomer latency").
"""

import math
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgbench_compare as pc  # noqa: E402


def newcomer(target, db, timeout):
    """One fresh ``psql -X -c 'select 1'``: (seconds, error or None)."""
    argv = ["psql", "-X", "-At", "-w", "-h", target.host, "-p", str(target.port),
            "-U", pc.USER, "-d", db, "-c", "select 1"]
    env = target.client_env(PGCONNECT_TIMEOUT=str(int(math.ceil(timeout))))
    for k in ("PGAPPNAME", "PGCLIENTENCODING", "PGOPTIONS"):
        env.pop(k, None)  # psql's own settings, not the caller's
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return time.monotonic() - t0, "no answer within %gs" % timeout
    elapsed = time.monotonic() - t0
    if proc.returncode != 0 or out.strip() != "1":
        msg = (err.strip() or out.strip() or "no output").splitlines()
        return elapsed, "rc %d: %s" % (proc.returncode, msg[-1])
    return elapsed, None


def phase(target, mode, clients, duration, args):
    """pgbench -c ``clients`` (0: none) for ``duration`` s through ``target``, and
    newcomers one after the other, started every ``args.interval`` s from
    the settle time to 1 s before the end.  Returns (pgbench run, samples)."""
    settle = min(args.settle, duration / 4)
    last = duration - min(1.0, duration / 4)
    load = {}

    def run():
        if clients:
            load["run"] = pc.run_pgbench(target, mode, clients, duration)
        else:  # no load: what psql itself costs
            time.sleep(duration)
        load["end"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    th.start()
    samples = []
    at = t0 + settle
    db = pc.target_db(target, mode)
    while at < t0 + last and th.is_alive():
        time.sleep(max(0.0, at - time.monotonic()))
        start = time.monotonic() - t0
        secs, err = newcomer(target, db, args.timeout)
        samples.append({"at_s": round(start, 3), "ms": round(secs * 1000, 2),
                        "error": err, "done": time.monotonic()})
        at += args.interval
    th.join(duration * 3 + 120)
    end = load.get("end", time.monotonic())
    for s in samples:
        # answered only once the load was gone: it waited out the whole run
        s["late"] = s.pop("done") > end
    return load.get("run"), samples


def sample_stats(samples):
    ok = [s["ms"] for s in samples if s["error"] is None]
    return {"samples": len(samples), "median_ms": pc.median(ok),
            "max_ms": max(ok) if ok else None,
            "failed": sum(1 for s in samples if s["error"] is not None),
            "late": sum(1 for s in samples if s["late"])}


def warm_up(targets, args):
    """Each target under the load of every mode and client count, with a few
    newcomers, untimed: PyPy's JIT compiles the login path too."""
    if args.warmup <= 0:
        return
    for t in targets:
        for mode in args.modes:
            for clients in [c for c in args.clients if c]:
                _, samples = phase(t, mode, clients, args.warmup, args)
                st = sample_stats(samples)
                pc.log("warmup %s %s c=%d (%ds): %d newcomers, %d failed"
                       % (t.name, mode, clients, args.warmup, st["samples"], st["failed"]))


def run_rounds(targets, args):
    """Every round, every (mode, clients), every target in the rotated order:
    one phase.  Returns the list of phase records."""
    records = []
    combos = [(m, c) for m in args.modes for c in args.clients]
    total = args.rounds * len(combos) * len(targets)
    for rnd in range(args.rounds):
        for mode, clients in combos:
            for t in pc.rotated(targets, rnd):
                if not t.alive():
                    raise pc.BenchError("%s died\n%s" % (t.name, t.describe_failure()))
                run, samples = phase(t, mode, clients, args.duration, args)
                rec = {"round": rnd, "mode": mode, "clients": clients, "target": t.name,
                       "pgbench": run, "samples": samples}
                records.append(rec)
                st = sample_stats(samples)
                errors = sorted({s["error"] for s in samples if s["error"]})
                pc.log("[%d/%d] round %d %-8s c=%-3d %-13s tps=%s newcomers=%d "
                       "median=%sms max=%sms failed=%d late=%d%s"
                       % (len(records), total, rnd, mode, clients, t.name,
                          pc.fmt(run and run["tps"], ".0f"), st["samples"],
                          pc.fmt(st["median_ms"], ".1f"), pc.fmt(st["max_ms"], ".1f"),
                          st["failed"], st["late"],
                          "  ERRORS: " + "; ".join(errors) if errors else ""))
    return records


def summarize(records, args, names):
    summary = []
    for mode in args.modes:
        for clients in args.clients:
            rows = {}
            for name in names:
                rs = [r for r in records if (r["mode"], r["clients"], r["target"])
                      == (mode, clients, name)]
                row = sample_stats([s for r in rs for s in r["samples"]])
                row.update(mode=mode, clients=clients, target=name, rounds=len(rs),
                           tps=pc.median(r["pgbench"] and r["pgbench"]["tps"] for r in rs))
                rows[name] = row
            base = rows.get("pgbouncer")
            for row in rows.values():
                for k in ("median_ms", "max_ms"):
                    ok = base and base[k] and row[k] is not None
                    row[k.replace("_ms", "_ratio")] = row[k] / base[k] if ok else None
                summary.append(row)
    return summary


def render(summary):
    rows = [[s["mode"], str(s["clients"]), s["target"], pc.fmt(s["tps"], ".0f"),
             str(s["samples"]), pc.fmt(s["median_ms"], ".1f"), pc.fmt(s["max_ms"], ".1f"),
             str(s["failed"]), str(s["late"]), pc.fmt(s["median_ratio"], ".2f"),
             pc.fmt(s["max_ratio"], ".2f")] for s in summary]
    return pc.rst_table(["mode", "clients", "target", "tps", "samples", "median_ms",
                         "max_ms", "failed", "late", "median/pgb", "max/pgb"], rows)


def pool_source():
    """The commit of the pooler's code (the tree at pc.REPO_DIR), with
    "+dirty" if pgcat_tw/ has uncommitted changes: the tree may be shared
    with someone changing the pool."""
    def git(*argv):
        res = subprocess.run(["git", "-C", pc.REPO_DIR] + list(argv),
                             capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else None
    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if git("status", "--porcelain", "pgcat_tw") else "")


def parse_args(argv=None):
    p = pc.build_parser(description=__doc__.split("\n\n")[0], clients="16,4",
                        modes="simple")
    p.add_argument("--interval", type=float, default=0.3,
                   help="seconds from one newcomer's start to the next's (default: "
                        "%(default)s); a slower newcomer is followed at once")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a newcomer may wait for its answer (default: %(default)s)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds of load before the first newcomer (default: %(default)s)")
    p.set_defaults(warmup=3)
    # --clients 0 is a phase without pgbench: the newcomer on an idle target
    return pc.parse_args(argv, parser=p)


def main(argv=None):
    args = parse_args(argv)
    source = pool_source()  # before the poolers start
    try:
        with pc.environment(args) as targets:
            warm_up(targets, args)
            records = run_rounds(targets, args)
            summary = summarize(records, args, [t.name for t in targets])
            text = render(summary)
            print("newcomer latency: psql -X -c 'select 1' every %gs (timeout %gs) during "
                  "pgbench -S, %d round(s) x %ds, pool_size=%d"
                  % (args.interval, args.timeout, args.rounds, args.duration, args.pool_size))
            print("pool code: %s at %s" % (source, pc.REPO_DIR))
            for name, interp in pc.interpreters(targets).items():
                print("%s on %s" % (name, interp))
            print(text)
            if not args.no_json:
                path = pc.save_json(args, targets, {"pool_source": source, "summary": summary,
                                                    "runs": records, "table": text}, suffix="-newcomer")
                print("\nwrote %s" % os.path.relpath(path))
        return 0
    except pc.BenchError as e:
        pc.log("ERROR: %s" % e)
        return 1
    except KeyboardInterrupt:
        pc.log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
