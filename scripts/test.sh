#!/usr/bin/env bash
# THE test command: installs what the suite needs (PostgreSQL server, psql,
# pgbench, a .venv with the project installed) and runs trial.
#
#   scripts/test.sh                       # whole suite (trial tests)
#   scripts/test.sh tests.test_pgharness  # extra args replace `tests`
#
# Works from any cwd, as root (CI) or as a user with sudo.
set -euo pipefail

# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO_ROOT"

ensure_postgres
ensure_venv
# tests/test_pypy.py runs the pooler on PyPy: here a missing PyPy is a failure.
ensure_pypy
export PGCAT_REQUIRE_PYPY=1

if [ "$#" -eq 0 ]; then
    set -- tests
fi
_log "trial $*"
exec "$VENV/bin/trial" "$@"
