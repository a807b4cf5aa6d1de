-- The README's multi-tenant example: one table, row-level security, and each API key (or token)
-- sees only its tenant's rows, for the current transaction only.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
RESET client_min_messages;

-- The application connects as a role without BYPASSRLS (superusers and owners bypass RLS).
CREATE ROLE app;
CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, item text NOT NULL);
INSERT INTO orders (tenant, item) VALUES ('acme', 'anvil'), ('acme', 'rocket'), ('globex', 'lamp');
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
-- (SELECT …) makes each call an InitPlan: evaluated once per query, not once per row.
CREATE POLICY tenant_reads ON orders FOR SELECT
    USING (tenant = (SELECT apikeys.current_owner())
           AND (SELECT apikeys.has_permission('orders', 'read')));
CREATE POLICY tenant_writes ON orders FOR INSERT
    WITH CHECK (tenant = (SELECT apikeys.current_owner())
                AND (SELECT apikeys.has_permission('orders', 'write')));
GRANT SELECT, INSERT ON orders TO app;
GRANT USAGE ON SEQUENCE orders_id_seq TO app;

SELECT key AS acme_key FROM apikeys.create_api_key(
    id => 'acme-app', owner => 'acme', permissions => '{"orders": ["read", "write"]}') \gset
SELECT key AS globex_key FROM apikeys.create_api_key(
    id => 'globex-app', owner => 'globex', permissions => '{"orders": ["read"]}') \gset

SET ROLE app;

-- Nothing is authenticated: the policy shows no rows.
SELECT apikeys.current_key_id(), count(*) FROM orders;

-- Authenticate the transaction with a key: its tenant's rows, its permissions.
BEGIN;
SELECT valid, key_id, owner FROM apikeys.authenticate(:'acme_key');
SELECT apikeys.current_owner(), apikeys.current_permissions(),
       apikeys.has_permission('orders', 'write') AS can_write;
SELECT item FROM orders ORDER BY item;
INSERT INTO orders (tenant, item) VALUES ('acme', 'magnet');
COMMIT;

-- The context ended with the transaction (a pooled connection never leaks it).
SELECT apikeys.current_key_id(), count(*) FROM orders;

-- Another tenant sees only its rows, and may not write without the permission.
BEGIN;
SELECT owner FROM apikeys.authenticate(:'globex_key');
SELECT item FROM orders ORDER BY item;
INSERT INTO orders (tenant, item) VALUES ('globex', 'desk');
ROLLBACK;

-- Writing into another tenant is refused by the policy.
BEGIN;
SELECT owner FROM apikeys.authenticate(:'acme_key');
INSERT INTO orders (tenant, item) VALUES ('globex', 'forged');
ROLLBACK;

-- A token authenticates like its key and brings its claims.
BEGIN;
SELECT key_id, claims->>'plan' AS plan
  FROM apikeys.authenticate(apikeys.mint_token(:'acme_key', 60000, claims => '{"plan": "pro"}'));
SELECT apikeys.current_claims()->>'plan' AS plan, count(*) FROM orders;
COMMIT;

-- A bad credential raises 28000 with the reason and authenticates nothing.
BEGIN;
SELECT apikeys.authenticate('sk_not_a_real_key');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- `required` permissions must be granted.
BEGIN;
SELECT apikeys.authenticate(:'globex_key', required => '{"orders": ["write"]}');
ROLLBACK;

-- Settings cannot forge the context: it is not a setting.
BEGIN;
SELECT set_config('request.jwt.claims', '{"sub": "acme", "key_id": "acme-app"}', true) IS NOT NULL AS set,
       set_config('app.tenant', 'acme', true) IS NOT NULL AS set_too;
SELECT apikeys.current_key_id(), apikeys.current_owner(), count(*) FROM orders;
ROLLBACK;

-- reset() ends the context early; a rolled-back savepoint restores it.
BEGIN;
SELECT owner FROM apikeys.authenticate(:'acme_key');
SAVEPOINT s;
SELECT apikeys.reset();
SELECT apikeys.current_owner();
ROLLBACK TO SAVEPOINT s;
SELECT apikeys.current_owner();
COMMIT;

RESET ROLE;

-- PostgREST: db-pre-request = 'apikeys.authenticate_request'. PostgREST runs each request in a
-- transaction with the request headers in request.headers; the key's role is switched to.
CREATE ROLE web_user;
GRANT SELECT ON orders TO web_user;
SELECT key AS web_key FROM apikeys.create_api_key(
    id => 'acme-web', owner => 'acme', role => 'web_user', permissions => '{"orders": ["read"]}') \gset
BEGIN;
SELECT set_config('request.headers', json_build_object('x-api-key', :'web_key')::text, true) IS NOT NULL AS headers_set;
SELECT apikeys.authenticate_request();
SELECT current_user, apikeys.current_key_id();
SELECT item FROM orders ORDER BY item;
COMMIT;

-- A request without a valid credential is refused with PostgREST's custom error (SQLSTATE
-- PGRST): PostgREST answers the status and headers of DETAIL, with MESSAGE as the body.
BEGIN;
SELECT set_config('request.headers', '{"authorization": "Bearer sk_wrong"}', true) IS NOT NULL AS headers_set;
SELECT apikeys.authenticate_request();
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- PostgREST's in-database configuration: the pre-request function and, for tokens sent as
-- Bearer, the public keys of ES256/EdDSA signing keys as its jwt-secret.
CREATE ROLE authenticator LOGIN NOINHERIT;
SELECT apikeys.rotate_signing_key('ES256') IS NOT NULL AS rotated;
ALTER ROLE authenticator SET pgrst.db_pre_request = 'apikeys.authenticate_request';
DO $$ BEGIN
    EXECUTE format('ALTER ROLE authenticator SET pgrst.jwt_secret = %L', apikeys.jwks()::text);
END $$;
NOTIFY pgrst, 'reload config';   -- again after every rotate_signing_key / retire_signing_key
SELECT name, CASE name WHEN 'pgrst.jwt_secret' THEN value::jsonb->'keys'->0->>'alg' ELSE value END AS value
  FROM pg_db_role_setting, unnest(setconfig) setting,
       LATERAL (SELECT split_part(setting, '=', 1) AS name,
                       substr(setting, strpos(setting, '=') + 1) AS value) s
 WHERE setrole = 'authenticator'::regrole ORDER BY 1;

DROP TABLE orders;
DROP ROLE app, web_user, authenticator;
