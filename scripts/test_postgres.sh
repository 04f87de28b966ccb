#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests of the shared job store (docs/api.md#several-replicas).
#
#   eval "$(scripts/test_postgres.sh start)"   # initdb + start; exports SGLANG_TEST_POSTGRES_URL and _DIR
#   python -m pytest test/unit/test_job_store.py test/server/test_replicas.py
#   scripts/test_postgres.sh stop "$SGLANG_TEST_POSTGRES_DIR"   # stop it and remove its folder
#
# It uses the server this machine's packages provide (Debian: /usr/lib/postgresql/<version>/bin;
# PG_BIN overrides). The data folder is a new temporary one, the port a free loopback one, the
# role `sglang` with a random password (it may create databases: each test takes its own). Run as
# root, PostgreSQL refuses to start, so then everything runs as the `postgres` user. fsync is
# off: this database holds nothing worth keeping, and the tests stay fast.
set -euo pipefail

pg_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z "$found" ]] && command -v pg_ctl >/dev/null; then found=$(dirname "$(command -v pg_ctl)"); fi
    if [[ -z "$found" ]]; then
        echo "error: no PostgreSQL server found (install postgresql, or set PG_BIN to the folder of pg_ctl)" >&2
        exit 2
    fi
    echo "$found"
}

# Runs a command as the user PostgreSQL runs as: `postgres` when this is root, else this user.
as_pg() {
    # From /, which the postgres user can enter (a checkout under a private /tmp folder it cannot).
    if [[ $(id -u) -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local bin dir port password
    bin=$(pg_bin)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/sglang-test-postgres.XXXXXX")
    chmod 755 "$dir"
    if [[ $(id -u) -eq 0 ]]; then chown postgres: "$dir"; fi
    port=$(free_port)
    password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
    printf '%s\n' "$password" > "$dir/pwfile"
    if [[ $(id -u) -eq 0 ]]; then chown postgres: "$dir/pwfile"; fi
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 --pwfile="$dir/pwfile" \
        -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    PGPASSWORD=$password psql -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE sglang LOGIN CREATEDB PASSWORD '$password'" \
        -c "CREATE DATABASE sglang_test OWNER sglang" >/dev/null
    echo "export SGLANG_TEST_POSTGRES_URL=postgresql://sglang:$password@127.0.0.1:$port/sglang_test"
    echo "export SGLANG_TEST_POSTGRES_DIR=$dir"
}

stop() {
    local dir=${1:?usage: $0 stop DIR (the SGLANG_TEST_POSTGRES_DIR that start printed)}
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start | $0 stop DIR" >&2; exit 2 ;;
esac
