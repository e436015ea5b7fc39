#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a
# temporary folder, on a free loopback port, trust authentication, fsync off.
# Source it, then call `start_test_postgres`; it exports KEYWARD_TEST_DATABASE_URL
# and KEYWARD_TEST_PG_DATA, and `stop_test_postgres` removes the cluster.
# Installs PostgreSQL with apt-get when no server binaries are found.

find_pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(command -v initdb)"; return 0
  fi
  return 1
}

start_test_postgres() {
  local bin
  if ! bin=$(find_pg_bin); then
    echo "scripts/postgres.sh: PostgreSQL server binaries not found; installing with apt-get" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
    bin=$(find_pg_bin) || { echo "PostgreSQL installation failed" >&2; return 1; }
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  KEYWARD_TEST_PG_DIR=$(mktemp -d /tmp/keyward-pg.XXXXXX)
  local data="$KEYWARD_TEST_PG_DIR/data"
  local run_as=()
  if [ "$(id -u)" -eq 0 ]; then
    # initdb refuses to run as root: run the cluster as the postgres user.
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$KEYWARD_TEST_PG_DIR"
    chmod 755 "$KEYWARD_TEST_PG_DIR"
    run_as=(runuser -u postgres --)
  fi
  "${run_as[@]}" "$bin/initdb" -D "$data" -U postgres -A trust --no-sync >"$KEYWARD_TEST_PG_DIR/initdb.log" 2>&1 \
    || { cat "$KEYWARD_TEST_PG_DIR/initdb.log" >&2; return 1; }
  "${run_as[@]}" "$bin/pg_ctl" -D "$data" -l "$KEYWARD_TEST_PG_DIR/server.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $KEYWARD_TEST_PG_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
    start >/dev/null \
    || { cat "$KEYWARD_TEST_PG_DIR/server.log" >&2; return 1; }
  KEYWARD_TEST_PG_BIN="$bin"
  export KEYWARD_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  export KEYWARD_TEST_PG_DATA="$data"
  export KEYWARD_TEST_PG_DIR KEYWARD_TEST_PG_BIN
  echo "scripts/postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($data)" >&2
}

stop_test_postgres() {
  [ -n "${KEYWARD_TEST_PG_DIR:-}" ] || return 0
  local run_as=()
  [ "$(id -u)" -eq 0 ] && run_as=(runuser -u postgres --)
  "${run_as[@]}" "$KEYWARD_TEST_PG_BIN/pg_ctl" -D "$KEYWARD_TEST_PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$KEYWARD_TEST_PG_DIR"
}
