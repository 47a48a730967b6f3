# shellcheck shell=bash
# Shared set-up for scripts/test.sh and scripts/demo.sh (sourced, not run).
#
# Provides:
#   REPO_ROOT                 absolute path of the repository
#   SUDO                      "" when root, "sudo" otherwise
#   pg_bindir                 prints the PostgreSQL server bin dir (empty if none)
#   ensure_postgres           installs PostgreSQL server + psql + pgbench via apt if missing,
#                             and (ensure_prometheus) the Prometheus tools the suite runs
#   ensure_prometheus         installs Debian's prometheus and prometheus-pgbouncer-exporter
#                             via apt if missing (tests/test_metrics.py runs both)
#   ensure_venv               creates .venv (from venv_python) and installs the project
#                             ('.[test]', not editable); ensure_libpg_query
#   ensure_libpg_query        installs Debian's libpg-query1504.0 via apt if missing (the
#                             query router loads libpg_query with cffi on both interpreters)
#   venv_python               prints the interpreter .venv is made from
#   ensure_pypy               finds PyPy ($PGCAT_PYPY, else pypy3 on PATH, else Debian's
#                             pypy3 via apt) and exports PGCAT_PYPY
#   ensure_pypy_venv          creates .venv-pypy with PyPy and installs the project ('.')
#   as_pg_user CMD...         runs CMD as the `postgres` system user when root
#   free_port [PREFERRED]     prints PREFERRED if free on 127.0.0.1, else a free port

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYPY_VENV="$REPO_ROOT/.venv-pypy"
PG_SYSTEM_USER="${PGHARNESS_USER:-postgres}"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
else
    SUDO="sudo"
fi

_log() { printf '==> %s\n' "$*" >&2; }

_apt_updated=""
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _log "apt-get not available: please install $* by hand"
        return 1
    fi
    if [ -z "$_apt_updated" ]; then
        _log "apt-get update"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
        _apt_updated=1
    fi
    _log "apt-get install $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

pg_bindir() {
    local d
    if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/pg_ctl" ]; then
        echo "$PG_BINDIR"; return 0
    fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [ -n "$d" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"; return 0
        fi
    fi
    # newest /usr/lib/postgresql/<ver>/bin with a pg_ctl
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5n | while read -r b; do
            [ -x "$b/pg_ctl" ] && echo "$b"; done | tail -n 1)"
    echo "$d"
}

ensure_postgres() {
    local installed="" bindir
    bindir="$(pg_bindir)"
    if [ -z "$bindir" ]; then
        apt_install postgresql postgresql-client postgresql-contrib
        installed=1
        bindir="$(pg_bindir)"
        if [ -z "$bindir" ]; then
            _log "PostgreSQL server binaries still not found after install"
            return 1
        fi
    fi
    if ! { [ -x "$bindir/psql" ] || command -v psql >/dev/null 2>&1; } \
       || ! { [ -x "$bindir/pgbench" ] || command -v pgbench >/dev/null 2>&1; }; then
        apt_install postgresql-client postgresql-contrib
    fi
    if [ -n "$installed" ] && command -v pg_lsclusters >/dev/null 2>&1; then
        # The package creates and may start a default cluster; we use our own
        # servers on free ports, so stop it (best effort) to free 5432.
        pg_lsclusters -h 2>/dev/null | while read -r ver name _rest; do
            $SUDO pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
        done
    fi
    if [ "$(id -u)" -eq 0 ] && ! id "$PG_SYSTEM_USER" >/dev/null 2>&1; then
        _log "running as root but there is no '$PG_SYSTEM_USER' user to run postgres as"
        return 1
    fi
    ensure_prometheus
}

# tests/test_metrics.py starts Debian's prometheus server (scraping the
# pooler's /metrics) and prometheus-pgbouncer-exporter (reading its admin
# database); a missing binary fails those tests, so install what is missing.
ensure_prometheus() {
    local want=() svc
    [ -x /usr/bin/prometheus ] || want+=(prometheus)
    [ -x /usr/bin/prometheus-pgbouncer-exporter ] || want+=(prometheus-pgbouncer-exporter)
    [ "${#want[@]}" -eq 0 ] && return 0
    apt_install --no-install-recommends "${want[@]}" || return 1
    # Where services may start (not in Docker, whose policy-rc.d refuses),
    # the packages start their daemons; the tests run their own on free
    # ports, so stop the ones just installed (best effort).
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        for svc in "${want[@]}"; do
            $SUDO systemctl stop "$svc" >/dev/null 2>&1 || true
        done
    fi
}

ensure_python() {
    if ! command -v python3 >/dev/null 2>&1 && [ -z "${PGCAT_PYTHON:-}" ]; then
        apt_install python3 python3-venv
    fi
}

# The interpreter .venv is made from: $PGCAT_PYTHON if set, else the
# distribution's /usr/bin/python3 (3.10 or newer), else python3 on PATH.
# Debian builds CPython with profile-guided and link-time optimization and
# links libpython into the executable; a default pyenv or source build
# (--enable-shared, no PGO) ran the pooler's per-transaction Python code
# about 15% slower here (bench/README.rst, "Interpreter").
venv_python() {
    if [ -n "${PGCAT_PYTHON:-}" ]; then
        echo "$PGCAT_PYTHON"
    elif [ -x /usr/bin/python3 ] \
         && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo /usr/bin/python3
    else
        command -v python3
    fi
}

ensure_libpg_query() {
    compgen -G "/usr/lib/*/libpg_query.so.1504.0" >/dev/null \
        || compgen -G "/usr/lib/libpg_query.so.1504.0" >/dev/null \
        || apt_install --no-install-recommends libpg-query1504.0
}

ensure_venv() {
    ensure_python
    ensure_libpg_query
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 \
       || [ ! -x "$VENV/bin/pip" ]; then
        rm -rf "$VENV"
        local py
        py="$(venv_python)"
        _log "creating $VENV with $py"
        if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            local pyver
            pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
            if { apt_install python3-venv "python${pyver}-venv" || apt_install python3-venv; } \
               && "$py" -m venv "$VENV"; then
                :
            elif [ -z "${PGCAT_PYTHON:-}" ] && [ "$py" != "$(command -v python3)" ]; then
                # No venv module for the distribution's interpreter and no
                # apt to add it: the python3 on PATH, as before.
                rm -rf "$VENV"
                py="$(command -v python3)"
                _log "creating $VENV with $py instead"
                "$py" -m venv "$VENV"
            else
                _log "cannot create a venv with $py"
                return 1
            fi
        fi
    fi
    # Make the repository's own `tests` package importable by .venv/bin/trial
    # (console scripts do not put the cwd on sys.path).  Appended after
    # site-packages, so `pgcat_tw` still comes from the installed copy.
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$REPO_ROOT" > "$site/_pgcat_tw_repo.pth"
    _log "pip install '.[test]'"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check '.[test]')
}

# PyPy runs the pooler's Python code in about half the CPU time (bench/
# README.rst, "Interpreter"). Debian's pypy3 is PyPy 7.3 (Python 3.9).
ensure_pypy() {
    if [ -n "${PGCAT_PYPY:-}" ]; then
        export PGCAT_PYPY
        return 0
    fi
    if ! command -v pypy3 >/dev/null 2>&1; then
        apt_install pypy3 pypy3-venv || return 1
    fi
    PGCAT_PYPY="$(command -v pypy3)"
    if ! "$PGCAT_PYPY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install pypy3-venv || return 1
    fi
    export PGCAT_PYPY
}

ensure_pypy_venv() {
    ensure_pypy || return 1
    ensure_libpg_query
    if [ ! -x "$PYPY_VENV/bin/python" ] || ! "$PYPY_VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$PYPY_VENV"
        _log "creating $PYPY_VENV with $PGCAT_PYPY"
        "$PGCAT_PYPY" -m venv "$PYPY_VENV"
    fi
    # cryptography as a wheel: PyPI's newest for PyPy 3.9 is 43.x, and its
    # source build needs Rust crates from the network.
    _log "pip install '.' (PyPy)"
    (cd "$REPO_ROOT" && "$PYPY_VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check --only-binary cryptography .)
}

as_pg_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$PG_SYSTEM_USER" -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 - "${1:-0}" <<'EOF'
import socket, sys
want = int(sys.argv[1])
for port in ([want] if want else []) + [0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    else:
        print(s.getsockname()[1])
        break
    finally:
        s.close()
EOF
}
