# pg_apikeys: every target installs what it needs first (scripts/setup.sh is idempotent).
# The PostgreSQL major to build and test for (14–18, scripts/majors.sh); scripts read it too.
PG_MAJOR    ?= 15
export PG_MAJOR
PG_CONFIG   ?= /usr/lib/postgresql/$(PG_MAJOR)/bin/pg_config
PGXS_DIR     = $(shell $(PG_CONFIG) --pgxs 2>/dev/null | xargs -r dirname)
PG_REGRESS   = $(PGXS_DIR)/../test/regress/pg_regress
CARGO       ?= $(HOME)/.cargo/bin/cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

TEST_DIR    ?= /tmp/pg_apikeys_test
TEST_PORT   ?= 55434
STANDBY_DIR ?= /tmp/pg_apikeys_standby
STANDBY_PORT ?= 55435
DEMO_DIR    ?= /tmp/pg_apikeys_demo
DEMO_PORT   ?= 55433
REGRESS      = $(sort $(basename $(notdir $(wildcard tests/pg_regress/sql/*.sql))))

VENV        ?= .venv
VERSION      = $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

.PHONY: setup build lint install package bench demo test test-all test-unit test-regress test-integration test-package venv node clean-clusters

setup:
	bash scripts/setup.sh

build: setup
	$(CARGO) build

# Formatting and clippy with warnings as errors (unsafe blocks must carry a SAFETY comment:
# Cargo.toml [lints]); CI runs it before the tests.
lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features pg15,pg_test,integration -- -D warnings

# Into the PostgreSQL that PG_CONFIG names, as PGXS extensions install: make install PG_CONFIG=…
# An optimised build, the one make package ships (they share target/release). For quicker
# development builds: make test INSTALL_FLAGS=
INSTALL_FLAGS ?= --release
install: setup
	$(CARGO) pgrx install $(INSTALL_FLAGS) --pg-config $(PG_CONFIG)

# A Debian package of the release build (cargo pgrx package + dpkg-deb), in target/.
# PACKAGE_FLAGS=--debug packages the unoptimised build instead (make test-all, to test the
# packaging of every major without an optimised build of each).
DEB = target/postgresql-$(PG_MAJOR)-pg-apikeys_$(VERSION)_$(shell dpkg --print-architecture).deb
PACKAGE_FLAGS ?=
package: setup
	rm -rf target/package
	$(CARGO) pgrx package $(PACKAGE_FLAGS) --pg-config $(PG_CONFIG) --out-dir target/package
	scripts/deb.sh target/package target $(VERSION) $(PG_MAJOR)

# A walkthrough of the main job in a scratch cluster.
demo: install
	scripts/cluster.sh stop $(DEMO_DIR) $(DEMO_PORT); rm -rf $(DEMO_DIR)
	scripts/cluster.sh start $(DEMO_DIR) $(DEMO_PORT)
	scripts/cluster.sh psql $(DEMO_DIR) $(DEMO_PORT) -e -f demo/walkthrough.sql; rc=$$?; \
	  scripts/cluster.sh stop $(DEMO_DIR) $(DEMO_PORT); exit $$rc

test: setup test-unit test-regress test-integration test-package
	@echo "make test: all layers passed"

# Every supported major, one after the other, each the full suite (FULL_MAJORS can narrow that to
# the #[pg_test]s, pg_regress and the package for the others). Majors other than 15 build and
# package their library unoptimised, to save time: the whole run takes about 23 minutes on 2 cores.
ALL_MAJORS  ?= 14 15 16 17 18
FULL_MAJORS ?= $(ALL_MAJORS)
test-all:
	PG_MAJORS_WANTED="$(ALL_MAJORS)" bash scripts/setup.sh
	@for m in $(ALL_MAJORS); do \
	  case " $(FULL_MAJORS) " in \
	    *" $$m "*) targets="test-unit test-regress test-integration test-package" ;; \
	    *) targets="test-unit test-regress test-package" ;; \
	  esac; \
	  flags=; pflags=--debug; [ $$m = 15 ] && flags=--release && pflags=; \
	  start=$$(date +%s); \
	  echo "make test-all: PostgreSQL $$m: $$targets"; \
	  $(MAKE) --no-print-directory PG_MAJOR=$$m PG_CONFIG=/usr/lib/postgresql/$$m/bin/pg_config \
	    INSTALL_FLAGS=$$flags PACKAGE_FLAGS=$$pflags clean-clusters $$targets || exit 1; \
	  echo "make test-all: PostgreSQL $$m passed in $$(( $$(date +%s) - start )) s"; \
	done
	@echo "make test-all: every major passed"

# Rust unit tests and #[pg_test]s, in pgrx's own throwaway cluster.
test-unit: setup
	rm -rf /tmp/pg_apikeys_pgtest
	$(CARGO) pgrx test pg$(PG_MAJOR) --runas postgres --pgdata /tmp/pg_apikeys_pgtest

# pg_regress (the README's examples) and the integration tests share one scratch cluster.
test-regress: install
	scripts/cluster.sh stop $(TEST_DIR) $(TEST_PORT); rm -rf $(TEST_DIR)
	scripts/cluster.sh start $(TEST_DIR) $(TEST_PORT)
	rm -rf tests/pg_regress/results
	$(PG_REGRESS) --host=127.0.0.1 --port=$(TEST_PORT) --user=postgres --bindir=$$($(PG_CONFIG) --bindir) \
	  --inputdir=tests/pg_regress --outputdir=tests/pg_regress --dbname=pg_apikeys_regress \
	  $(REGRESS) || { cat tests/pg_regress/regression.diffs; scripts/cluster.sh stop $(TEST_DIR) $(TEST_PORT); exit 1; }

# A local Python with PyJWT (interoperability test) and psycopg (examples/python), and the Node
# example's node_modules: never installed globally.
venv: $(VENV)/.ok
$(VENV)/.ok: tests/interop/requirements.txt examples/python/requirements.txt
	python3 -m venv $(VENV) || { apt-get install -y python3-venv && python3 -m venv $(VENV); }
	$(VENV)/bin/pip install -q -r tests/interop/requirements.txt -r examples/python/requirements.txt
	touch $@

node: examples/node/node_modules/.ok
examples/node/node_modules/.ok: examples/node/package.json examples/node/package-lock.json
	command -v npm >/dev/null || apt-get install -y -q nodejs npm
	cd examples/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Integration tests: a primary and a streaming hot standby made with pg_basebackup; the crash
# test (tests/crash.rs) runs a durable cluster of its own on port 55436.
# Older released versions' install scripts (tests/upgrade) are copied in for the upgrade test.
test-integration: install venv node
	for f in tests/upgrade/pg_apikeys--*.sql; do \
	  [ "$$f" = tests/upgrade/pg_apikeys--$(VERSION).sql ] || cp $$f $$($(PG_CONFIG) --sharedir)/extension/; done
	scripts/cluster.sh start $(TEST_DIR) $(TEST_PORT) 2>/dev/null || true
	scripts/cluster.sh stop $(STANDBY_DIR) $(STANDBY_PORT); rm -rf $(STANDBY_DIR)
	scripts/cluster.sh standby $(STANDBY_DIR) $(STANDBY_PORT) $(TEST_PORT)
	scripts/cluster.sh psql $(TEST_DIR) $(TEST_PORT) -qc 'DROP DATABASE IF EXISTS pg_apikeys_it WITH (FORCE)'
	PG_APIKEYS_TEST_URL="host=127.0.0.1 port=$(TEST_PORT) user=postgres" \
	  PG_APIKEYS_STANDBY_URL="host=127.0.0.1 port=$(STANDBY_PORT) user=postgres" PG_BIN=$$($(PG_CONFIG) --bindir) \
	  PG_APIKEYS_PYTHON=$(CURDIR)/$(VENV)/bin/python \
	  $(CARGO) test --features integration --test integration --test context --test security --test crash --test limits --test examples -- --test-threads=1; rc=$$?; \
	  scripts/cluster.sh stop $(STANDBY_DIR) $(STANDBY_PORT); scripts/cluster.sh stop $(TEST_DIR) $(TEST_PORT); exit $$rc

# Installs the package with dpkg (replacing what make install put there), uses it in a scratch
# cluster and removes it again: afterwards no pg_apikeys is installed (make install restores it).
test-package: package
	PG_APIKEYS_DEB=$(CURDIR)/$(DEB) PG_BIN=$$($(PG_CONFIG) --bindir) \
	  $(CARGO) test --features integration --test package -- --test-threads=1

# Benchmarks (not part of make test): see scripts/bench.sh; writes BENCHMARKS.md.
bench: install
	bash scripts/bench.sh

clean-clusters:
	scripts/cluster.sh stop $(STANDBY_DIR) $(STANDBY_PORT); scripts/cluster.sh stop $(TEST_DIR) $(TEST_PORT)
	scripts/cluster.sh stop $(DEMO_DIR) $(DEMO_PORT); scripts/cluster.sh stop /tmp/pg_apikeys_crash 55436
	scripts/cluster.sh stop /tmp/pg_apikeys_wal 55439; scripts/cluster.sh stop /tmp/pg_apikeys_nopreload 55442
	scripts/cluster.sh stop /tmp/pg_apikeys_package 55437; scripts/cluster.sh stop /tmp/pg_apikeys_bench 55438
	scripts/cluster.sh stop /tmp/pg_apikeys_bench_default 55440; scripts/cluster.sh stop /tmp/pg_apikeys_ahead 55443
	scripts/cluster.sh stop /tmp/pg_apikeys_windows 55444
	rm -rf $(STANDBY_DIR) $(TEST_DIR) $(DEMO_DIR) /tmp/pg_apikeys_pgtest /tmp/pg_apikeys_crash /tmp/pg_apikeys_wal /tmp/pg_apikeys_nopreload /tmp/pg_apikeys_package /tmp/pg_apikeys_windows \
	  /tmp/pg_apikeys_bench /tmp/pg_apikeys_bench_default /tmp/pg_apikeys_ahead
