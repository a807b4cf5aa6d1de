-- pg_apikeys walkthrough (make demo): keys are created, verified, metered and revoked,
-- tokens are minted from them and verified, and an RLS policy shows each key its tenant's rows.
\pset footer off
CREATE EXTENSION pg_apikeys;

\echo '== 1. Create a key for tenant acme. The key string is shown once; only its SHA-256 is stored.'
SELECT id, key, start, expires_at FROM apikeys.create_api_key(
    name => 'acme backend', owner => 'acme',
    permissions => '{"orders": ["read", "write"]}', expires_in => '30 days') \gset
SELECT :'id' AS id, :'key' AS key;

\echo '== 2. Verify it, with and without the permissions a request needs.'
SELECT valid, code, key_id, owner, permissions FROM apikeys.verify_key(:'key');
SELECT valid, code FROM apikeys.verify_key(:'key', '{"orders": ["write"]}');
SELECT valid, code FROM apikeys.verify_key(:'key', '{"billing": ["read"]}');

\echo '== 3. A typo is rejected by the checksum, without a table lookup.'
SELECT valid, code FROM apikeys.verify_key(overlay(:'key' placing 'X' from 8 for 1));

\echo '== 4. A metered key: 3 calls in all, at most 2 a minute.'
SELECT key AS metered FROM apikeys.create_api_key(owner => 'acme', remaining => 3,
    rate_limit_max => 2, rate_limit_window => '1 minute') \gset
SELECT n, (v).code, (v).remaining, (v).rate_limit_remaining
  FROM (SELECT n, apikeys.verify_key(:'metered') AS v FROM generate_series(1, 3) n OFFSET 0) calls;

\echo '== 5. Mint a token from the key: its access, for 60 000 ms (exp_ms is to the millisecond).'
SELECT apikeys.mint_token(:'key', 60000, claims => '{"request": "demo"}') AS token \gset
SELECT valid, code, key_id, owner, claims->>'exp_ms' AS exp_ms, claims->>'request' AS request
  FROM apikeys.verify_token(:'token', '{"orders": ["read"]}');

\echo '== 6. A token that ran out: 100 ms, then 150 ms later.'
SELECT apikeys.mint_token(:'key', 100) AS short \gset
SELECT code FROM apikeys.verify_token(:'short');
SELECT pg_sleep(0.15);
SELECT code FROM apikeys.verify_token(:'short');

\echo '== 7. An ES256 signing key: outside services verify with the public JWK set.'
SELECT apikeys.rotate_signing_key('ES256') AS kid \gset
SELECT jsonb_pretty(apikeys.jwks());
SELECT apikeys.mint_token(:'key', 60000) AS es_token \gset
SELECT valid, code FROM apikeys.verify_token(:'es_token');

\echo '== 8. Row-level security: each key sees only its tenant''s rows, for one transaction.'
CREATE ROLE demo_app;
CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, item text NOT NULL);
INSERT INTO orders (tenant, item) VALUES ('acme', 'anvil'), ('acme', 'rocket'), ('globex', 'lamp');
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_reads ON orders FOR SELECT
    USING (tenant = (SELECT apikeys.current_owner())
           AND (SELECT apikeys.has_permission('orders', 'read')));
GRANT SELECT ON orders TO demo_app;
SELECT key AS globex_key FROM apikeys.create_api_key(owner => 'globex',
    permissions => '{"orders": ["read"]}') \gset
SET ROLE demo_app;
\echo '-- not authenticated: no rows'
SELECT count(*) FROM orders;
BEGIN;
SELECT owner FROM apikeys.authenticate(:'key');
SELECT apikeys.current_owner() AS tenant, item FROM orders ORDER BY item;
COMMIT;
BEGIN;
SELECT owner FROM apikeys.authenticate(apikeys.mint_token(:'globex_key', 60000));
SELECT apikeys.current_owner() AS tenant, item FROM orders ORDER BY item;
COMMIT;
\echo '-- the transaction ended: no identity, no rows'
SELECT apikeys.current_key_id(), count(*) FROM orders;
RESET ROLE;

\echo '== 9. Revoke the first key: it and every token minted from it stop verifying at once.'
SELECT apikeys.revoke_api_key(:'id') AS revoked;
SELECT valid, code FROM apikeys.verify_key(:'key');
SELECT valid, code FROM apikeys.verify_token(:'token');

\echo '== 10. The audit trail.'
SELECT action, coalesce(key_id, details->>'kid') AS subject, actor FROM apikeys.audit_log ORDER BY id;
