-- Data for make bench (scripts/bench.sh). :nkeys is the total number of keys in apikeys.keys;
-- :nreal of them (default 10 000) are real (bench.pool holds their key strings), the rest are
-- filler rows that only give the table and its indexes their size.
\set ON_ERROR_STOP 1
\if :{?nreal}
\else
\set nreal 10000
\endif
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE SCHEMA bench;

-- Real keys: one index probe each, as callers present them. Tenants t0..t99.
CREATE TABLE bench.pool (i int PRIMARY KEY, key text NOT NULL);
INSERT INTO bench.pool
SELECT row_number() OVER (), key
  FROM (SELECT (apikeys.create_api_key(owner => 't' || (g % 100),
                                       permissions => '{"docs": ["read"]}')).key
          FROM generate_series(1, :nreal) g) s;
INSERT INTO apikeys.keys (id, hash, prefix, start, created_by, updated_by)
SELECT 'filler-' || g, sha256(convert_to('filler-' || g, 'UTF8')), 'sk', 'sk_fill', 'bench', 'bench'
  FROM generate_series(1, :nkeys - :nreal) g;

-- The index-lookup floor: a plain table of as many rows, probed the same way.
CREATE TABLE bench.plain_t (id text PRIMARY KEY, hash bytea NOT NULL UNIQUE);
INSERT INTO bench.plain_t SELECT id, hash FROM apikeys.keys;

-- Tokens for verify_token, minted once (for the first 10 000 keys).
CREATE TABLE bench.tokens (i int PRIMARY KEY, token text NOT NULL);
INSERT INTO bench.tokens SELECT i, apikeys.mint_token(key, 3600000) FROM bench.pool WHERE i <= 10000;

-- One hot rate-limited key (the limit is never reached: every call spends) and its floor.
CREATE TABLE bench.hot (i int PRIMARY KEY, key text NOT NULL);
INSERT INTO bench.hot
SELECT 1, key FROM apikeys.create_api_key(rate_limit_max => 2147483647, rate_limit_window => '1 hour');
CREATE TABLE bench.counters (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO bench.counters VALUES (1, 0);
-- One hot key with a quota that never runs out: every call spends, durably.
CREATE TABLE bench.hot_quota (i int PRIMARY KEY, key text NOT NULL);
INSERT INTO bench.hot_quota
SELECT 1, key FROM apikeys.create_api_key(remaining => 9000000000000000000);
-- SPEC §7: 1000 tenants (identities) sharing two named rate limits (never reached), one applied
-- to every call and one each call names at a cost, and 10 keys each; a random one per call.
SELECT count(*) FROM (SELECT apikeys.create_identity('it' || g, metadata => '{"plan": "pro"}',
    ratelimits => '[{"name": "requests", "limit": 2147483647, "duration": "1 hour", "auto_apply": true},
                    {"name": "tokens", "limit": 2147483647, "duration": "1 hour"}]')
  FROM generate_series(1, 1000) g) s;
CREATE TABLE bench.identity_pool (i int PRIMARY KEY, key text NOT NULL);
INSERT INTO bench.identity_pool
SELECT g, (apikeys.create_api_key(owner => 'it' || (g % 1000 + 1))).key FROM generate_series(1, 10000) g;
-- Keys with a rate limit (never reached) for PostgREST-style GETs, one per tenant t0..t99.
CREATE TABLE bench.metered_pool (i int PRIMARY KEY, key text NOT NULL);
INSERT INTO bench.metered_pool
SELECT g, (apikeys.create_api_key(owner => 't' || (g % 100), permissions => '{"docs": ["read"]}',
                                  rate_limit_max => 2147483647, rate_limit_window => '1 hour')).key
  FROM generate_series(1, 1000) g;

-- An HS256 JWT in plain SQL with pgcrypto's hmac(): the baseline a SQL-only project would write.
CREATE FUNCTION bench.b64url(bytea) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
$$ SELECT translate(rtrim(encode($1, 'base64'), '='), E'+/\n', '-_') $$;
CREATE FUNCTION bench.b64url_decode(text) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT AS
$$ SELECT decode(rpad(translate($1, '-_', '+/'), (length($1) + 3) / 4 * 4, '='), 'base64') $$;
CREATE TABLE bench.secret (k bytea NOT NULL);
INSERT INTO bench.secret SELECT gen_random_bytes(32);
CREATE FUNCTION bench.sql_mint(key text, ms bigint) RETURNS text LANGUAGE sql AS $$
    WITH k AS (SELECT id FROM bench.plain_t WHERE hash = sha256(convert_to(key, 'UTF8'))),
         si AS (SELECT bench.b64url(convert_to('{"alg":"HS256","typ":"JWT"}', 'UTF8')) || '.' ||
                       bench.b64url(convert_to(json_build_object(
                           'sub', k.id,
                           'exp_ms', floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint + ms,
                           'jti', encode(gen_random_bytes(12), 'hex'))::text, 'UTF8')) AS s
                  FROM k)
    SELECT si.s || '.' || bench.b64url(hmac(convert_to(si.s, 'UTF8'), (SELECT k FROM bench.secret), 'sha256'))
      FROM si $$;
CREATE FUNCTION bench.sql_verify(token text) RETURNS boolean LANGUAGE sql AS $$
    SELECT bench.b64url(hmac(convert_to(split_part(token, '.', 1) || '.' || split_part(token, '.', 2), 'UTF8'),
                             (SELECT k FROM bench.secret), 'sha256')) = split_part(token, '.', 3)
       AND (convert_from(bench.b64url_decode(split_part(token, '.', 2)), 'UTF8')::json->>'exp_ms')::bigint
           > floor(extract(epoch FROM clock_timestamp()) * 1000)
       AND EXISTS (SELECT 1 FROM bench.plain_t
                    WHERE id = convert_from(bench.b64url_decode(split_part(token, '.', 2)), 'UTF8')::json->>'sub') $$;
CREATE TABLE bench.sql_tokens (i int PRIMARY KEY, token text NOT NULL);
INSERT INTO bench.sql_tokens SELECT i, bench.sql_mint(key, 3600000) FROM bench.pool;

-- Row-level security over 1M rows: the same table and data under two policies.
CREATE TABLE bench.docs (id int, tenant text, body text);
INSERT INTO bench.docs SELECT g, 't' || (g % 100), 'document ' || g FROM generate_series(1, 1000000) g;
ALTER TABLE bench.docs ENABLE ROW LEVEL SECURITY;
DO $$ BEGIN CREATE ROLE bench_open LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE bench_perm LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE bench_once LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE bench_gate LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT USAGE ON SCHEMA bench TO bench_open, bench_perm, bench_once, bench_gate;
GRANT SELECT ON bench.docs, bench.pool TO bench_open, bench_perm, bench_once, bench_gate;
CREATE POLICY open ON bench.docs TO bench_open USING (true);
-- As README recommends: the call in a sub-select runs once per query (an InitPlan) ...
CREATE POLICY once ON bench.docs TO bench_once USING ((SELECT apikeys.has_permission('docs', 'read')));
-- ... PostgreSQL's own cost of any once-per-query policy (no pg_apikeys in it) ...
CREATE POLICY gate ON bench.docs TO bench_gate USING ((SELECT true));
-- ... and as a per-row call.
CREATE POLICY perm ON bench.docs TO bench_perm USING (apikeys.has_permission('docs', 'read'));
ALTER ROLE bench_open SET max_parallel_workers_per_gather = 0;
ALTER ROLE bench_perm SET max_parallel_workers_per_gather = 0;
ALTER ROLE bench_once SET max_parallel_workers_per_gather = 0;
ALTER ROLE bench_gate SET max_parallel_workers_per_gather = 0;

-- For create_api_key x 100k: the plain-SQL floor's table.
CREATE TABLE bench.inserted (id text PRIMARY KEY, hash bytea NOT NULL UNIQUE);
VACUUM ANALYZE;
