#!/usr/bin/env bash
# A scratch PostgreSQL cluster run by user postgres on a loopback port (initdb refuses root).
# Usage: scripts/cluster.sh start DIR PORT [setting=value ...]   (settings apply to a new cluster)
#        scripts/cluster.sh stop|psql DIR PORT [psql args...]
#        scripts/cluster.sh standby DIR PORT PRIMARY_PORT   (a streaming replica of the primary)
set -euo pipefail
PG_MAJOR=${PG_MAJOR:-15}
BIN=/usr/lib/postgresql/$PG_MAJOR/bin
cmd=$1 dir=$2 port=$3; shift 3
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres "$@"; fi; }
# A major unpacked by scripts/setup.sh (not Debian's package): its libpqwalreceiver looks for
# libpq where it was built, and would load Debian's older one (which refuses the connection
# options its own pg_basebackup writes), so point the server at the libpq it came with.
if [ -f "$BIN/../.pg_apikeys-binaries" ]; then
  as_pg() {
    if [ "$(id -un)" = postgres ]; then LD_LIBRARY_PATH="$BIN/../lib" "$@"
    else sudo -u postgres env LD_LIBRARY_PATH="$BIN/../lib" "$@"; fi
  }
fi
case "$cmd" in
  start)
    if [ ! -f "$dir/PG_VERSION" ]; then
      mkdir -p "$dir" && chown postgres "$dir"
      as_pg "$BIN/initdb" -D "$dir" -U postgres -A trust --no-sync >/dev/null
      cat "$(dirname "$0")/../pg_test.conf" >> "$dir/postgresql.conf"
      printf "port = %s\nunix_socket_directories = '%s'\n" "$port" "$dir" >> "$dir/postgresql.conf"
      # Later lines win: the caller's settings override pg_test.conf's.
      for setting in "$@"; do printf "%s\n" "$setting" >> "$dir/postgresql.conf"; done
    fi
    # Our loopback ports lie in Linux's ephemeral range: a client connection that just used the
    # port as its local end (TIME_WAIT, up to a minute) makes the bind fail. Wait it out.
    for try in $(seq 1 15); do
      if as_pg "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null; then exit 0; fi
      tail -n 3 "$dir/server.log" | grep -q "could not create any TCP/IP sockets" || exit 1
      echo "cluster.sh: port $port busy (try $try), retrying in 5 s" >&2; sleep 5
    done
    exit 1
    ;;
  stop)
    [ -f "$dir/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null || true
    ;;
  standby)
    primary_port=$1
    if [ ! -f "$dir/PG_VERSION" ]; then
      mkdir -p "$dir" && chown postgres "$dir" && chmod 700 "$dir"
      as_pg "$BIN/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$dir" -R -X stream -c fast
      printf "port = %s\nunix_socket_directories = '%s'\nhot_standby = on\n" "$port" "$dir" >> "$dir/postgresql.conf"
    fi
    as_pg "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
    ;;
  psql)
    exec psql -h 127.0.0.1 -p "$port" -U postgres -X -v ON_ERROR_STOP=1 "$@"
    ;;
  *) echo "usage: $0 start|stop|standby|psql DIR PORT" >&2; exit 2 ;;
esac
