#!/usr/bin/env bash
# Makes .venv-pypy: pgcat_tw installed on PyPy (Debian's pypy3, installed via
# apt when missing). Then: .venv-pypy/bin/twistd -n pgcat -c conf/pgcat.toml
set -euo pipefail

# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
ensure_pypy_venv
_log "ready: $PYPY_VENV/bin/twistd -n pgcat -c conf/pgcat.toml"
