#!/usr/bin/env python3
"""relay_micro.py across code versions and interpreters, interleaved.

Each version is a checkout (``--code LABEL=DIR,...``, e.g. git worktrees of
older commits); each run executes that checkout's own
``bench/relay_micro.py`` (it puts its checkout first on ``sys.path``, and
older checkouts' copies speak their own code's API) in a fresh process of
each interpreter (``--pythons``), and reports which file ``pgcat_tw`` was
imported from in that process, after the run. Every round runs every
(interpreter, version) once, the order rotated by one each round. Reported:
medians over rounds of relay_micro's us per transaction (uncontended and
contended; cold ones with ``--flush-kib``), and each version's ratio to the
first one's. Standard library only.

    python3 bench/relay_versions.py --code before=/tmp/before,now=. --rounds 3
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgbench_compare import RESULTS_DIR, code_versions, fmt, rst_table  # noqa: E402
from procs import log  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs <dir>/bench/relay_micro.py as __main__, then names the pgcat_tw it used.
WRAPPER = """\
import runpy, sys
path = sys.argv[1]
sys.argv = [path] + sys.argv[2:]
runpy.run_path(path, run_name="__main__")
print("CODE", sys.modules["pgcat_tw"].__file__)
"""

RE_WARM = re.compile(r"^(simple|extended)\s+\d+ txn/s\s+\d+ msg/s\s+([\d.]+) us/txn", re.M)
RE_CONT = re.compile(r"^(simple|extended)\s+\d+ txn/s\s+([\d.]+) us/txn contended", re.M)
RE_COLD = re.compile(r"^(simple|extended)\s+cold .*: +([\d.]+) us/txn uncontended, +([\d.]+) "
                     r"us/txn contended", re.M)
RE_CODE = re.compile(r"^CODE (.*)$", re.M)


def python_list(s):
    out = {}
    for item in s.split(","):
        label, eq, path = item.strip().partition("=")
        if not eq:
            raise argparse.ArgumentTypeError("want LABEL=PYTHON,...: %r" % item)
        out[label] = path
    return out


def run_one(python, code_dir, args):
    script = os.path.join(code_dir, "bench", "relay_micro.py")
    argv = [python, "-c", WRAPPER, script, "--seconds", str(args.seconds)]
    if args.flush_kib:
        argv += ["--flush-kib", str(args.flush_kib)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    res = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("%s %s failed:\n%s" % (python, script, res.stderr[-2000:]))
    out = res.stdout
    code = RE_CODE.search(out).group(1)
    root = os.path.realpath(code_dir) + os.sep
    if not os.path.realpath(code).startswith(root):
        raise RuntimeError("%s imported pgcat_tw from %s, not from %s" % (script, code, code_dir))
    r = {"code": code}
    for mode, us in RE_WARM.findall(out):
        r[(mode, "warm")] = float(us)
    for mode, us in RE_CONT.findall(out):
        r[(mode, "contended")] = float(us)
    for mode, a, b in RE_COLD.findall(out):
        r[(mode, "cold")] = float(a)
        r[(mode, "cold contended")] = float(b)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", type=code_versions, required=True,
                    help="LABEL=DIR,...: the checkouts, the first one the reference")
    ap.add_argument("--pythons", type=python_list,
                    default="cpython=%s,pypy=%s" % (
                        os.path.join(REPO_DIR, ".venv", "bin", "python"),
                        os.path.join(REPO_DIR, ".venv-pypy", "bin", "python")),
                    help="LABEL=PYTHON,... (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="relay_micro --seconds")
    ap.add_argument("--flush-kib", type=int, default=0, help="relay_micro --flush-kib")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)
    versions = list(args.code.items())
    pythons = [(k, v) for k, v in args.pythons.items() if os.path.exists(v)]
    combos = [(p, v) for p in pythons for v in versions]
    results = []
    for rnd in range(args.rounds):
        k = rnd % len(combos)
        for (plabel, python), (vlabel, d) in combos[k:] + combos[:k]:
            r = run_one(python, d, args)
            log("round %d %s %s: %s" % (rnd, plabel, vlabel, " ".join(
                "%s/%s=%.2f" % (key[0], key[1], v) for key, v in r.items()
                if key != "code")))
            results.append(dict(r, round=rnd, python=plabel, version=vlabel))
    keys = []
    for r in results:
        for key in r:
            if isinstance(key, tuple) and key not in keys:
                keys.append(key)
    rows, summary = [], []
    ref = versions[0][0]
    for plabel, _ in pythons:
        for key in keys:
            med = {}
            for vlabel, _ in versions:
                vals = [r[key] for r in results if r["python"] == plabel
                        and r["version"] == vlabel and key in r]
                med[vlabel] = statistics.median(vals) if vals else None
            row = [plabel, key[0], key[1]] + [fmt(med[v], ".2f") for v, _ in versions]
            row += [fmt(med[v] / med[ref] if med[v] and med[ref] else None, ".3f")
                    for v, _ in versions[1:]]
            rows.append(row)
            summary.append({"python": plabel, "mode": key[0], "kind": key[1],
                            "us_per_txn": med})
    headers = (["python", "mode", "kind"] + ["%s us" % v for v, _ in versions]
               + ["%s/%s" % (v, ref) for v, _ in versions[1:]])
    print("relay_micro.py, us per transaction, medians of %d round(s) x %gs%s"
          % (args.rounds, args.seconds,
             ", cold = %d KiB flushed between events" % args.flush_kib
             if args.flush_kib else ""))
    for plabel, python in pythons:
        for vlabel, d in versions:
            codes = sorted({r["code"] for r in results
                            if r["python"] == plabel and r["version"] == vlabel})
            print("%s %s: %s imported pgcat_tw from %s" % (plabel, vlabel, python,
                                                           ", ".join(codes)))
    table = rst_table(headers, rows)
    print(table)
    if not args.no_json:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        path = os.path.join(RESULTS_DIR, time.strftime("%Y%m%d-%H%M%S") + "-relay.json")
        with open(path, "w") as f:
            json.dump({"config": {"code": dict(args.code), "pythons": dict(args.pythons),
                                  "rounds": args.rounds, "seconds": args.seconds,
                                  "flush_kib": args.flush_kib},
                       "summary": summary, "table": table,
                       "runs": [{("%s/%s" % k if isinstance(k, tuple) else k): v
                                 for k, v in r.items()} for r in results]}, f, indent=2)
        print("\nwrote %s" % os.path.relpath(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
