-- pg_apikeys walkthrough (make demo): keys are created, verified, metered and revoked in SQL.
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

\echo '== 5. Revoke the first key: it stops verifying at once.'
SELECT apikeys.revoke_api_key(:'id') AS revoked;
SELECT valid, code FROM apikeys.verify_key(:'key');

\echo '== 6. The audit trail.'
SELECT action, key_id, actor FROM apikeys.audit_log ORDER BY id;
