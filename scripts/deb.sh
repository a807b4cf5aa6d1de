#!/usr/bin/env bash
# Wraps the tree `cargo pgrx package` made into a Debian package for PostgreSQL $PG_MAJOR.
# Usage: scripts/deb.sh PACKAGE_TREE OUT_DIR VERSION PG_MAJOR   (prints the .deb's path)
set -euo pipefail
tree=$1 out=$2 version=$3 pg_major=$4
name=postgresql-$pg_major-pg-apikeys
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

cp -a "$tree"/. "$root"/
# Debian's layout whatever the build's pg_config says: the library in /usr/lib/postgresql/NN/lib,
# the control and SQL files in /usr/share/postgresql/NN/extension (a relocatable server, as
# scripts/setup.sh unpacks for majors other than 15, keeps them in its own share directory).
sharedir=$(/usr/lib/postgresql/"$pg_major"/bin/pg_config --sharedir)
if [ "$sharedir" != /usr/share/postgresql/"$pg_major" ] && [ -d "$root$sharedir" ]; then
  mkdir -p "$root"/usr/share/postgresql/"$pg_major"
  mv "$root$sharedir"/extension "$root"/usr/share/postgresql/"$pg_major"/
  find "$root" -depth -type d -empty -delete
fi
# Debug symbols are for developers' builds; the package ships the library stripped, as Debian does.
find "$root" -name '*.so' -exec strip --strip-unneeded {} +
doc=$root/usr/share/doc/$name
mkdir -p "$doc" "$root/DEBIAN"
cp README.md CHANGELOG.md "$doc"/
cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pg_apikeys
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
# The library links only what every PostgreSQL server already has (libc, libm, libgcc_s).
cat > "$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: pg_apikeys developers <pg_apikeys@localhost>
Depends: postgresql-$pg_major, libc6, libgcc-s1
Section: database
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Description: API keys and key-derived JWTs managed inside PostgreSQL $pg_major
 CREATE EXTENSION pg_apikeys gives SQL functions to create API keys, verify them with
 permissions, quotas and rate limits, mint and verify millisecond-precise JWTs, and
 authenticate transactions for row-level security and PostgREST.
EOF
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | xargs -0 md5sum > DEBIAN/md5sums)
find "$root" -type d -exec chmod 755 {} +
find "$root" -type f -exec chmod 644 {} +
mkdir -p "$out"
deb=$out/${name}_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
