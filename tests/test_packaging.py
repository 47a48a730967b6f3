"""Packaging: a plain build of the project (what ``pip install .`` runs)
gives no warning from its build backend."""

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet import threads
from twisted.trial import unittest

from tests.test_twistd import REPO, _SOURCE_IGNORE, _SOURCE_ITEMS, base_python, install_env


def _build_wheel():
    base = tempfile.mkdtemp(prefix="pgcat_tw_wheel_")
    try:
        src = os.path.join(base, "src")
        os.makedirs(src)
        for item in _SOURCE_ITEMS:
            path = os.path.join(REPO, item)
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(src, item), ignore=_SOURCE_IGNORE)
            elif os.path.exists(path):
                shutil.copy2(path, os.path.join(src, item))
        python = base_python() or sys.executable
        res = subprocess.run([python, "-m", "pip", "wheel", "-v", "--no-deps", "-w",
                              os.path.join(base, "out"), src], env=install_env(), cwd=base,
                             capture_output=True, text=True, timeout=600)
        return res.returncode, res.stdout + res.stderr, os.listdir(os.path.join(base, "out"))
    finally:
        shutil.rmtree(base, True)


class PackagingTests(unittest.TestCase):
    timeout = 600

    def test_build_has_no_backend_warnings(self):
        d = threads.deferToThread(_build_wheel)

        def check(result):
            code, out, wheels = result
            self.assertEqual(code, 0, out[-3000:])
            self.assertEqual(len([w for w in wheels if w.startswith("pgcat_tw")]), 1, wheels)
            bad = [line for line in out.splitlines()
                   if "SetuptoolsDeprecationWarning" in line or "SetuptoolsWarning" in line
                   or "_DeprecatedConfig" in line]
            self.assertEqual(bad, [], "\n".join(bad))

        return d.addCallback(check)
