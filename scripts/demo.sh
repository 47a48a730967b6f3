#!/usr/bin/env bash
# Demo: a throwaway PostgreSQL under ./.demo/pg and pgcat_tw in front of it.
#
#   scripts/demo.sh          # (re)start: Postgres + pooler on 127.0.0.1:6432
#   scripts/demo.sh stop     # stop the pooler and the demo Postgres
#   scripts/demo.sh status
#
# Then: psql "postgres://demo:demo@127.0.0.1:6432/demo"
set -euo pipefail

# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO_ROOT"

DEMO="$REPO_ROOT/.demo"
PGROOT="$DEMO/pg"
PGDATA="$PGROOT/data"
PGLOG="$PGROOT/postgres.log"
PIDFILE="$DEMO/pgcat.pid"
PGCAT_LOG="$DEMO/pgcat.log"
CONF="$DEMO/pgcat.toml"
POOL_PORT="${PGCAT_DEMO_PORT:-6432}"  # override only to dodge a busy 6432

pid_alive() {
    # A zombie (exited, not yet reaped by PID 1) counts as dead.
    local pid="$1" state
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [ -r "/proc/$pid/stat" ]; then
        state="$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)"
        [ "$state" != "Z" ] && [ "$state" != "X" ]
    fi
}

pg_ctl_demo() {
    # pg_ctl as the postgres user, from a directory it can read.
    (cd "$PGROOT" && as_pg_user "$BINDIR/pg_ctl" -D "$PGDATA" "$@")
}

stop_pooler() {
    [ -f "$PIDFILE" ] || return 0
    local pid i
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if pid_alive "$pid"; then
        _log "stopping pgcat (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            _log "pgcat did not exit, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDFILE"
}

stop_postgres() {
    [ -f "$PGDATA/postmaster.pid" ] || return 0
    local pid
    pid="$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null || true)"
    if pid_alive "$pid"; then
        _log "stopping demo PostgreSQL (pid $pid)"
        BINDIR="$(pg_bindir)"
        pg_ctl_demo -m fast -w -t 60 stop >/dev/null || kill -QUIT "$pid" 2>/dev/null || true
    fi
}

stop_all() {
    stop_pooler
    stop_postgres
}

remove_pgroot() {
    if [ -L "$PGROOT" ]; then
        local target
        target="$(readlink -f "$PGROOT" || true)"
        case "$target" in /tmp/pgcat-demo-pg.*) rm -rf "$target" ;; esac
        rm -f "$PGROOT"
    else
        rm -rf "$PGROOT"
    fi
}

make_pgroot() {
    mkdir -p "$DEMO"
    remove_pgroot
    mkdir -p "$PGROOT"
    if [ "$(id -u)" -eq 0 ]; then
        chown "$PG_SYSTEM_USER": "$PGROOT"
        chmod 700 "$PGROOT"
        if ! runuser -u "$PG_SYSTEM_USER" -- test -w "$PGROOT"; then
            # The postgres user cannot reach the repo (e.g. under /root):
            # keep the data in /tmp, linked from .demo/pg.
            rmdir "$PGROOT"
            local real
            real="$(mktemp -d /tmp/pgcat-demo-pg.XXXXXX)"
            chown "$PG_SYSTEM_USER": "$real"
            chmod 700 "$real"
            ln -s "$real" "$PGROOT"
        fi
    fi
}

status() {
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if pid_alive "$pid"; then echo "pgcat: running (pid $pid)"; else echo "pgcat: stopped"; fi
    pid="$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null || true)"
    if pid_alive "$pid"; then echo "postgres: running (pid $pid)"; else echo "postgres: stopped"; fi
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
    stop_all

    ensure_postgres
    ensure_venv
    BINDIR="$(pg_bindir)"
    local psql="$BINDIR/psql"
    [ -x "$psql" ] || psql="psql"

    if [ "$(free_port "$POOL_PORT")" != "$POOL_PORT" ]; then
        _log "port $POOL_PORT is already in use by something else: stop it first"
        exit 1
    fi

    # -- PostgreSQL
    make_pgroot
    local pgport sockdir
    pgport="$(free_port 5433)"
    sockdir="$PGROOT/sock"
    if [ "${#sockdir}" -gt 80 ]; then
        sockdir="$(mktemp -d /tmp/pgcat-demo-sock.XXXXXX)"
    fi
    mkdir -p "$sockdir"
    [ "$(id -u)" -ne 0 ] || chown "$PG_SYSTEM_USER": "$sockdir"

    _log "initdb $PGDATA"
    (cd "$PGROOT" && as_pg_user "$BINDIR/initdb" -D "$PGDATA" -A trust -U postgres \
        --no-sync -E UTF8 --locale=C >/dev/null)
    cat >> "$PGDATA/postgresql.conf" <<EOF

# ---- scripts/demo.sh ----
listen_addresses = '127.0.0.1'
port = $pgport
unix_socket_directories = '$sockdir'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    cat > "$PGDATA/pg_hba.conf" <<EOF
# written by scripts/demo.sh
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 md5
EOF
    _log "starting PostgreSQL on 127.0.0.1:$pgport"
    if ! pg_ctl_demo -l "$PGLOG" -w -t 60 start >/dev/null; then
        tail -n 30 "$PGLOG" >&2 || true
        exit 1
    fi
    local q=("$psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pgport" -U postgres -d postgres)
    "${q[@]}" -c "SET password_encryption = 'md5'; CREATE ROLE demo LOGIN PASSWORD 'demo';"
    "${q[@]}" -c "CREATE DATABASE demo OWNER demo;"

    # -- pooler
    cat > "$CONF" <<EOF
# written by scripts/demo.sh (PgCat format)
[general]
host = "127.0.0.1"
port = $POOL_PORT
admin_username = "admin"
admin_password = "admin"

[pools.demo]
pool_mode = "transaction"

[pools.demo.users.0]
username = "demo"
password = "demo"
pool_size = 5

[pools.demo.shards.0]
database = "demo"
servers = [["127.0.0.1", $pgport, "primary"]]
EOF
    _log "starting pgcat (twistd) on 127.0.0.1:$POOL_PORT"
    rm -f "$PIDFILE"
    if ! "$VENV/bin/twistd" --pidfile "$PIDFILE" --logfile "$PGCAT_LOG" \
            pgcat -c "$CONF"; then
        _log "twistd failed; see $PGCAT_LOG"
        tail -n 30 "$PGCAT_LOG" 2>/dev/null >&2 || true
        stop_all
        exit 1
    fi
    local i pid=""
    for i in $(seq 1 150); do
        port_open "$POOL_PORT" && break
        pid="$(cat "$PIDFILE" 2>/dev/null || true)"
        if [ "$i" -gt 10 ] && ! pid_alive "$pid"; then
            break
        fi
        sleep 0.2
    done
    if ! port_open "$POOL_PORT"; then
        _log "pgcat did not start listening on $POOL_PORT; tail of $PGCAT_LOG:"
        tail -n 30 "$PGCAT_LOG" 2>/dev/null >&2 || true
        stop_all
        exit 1
    fi

    cat <<EOF

pgcat_tw is running on 127.0.0.1:$POOL_PORT (pid $(cat "$PIDFILE" 2>/dev/null || echo '?')),
PostgreSQL on 127.0.0.1:$pgport (data in .demo/pg, log .demo/pg/postgres.log).

Connect through the pooler:
    psql "postgres://demo:demo@127.0.0.1:$POOL_PORT/demo"
Admin console:
    psql "postgres://admin:admin@127.0.0.1:$POOL_PORT/pgcat" -c 'SHOW POOLS'
Pooler log: .demo/pgcat.log   config: .demo/pgcat.toml
Stop everything:
    scripts/demo.sh stop
EOF
}

case "${1:-start}" in
    start) start ;;
    stop) stop_all; _log "demo stopped" ;;
    status) status ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
