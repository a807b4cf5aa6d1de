#!/usr/bin/env bash
# Installs what the build and tests need on a fresh Debian 12 machine; skips what is present.
set -euo pipefail
PG_MAJOR=${PG_MAJOR:-15}
PGRX_VERSION=0.18.0
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
export PATH="$HOME/.cargo/bin:$PATH"

need_apt=()
[ -x /usr/lib/postgresql/$PG_MAJOR/bin/postgres ] || need_apt+=(postgresql-$PG_MAJOR)
[ -f /usr/include/postgresql/$PG_MAJOR/server/postgres.h ] || need_apt+=(postgresql-server-dev-$PG_MAJOR)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
command -v sudo >/dev/null 2>&1 || need_apt+=(sudo)
[ -x /usr/lib/postgresql/$PG_MAJOR/bin/pgbench ] || need_apt+=(postgresql-contrib-$PG_MAJOR)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need_apt[@]}"
fi
# Debian's package creates and starts a default cluster; we run our own, so stop it to keep 5432 quiet.
if command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | grep -q online; then
  pg_ctlcluster "$PG_MAJOR" main stop 2>/dev/null || true
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: cargo install cargo-pgrx $PGRX_VERSION"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
if ! grep -qs "pg$PG_MAJOR" "$HOME/.pgrx/config.toml"; then
  echo "setup: cargo pgrx init"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG"
fi
echo "setup: ok"
