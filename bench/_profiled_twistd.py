"""twistd with a cProfile profiler switched on by SIGUSR1 and off (and its
stats dumped) by SIGUSR2, for bench/counts.py.

Usage: python _profiled_twistd.py STATS_PATH [twistd arguments]
"""

import cProfile
import signal
import sys

stats_path = sys.argv[1]
profiler = cProfile.Profile()


def _switch(signum, frame):
    # Signal handlers run in the main thread, the reactor's.
    if signum == signal.SIGUSR1:
        profiler.enable()
    else:
        profiler.disable()
        profiler.dump_stats(stats_path)


signal.signal(signal.SIGUSR1, _switch)
signal.signal(signal.SIGUSR2, _switch)
sys.argv = ["twistd"] + sys.argv[2:]

from twisted.scripts.twistd import run  # noqa: E402

run()
