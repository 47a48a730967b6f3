"""Process helpers for the bench scripts: logging, free ports, CPU time
from /proc, the OS user that runs Postgres and PgBouncer when we are root,
and long-running child processes. Standard library only."""

import getpass
import os
import pwd
import signal
import socket
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


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

