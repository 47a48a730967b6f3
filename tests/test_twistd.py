"""The real process: ``twistd [-n] pgcat -c pgcat.toml`` as a child process.

All children run from a fresh virtualenv into which the project was
installed with a plain ``pip install <source>`` (not editable), exactly as a
user (or CI's ``.venv``) gets it. That is what proves the twistd plugin
(``twisted/plugins/pgcat_plugin.py``) ships with the package. The venv is
built once per test process (``installed_venv``) since it is slow; pip uses
its normal configuration and cache.

To keep the suite hermetic, the source is copied to a temporary directory
before the install (so the build writes no ``build/`` or ``*.egg-info`` into
the repository and cannot pick up stale ones), and every child runs with a
clean environment (no PYTHONPATH) from a temporary working directory, so the
repository is not on its ``sys.path``.

The pooler children sit in front of the harness's primary
(``tests.pgharness.topology().primary``); clients are real ``psql``.
Blocking code runs in threads (``in_thread``); every child process is killed
in cleanup, whatever the outcome.
"""

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.trial import unittest
from twisted.trial.unittest import FailTest

from tests.pgharness import USERS, topology
from tests.support import PSQL, free_port, in_thread, pooler_toml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_TIMEOUT = 300          # seconds for `pip install` (cold cache, slow mirror)
START_TIMEOUT = 30             # seconds for a child to listen
STOP_TIMEOUT = 20              # seconds for a child to exit after a signal
CONFIG_KEY = "pools.pgcat_test.users.0.pool_size"

# What `pip install <repo>` reads: the build metadata and the packages.
_SOURCE_ITEMS = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.rst",
                 "LICENSE", "LICENSE.txt", "pgcat_tw", "twisted")
_SOURCE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")


# --- the fresh venv (built once per process) ---------------------------------------


def base_python():
    """The interpreter the running venv was made from (or this one)."""
    candidates = [getattr(sys, "_base_executable", None)]
    cfg = os.path.join(sys.prefix, "pyvenv.cfg")
    if os.path.exists(cfg):
        with open(cfg) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "home":
                    home = value.strip()
                    v = sys.version_info
                    candidates += [os.path.join(home, f"python{v[0]}.{v[1]}"),
                                   os.path.join(home, "python3")]
    candidates.append(sys.executable)
    for c in candidates:
        if c and os.path.exists(c):
            return c
    return sys.executable


def install_env():
    """The caller's environment (pip config, proxies) without anything that
    would leak the repository or another venv into the children."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV", "PIP_USER")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def child_env(**extra):
    """A clean environment for twistd children and psql."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": os.environ.get("HOME", "/"),
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    env.update(extra)
    return env


def _run(args, timeout, what, **kw):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n"
                           f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def _build_venv(python=None, pip_args=()):
    """A venv made with ``python`` (default: the interpreter this one was
    made from) with the project installed from a copy of the working tree."""
    base = tempfile.mkdtemp(prefix="pgcat_tw_venv_")
    atexit.register(shutil.rmtree, base, True)
    src = os.path.join(base, "src")
    os.makedirs(src)
    for item in _SOURCE_ITEMS:
        path = os.path.join(REPO, item)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, item), ignore=_SOURCE_IGNORE)
        elif os.path.exists(path):
            shutil.copy2(path, os.path.join(src, item))
    venv = os.path.join(base, "venv")
    env = install_env()
    _run([python or base_python(), "-m", "venv", venv], 120, "python -m venv", env=env,
         cwd=base)
    _run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet", *pip_args,
          src], INSTALL_TIMEOUT, "pip install (not editable)", env=env, cwd=base)
    return venv


_venv_lock = threading.Lock()
_venv_results = {}


def installed_venv(python=None, pip_args=()):
    """Path of a venv (made with ``python``, default: the interpreter this
    one was made from) with the project installed from a copy of the working
    tree; built on first call per interpreter, then cached (as is a
    failure)."""
    with _venv_lock:
        result = _venv_results.setdefault(python, {})
        if "venv" in result:
            return result["venv"]
        if "error" in result:
            raise RuntimeError(f"building the test venv failed earlier: {result['error']}")
        try:
            result["venv"] = _build_venv(python, pip_args)
        except Exception as e:
            result["error"] = e
            raise
        return result["venv"]


# --- child processes ---------------------------------------------------------------


def alive(pid):
    """True for a live process; a zombie (e.g. a daemon re-parented to a PID 1
    that does not reap) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return data[data.rindex(")") + 2] not in "ZX"
    except FileNotFoundError:
        return False
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def port_open(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def read_text(path):
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


class Child:
    """A twistd child whose stdout/stderr go to a file."""

    def __init__(self, args, cwd, logpath):
        self.args = args
        self.logpath = logpath
        self._out = open(logpath, "wb")
        self.proc = subprocess.Popen(args, cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        return read_text(self.logpath)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FailTest(
                f"{' '.join(self.args)} still running after {timeout} s; output:\n"
                + self.output()[-3000:]) from None


def wait_for(predicate, timeout, what, details=lambda: "", interval=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise FailTest(f"timed out after {timeout} s waiting for {what}\n{details()}")
        time.sleep(interval)


def psql(port, sql="select 1", user="pgcat_md5", password=None, db="pgcat_test"):
    """(exit code, stdout, stderr) of psql through the pooler."""
    if password is None:
        password = USERS[user]
    env = child_env(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    proc = subprocess.run(
        [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
         "-U", user, "-d", db, "-c", sql],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()


# --- test cases --------------------------------------------------------------------


class TwistdTestCase(unittest.TestCase):
    # The first test of a run builds the venv (pip may take minutes).
    timeout = INSTALL_TIMEOUT + 180

    def setUp(self):
        d = in_thread(self._prepare)
        return d

    def make_venv(self):
        """The venv whose twistd the test runs (a subclass may pick another)."""
        return installed_venv()

    def _prepare(self):
        self.venv = self.make_venv()
        self.twistd = os.path.join(self.venv, "bin", "twistd")
        self.primary = topology().primary
        self.tmp = tempfile.mkdtemp(prefix="pgcat_tw_twistd_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    # helpers (blocking; call from in_thread)

    def write_config(self, name="pgcat.toml", port=None, **kw):
        port = port or free_port()
        kw.setdefault("pool_size", 1)
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(pooler_toml(port, [(self.primary.port, "primary")], **kw))
        return path, port

    def spawn(self, *args, log="twistd.out"):
        child = Child([self.twistd, *args], self.tmp, os.path.join(self.tmp, log))
        self.addCleanup(child.kill)
        return child

    def start_foreground(self, config, port):
        child = self.spawn("-n", "--pidfile=", "pgcat", "-c", config)

        def up():
            if child.proc.poll() is not None:
                raise FailTest(f"twistd exited with {child.proc.returncode} before "
                               f"listening; output:\n{child.output()[-3000:]}")
            return port_open(port)

        wait_for(up, START_TIMEOUT, f"twistd to listen on {port}", child.output)
        return child

    def run_twistd(self, *args, timeout=60):
        """Run twistd to completion: (exit code, stdout + stderr)."""
        try:
            proc = subprocess.run([self.twistd, *args], cwd=self.tmp, env=child_env(),
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            if isinstance(out, bytes):
                out = out.decode(errors="replace")
            raise FailTest(f"twistd {' '.join(args)} did not exit within {timeout} s; "
                           f"output:\n{out[-3000:]}") from None
        return proc.returncode, proc.stdout + proc.stderr

    def assert_query_works(self, port, user="pgcat_md5"):
        code, out, err = psql(port, "select 40 + 2", user=user)
        self.assertEqual((code, out), (0, "42"), err)

    def assert_clean_stop(self, child):
        """After SIGTERM: a clean shutdown. twistd ends by re-raising the
        signal that stopped the reactor (``twisted.scripts.twistd.runApp``
        calls ``app._exitWithSignal``), so the exit status is -SIGTERM
        rather than 0; both are accepted, a crash or a kill is not."""
        code = child.wait(STOP_TIMEOUT)
        out = child.output()
        self.assertIn(code, (0, -signal.SIGTERM), out)
        self.assertIn("Server Shut Down.", out)
        self.assert_no_traceback(out)
        return out

    def assert_no_traceback(self, text):
        self.assertNotIn("Traceback", text)
        self.assertNotIn("Unhandled error", text)


class PluginInstallTests(TwistdTestCase):
    def test_installed_not_editable(self):
        """pgcat_tw and the plugin are imported from the venv's
        site-packages, not from the repository."""
        def run():
            code = ("import pgcat_tw, twisted.plugins.pgcat_plugin as p; "
                    "print(pgcat_tw.__file__); print(p.__file__)")
            out = _run([os.path.join(self.venv, "bin", "python"), "-c", code], 60,
                       "import check", env=child_env(), cwd=self.tmp).stdout
            return out.split()

        return in_thread(run).addCallback(self._check_files)

    def _check_files(self, files):
        site = os.path.realpath(self.venv)
        self.assertEqual(len(files), 2, files)
        for f in files:
            self.assertTrue(os.path.realpath(f).startswith(site + os.sep), f)
            self.assertFalse(os.path.realpath(f).startswith(os.path.realpath(REPO) + os.sep), f)

    def test_every_module_is_installed(self):
        """Every module of the source tree is in the installed package (the
        package list in pyproject.toml is explicit, so a new subpackage
        must be added there)."""
        def run():
            purelib = _run([os.path.join(self.venv, "bin", "python"), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           60, "sysconfig", env=child_env(), cwd=self.tmp).stdout.strip()
            missing = []
            for top in ("pgcat_tw", os.path.join("twisted", "plugins")):
                for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
                    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                    for name in filenames:
                        if name.endswith(".py"):
                            rel = os.path.relpath(os.path.join(dirpath, name), REPO)
                            if not os.path.exists(os.path.join(purelib, rel)):
                                missing.append(rel)
            self.assertEqual(sorted(missing), [],
                             "source files missing from the installed package "
                             "(pyproject.toml [tool.setuptools] packages)")
        return in_thread(run)

    def test_help_lists_pgcat(self):
        def run():
            code, out = self.run_twistd("--help")
            self.assertEqual(code, 0, out)
            self.assertTrue(re.search(r"^\s+pgcat\s", out, re.M),
                            f"`twistd --help` does not list the pgcat plugin:\n{out}")
            code, out = self.run_twistd("pgcat", "--help")
            self.assertEqual(code, 0, out)
            self.assertIn("--config", out)
        return in_thread(run)

    def test_foreground_query_and_sigterm(self):
        def run():
            config, port = self.write_config()
            child = self.start_foreground(config, port)
            self.assert_query_works(port)
            self.assertIn("listening", child.output())
            child.proc.send_signal(signal.SIGTERM)
            self.assert_clean_stop(child)
            self.assertFalse(port_open(port), "the port still answers after exit")
        return in_thread(run)


class DaemonTests(TwistdTestCase):
    def _kill_daemon(self, pidfile):
        pid = self._read_pid(pidfile)
        if pid and alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _read_pid(pidfile):
        try:
            return int(read_text(pidfile).strip())
        except ValueError:
            return None

    def test_daemon_mode(self):
        def run():
            config, port = self.write_config()
            pidfile = os.path.join(self.tmp, "p.pid")
            logfile = os.path.join(self.tmp, "p.log")
            self.addCleanup(self._kill_daemon, pidfile)
            code, out = self.run_twistd("--pidfile", pidfile, "--logfile", logfile,
                                        "pgcat", "-c", config)
            self.assertEqual(code, 0, out + read_text(logfile))
            wait_for(lambda: self._read_pid(pidfile), 10, "the pidfile",
                     lambda: read_text(logfile))
            pid = self._read_pid(pidfile)
            self.assertTrue(alive(pid), f"pid {pid} from the pidfile is not running")
            wait_for(lambda: port_open(port), START_TIMEOUT, f"the daemon to listen on {port}",
                     lambda: read_text(logfile))
            self.assert_query_works(port)
            wait_for(lambda: "listening" in read_text(logfile), 10,
                     "the 'listening' line in the log", lambda: read_text(logfile))
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not alive(pid), STOP_TIMEOUT, f"pid {pid} to exit after SIGTERM",
                     lambda: read_text(logfile))
            wait_for(lambda: not os.path.exists(pidfile), 5, "the pidfile to be removed")
            self.assertFalse(port_open(port))
            self.assert_no_traceback(read_text(logfile))
        return in_thread(run)

    def test_daemon_port_in_use(self):
        """twistd reports the failed bind: non-zero exit, the error in its
        output or log, and no daemon left running without a listener."""
        def run():
            busy = socket.socket()
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            self.addCleanup(busy.close)
            port = busy.getsockname()[1]
            config, _ = self.write_config(port=port)
            pidfile = os.path.join(self.tmp, "p.pid")
            logfile = os.path.join(self.tmp, "p.log")
            self.addCleanup(self._kill_daemon, pidfile)
            code, out = self.run_twistd("--pidfile", pidfile, "--logfile", logfile,
                                        "pgcat", "-c", config)
            everything = out + read_text(logfile)
            pid = self._read_pid(pidfile)
            self.assertNotEqual(code, 0, "twistd reported success although the port is in "
                                f"use (daemon pid {pid}); output:\n{everything}")
            self.assertTrue(re.search(rf"{port}|already in use", everything),
                            f"the error does not name the port:\n{everything}")
            time.sleep(0.2)
            self.assertFalse(pid and alive(pid), f"a daemon (pid {pid}) was left running")
        return in_thread(run)


class ConfigErrorTests(TwistdTestCase):
    def test_missing_config_file(self):
        def run():
            missing = os.path.join(self.tmp, "no_such_dir", "pgcat.toml")
            code, out = self.run_twistd("-n", "--pidfile=", "pgcat", "-c", missing)
            self.assertNotEqual(code, 0, out)
            self.assertIn(missing, out)
            self.assert_no_traceback(out)
        return in_thread(run)

    def test_invalid_value_names_key_path(self):
        def run():
            config, _ = self.write_config(users={"pgcat_md5": 'pool_size = "ten"'})
            code, out = self.run_twistd("-n", "--pidfile=", "pgcat", "-c", config)
            self.assertNotEqual(code, 0, out)
            self.assertIn(CONFIG_KEY, out)
            self.assertIn(config, out)
            self.assert_no_traceback(out)
        return in_thread(run)

    def test_invalid_toml(self):
        def run():
            config = os.path.join(self.tmp, "broken.toml")
            with open(config, "w") as f:
                f.write("[general\nport = 1\n")
            code, out = self.run_twistd("-n", "--pidfile=", "pgcat", "-c", config)
            self.assertNotEqual(code, 0, out)
            self.assertIn(config, out)
            self.assert_no_traceback(out)
        return in_thread(run)

    def test_unusable_tls_key(self):
        """A key OpenSSL cannot load stops the start: non-zero, the message
        names the file, general.tls_private_key and the problem."""
        def run():
            from tests.test_pgcat_configs import ci_pair
            key = os.path.join(self.tmp, "broken.key")
            with open(key, "wb") as f:
                f.write(b"-----BEGIN RSA PRIVATE KEY-----\nMIIEvAIBADAN\n"
                        b"-----END RSA PRIVATE KEY-----\n")
            cert = os.path.join(self.tmp, "server.cert")
            with open(cert, "wb") as f:
                f.write(ci_pair()[1].public_bytes(Encoding.PEM))
            config, _ = self.write_config(
                general=f'tls_certificate = "{cert}"\ntls_private_key = "{key}"')
            code, out = self.run_twistd("-n", "--pidfile=", "pgcat", "-c", config)
            self.assertNotEqual(code, 0, out)
            for fragment in (config, "general.tls_private_key", key,
                             "not a private key OpenSSL can load"):
                self.assertIn(fragment, out)
            self.assert_no_traceback(out)
        return in_thread(run)

    def test_unknown_option(self):
        def run():
            code, out = self.run_twistd("-n", "--pidfile=", "pgcat", "--no-such-option")
            self.assertNotEqual(code, 0, out)
            self.assertIn("no-such-option", out)
        return in_thread(run)

    def test_pkcs8_key_under_rsa_header_serves(self):
        """PgCat's CI key form (a PKCS#8 body under BEGIN RSA PRIVATE KEY),
        which OpenSSL reads: the pooler starts and serves TLS with it."""
        def run():
            from tests.test_pgcat_configs import ci_pair, pkcs8_under_rsa_header
            key, cert = ci_pair()
            paths = {}
            for name, data in (("server.key", pkcs8_under_rsa_header(key)),
                               ("server.cert", cert.public_bytes(Encoding.PEM))):
                paths[name] = os.path.join(self.tmp, name)
                with open(paths[name], "wb") as f:
                    f.write(data)
            config, port = self.write_config(general=(
                f'tls_certificate = "{paths["server.cert"]}"\n'
                f'tls_private_key = "{paths["server.key"]}"'))
            child = self.start_foreground(config, port)
            env = child_env(PGPASSWORD=USERS["pgcat_md5"], PGSSLMODE="require",
                            PGCONNECT_TIMEOUT="10")
            proc = subprocess.run(
                [PSQL, "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", "pgcat_md5",
                 "-d", "pgcat_test", "-c", "select 40 + 2"],
                capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
            self.assertEqual((proc.returncode, proc.stdout.strip()), (0, "42"),
                             proc.stderr + child.output()[-2000:])
        return in_thread(run)

    def test_port_in_use_foreground(self):
        """``twistd -n`` with the port taken exits non-zero and says why
        (PgCat and PgBouncer exit; a pooler that runs on without a listener
        looks healthy to a supervisor while refusing every client)."""
        def run():
            busy = socket.socket()
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            self.addCleanup(busy.close)
            port = busy.getsockname()[1]
            config, _ = self.write_config(port=port)
            child = self.spawn("-n", "--pidfile=", "pgcat", "-c", config)
            try:
                code = child.wait(15)
            except FailTest as e:
                raise FailTest(f"twistd -n kept running with port {port} in use "
                               f"(no listener):\n{e}") from None
            out = child.output()
            self.assertNotEqual(code, 0, out)
            self.assertTrue(re.search(rf"{port}|already in use", out),
                            f"the error does not name the port:\n{out}")
        return in_thread(run)


class ReloadTests(TwistdTestCase):
    def test_sighup_reload(self):
        def run():
            config, port = self.write_config(pool_size=1)
            child = self.start_foreground(config, port)
            self.assert_query_works(port)
            # pgcat_scram is not configured yet.
            code, _, err = psql(port, user="pgcat_scram")
            self.assertNotEqual(code, 0)
            self.assertIn("pgcat_scram", err)

            # 1. A file with a TOML syntax error: logged, the old config stays.
            good_text = read_text(config)
            with open(config, "w") as f:
                f.write(good_text + "\n[pools.pgcat_test.users.1\nusername = \n")
            child.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload failed" in child.output(), 10,
                     "'reload failed' in the log", child.output)
            line = next(ln for ln in child.output().splitlines() if "reload failed" in ln)
            self.assertIn(config, line)
            self.assertIsNone(child.proc.poll(), "twistd exited after a bad reload")
            self.assert_query_works(port)

            # 2. A valid file adding a second user (SCRAM on the server side,
            # md5 between psql and the pooler): a login as that user works.
            with open(config, "w") as f:
                f.write(pooler_toml(port, [(self.primary.port, "primary")], pool_size=1,
                                    users={"pgcat_md5": "", "pgcat_scram": ""}))
            child.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "configuration reloaded" in child.output(), 10,
                     "'configuration reloaded' in the log", child.output)
            self.assert_query_works(port, user="pgcat_scram")
            self.assert_query_works(port)
            self.assertIsNone(child.proc.poll())

            child.proc.send_signal(signal.SIGTERM)
            self.assert_clean_stop(child)
        return in_thread(run)
