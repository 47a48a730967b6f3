#!/usr/bin/env python3
"""Per-transaction counts of a pooler's work: counting instead of timing.

pgbench's tps moves 10-30% between runs on a shared machine; counts do not.
For each target (PgBouncer, pgcat_tw on CPython and on PyPy) this runs a
fixed ``pgbench -n -S -c C -t N`` after a warm-up and divides what it counted
by the transactions processed:

``strace``
    system calls of the pooler (``strace -c -f -p``), per call name.
``callgrind``
    user-space instructions (the pooler started under ``valgrind
    --tool=callgrind --instr-atstart=no``; instrumentation switched on with
    ``callgrind_control -i on`` after the warm-up, dumped after the run).
``cprofile``
    Python function calls (pgcat_tw and, with ``--parser``, pgcat_tw_parser
    on CPython: ``bench/_profiled_twistd.py``
    runs twistd with a cProfile switched on and dumped by signals), the total
    and the most called functions.

It uses pgbench_compare's setup (``--tls``, ``--pool-size`` and the other
options). Standard library only, plus strace and valgrind on PATH.

Usage::

    python3 bench/counts.py --tls --clients 16 --tools strace,cprofile
    python3 bench/counts.py --tools callgrind --transactions 300
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgbench_compare as pc  # noqa: E402

TOOLS = ("strace", "callgrind", "cprofile")
PROFILED = os.path.join(pc.BENCH_DIR, "_profiled_twistd.py")
# the targets whose pooler runs on CPython (cProfile)
CPYTHON_TARGETS = ("pgcat_tw", "pgcat_tw_parser")


def pgbench(target, clients, transactions=None, duration=None):
    """Run pgbench -S against ``target``; the number of transactions processed."""
    argv = ["pgbench", "-n", "-S", "-c", str(clients), "-j", str(min(clients, 2)),
            "-h", target.host, "-p", str(target.port), "-U", pc.USER, pc.DBNAME]
    argv[3:3] = ["-t", str(transactions)] if transactions else ["-T", str(duration)]
    res = subprocess.run(argv, env=target.client_env(), capture_output=True, text=True)
    r = pc.parse_pgbench(res.stdout + res.stderr)
    if res.returncode != 0 or not r["processed"]:
        raise pc.BenchError("%s: pgbench failed: %s" % (target.name, res.stderr[-500:]))
    return r["processed"]


RE_STRACE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", re.M)


def count_strace(target, args):
    out = tempfile.mktemp(prefix="strace-", suffix=".txt")
    proc = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(target.pid)],
                            stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread
    n = pgbench(target, args.clients[0], args.transactions)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    with open(out) as f:
        text = f.read()
    os.unlink(out)
    calls = {name: int(c) / n for c, name in RE_STRACE.findall(text) if name != "total"}
    return n, calls


def callgrind_control(target, args, *options):
    # As the pooler's user (PgBouncer runs as --run-as when we are root):
    # callgrind_control finds the process through files only it can see.
    as_user = (["runuser", "-u", args.runas.name, "--"]
               if target.name == "pgbouncer" and args.runas.is_root else [])
    subprocess.run(as_user + ["callgrind_control"] + list(options) + [str(target.pid)],
                   capture_output=True, check=True)


def callgrind_by_object(path):
    """Self instructions per object file (executable, shared library) of a
    callgrind output: where the instructions are spent (the interpreter,
    OpenSSL, libc)."""
    names, per, ob, skip = {}, {}, "?", False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("ob=", "cob=")):
                # "(id) name" defines a compressed name (in either), "(id)" uses it.
                ref = line.partition("=")[2].strip()
                num, name = ref, ref
                if ref.startswith("("):
                    num, _, name = ref.partition(")")
                    name = name.strip()
                    if name:
                        names[num] = name
                if line.startswith("ob="):
                    ob = names.get(num, name)
            elif line.startswith("calls="):
                skip = True  # the next cost line is the call's inclusive cost
            elif line[:1].isdigit() or line[:1] in "+-*":
                if skip:
                    skip = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    per[ob] = per.get(ob, 0) + int(parts[1])
    return per


def count_callgrind(target, args):
    callgrind_control(target, args, "-i", "on")
    n = pgbench(target, args.clients[0], args.transactions)
    callgrind_control(target, args, "-d")
    callgrind_control(target, args, "-i", "off")
    time.sleep(1.0)
    total, objects = 0, {}
    for name in os.listdir(target.count_dir):
        if name.startswith("callgrind.out") and not name.endswith(".0"):
            path = os.path.join(target.count_dir, name)
            with open(path, errors="replace") as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
            for ob, cost in callgrind_by_object(path).items():
                key = "  in " + os.path.basename(ob)
                objects[key] = objects.get(key, 0) + cost / n
            os.unlink(path)
    return n, dict(objects, instructions=total / n)


def count_cprofile(target, args):
    import pstats

    stats_path = os.path.join(target.count_dir, "cprofile.stats")
    os.kill(target.pid, signal.SIGUSR1)
    time.sleep(0.5)
    n = pgbench(target, args.clients[0], args.transactions)
    os.kill(target.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not os.path.exists(stats_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    st = pstats.Stats(stats_path)
    per = {}
    for (path, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        where = "%s:%d(%s)" % (os.path.basename(path), line, func)
        per[where] = nc / n
    per["(total)"] = st.total_calls / n
    return n, per


def wrap_for(tool, args, workdir):
    """args.wrap for targets.Target.wrapped: the pooler's command line for
    ``tool`` (each target counts into a directory of its own)."""
    def wrap(target, argv):
        target.count_dir = os.path.join(workdir, "counts-" + target.name)
        os.makedirs(target.count_dir, exist_ok=True)
        args.runas.chown(target.count_dir)
        if tool == "callgrind":
            return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--smc-check=all", "--callgrind-out-file=%s/callgrind.out.%%p"
                    % target.count_dir] + argv
        if tool == "cprofile" and target.base in CPYTHON_TARGETS:
            return [argv[0].replace("twistd", "python"), PROFILED,
                    os.path.join(target.count_dir, "cprofile.stats")] + argv[1:]
        return argv
    return wrap


def applicable(tool, name):
    return tool != "cprofile" or name.partition("@")[0] in CPYTHON_TARGETS


def run_tool(tool, args):
    results = {}
    args.targets = [t for t in args.targets if applicable(tool, t) and t != "direct"]
    if not args.targets:
        return results
    workdir = tempfile.mkdtemp(prefix="counts-")
    os.chmod(workdir, 0o755)
    args.runas = pc.RunAs(args.run_as)
    args.wrap = wrap_for(tool, args, workdir)
    args.start_timeout = 300 if tool == "callgrind" else 30
    with pc.environment(args) as targets:
        for t in targets:
            pc.log("%s: warm-up" % t.name)
            if tool == "callgrind":
                pgbench(t, args.clients[0], max(50, args.transactions // 2))
            else:
                pgbench(t, args.clients[0], duration=args.warmup or 3)
            n, counts = globals()["count_" + tool](t, args)
            results[t.name] = (n, counts)
            pc.log("%s: %d transactions counted" % (t.name, n))
    return results


def report(tool, results, top):
    for name, (n, counts) in results.items():
        print("\n%s, %s (%d transactions), per transaction:" % (tool, name, n))
        for key, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            print("  %10.2f  %s" % (v, key))


def main(argv=None):
    p = pc.build_parser(description=__doc__.split("\n\n")[0], clients="16",
                        modes="simple")
    p.add_argument("--tools", type=pc.csv_list(), default="strace",
                   help="comma-separated subset of %s" % ",".join(TOOLS))
    p.add_argument("--transactions", type=int, default=1000,
                   help="pgbench -t per client (default: %(default)s)")
    p.add_argument("--top", type=int, default=25, help="lines per report")
    args = pc.parse_args(argv, p)
    args.no_json = True
    names = list(args.targets)
    try:
        for tool in args.tools:
            if tool not in TOOLS:
                raise pc.BenchError("unknown tool %s" % tool)
            args.targets = list(names)
            report(tool, run_tool(tool, args), args.top)
        return 0
    except pc.BenchError as e:
        pc.log("ERROR: %s" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
