#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL cluster for the tests' PostgreSQL half, on
# loopback (the first free port from 55432) and a private socket directory, and prints its
# URL for FIELDHAND_TEST_POSTGRES.
#   bash tests/pg/cluster.sh [DIR]        start; `bash tests/pg/cluster.sh DIR stop` stops it
# Needs Debian's postgresql package (initdb, pg_ctl). Trust authentication on 127.0.0.1 only:
# the cluster is a test fixture, never a deployment.
set -euo pipefail
dir=${1:-/tmp/fieldhand-pg}
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$bindir/initdb" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
# The server refuses to run as root: as root, it runs as the package's postgres user.
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "${2:-}" = stop ]; then
    as_owner "$bindir/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    exit 0
fi
if [ ! -f "$dir/PG_VERSION" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    as_owner "$bindir/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >"$dir.initdb.log" 2>&1 \
        || { cat "$dir.initdb.log" >&2; exit 1; }
fi
if [ -f "$dir/fieldhand-port" ]; then
    port=$(cat "$dir/fieldhand-port")
else
    # The first free port from 55432 (another cluster, e.g. a developer's, may hold one).
    port=${FIELDHAND_PG_PORT:-55432}
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
    echo "$port" > "$dir/fieldhand-port"
fi
if ! as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_owner "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w start \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300" >/dev/null \
        || { tail -n 30 "$dir/server.log" >&2; exit 1; }
fi
echo "postgres://postgres@127.0.0.1:$port/postgres"
