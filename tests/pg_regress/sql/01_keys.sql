-- The README's examples for API keys: create, verify, manage.
CREATE EXTENSION pg_apikeys;

-- Create a key. The key string is shown once; only its SHA-256 is stored.
SELECT id, key AS new_key, start
  FROM apikeys.create_api_key(
         id          => 'billing-svc',
         name        => 'Billing service',
         owner       => 'acme',
         permissions => '{"orders": ["read", "write"], "reports": ["*"]}',
         expires_in  => '90 days',
         metadata    => '{"team": "payments"}') \gset
SELECT id, start ~ '^sk_[0-9A-Za-z]{6}$' AS start_shape,
       :'new_key' ~ '^sk_[0-9A-Za-z]{49}$' AS key_shape
  FROM apikeys.get_api_key('billing-svc');

-- Verify it: valid, with the key's owner and permissions.
SELECT valid, code, key_id, owner, permissions
  FROM apikeys.verify_key(:'new_key');

-- Require permissions: every listed action must be granted ("*" grants all of a resource).
SELECT code FROM apikeys.verify_key(:'new_key', required => '{"orders": ["read"], "reports": ["export"]}');
SELECT code FROM apikeys.verify_key(:'new_key', required => '{"orders": ["delete"]}');

-- Typos and made-up strings are rejected by the checksum; bad keys never raise.
SELECT code FROM apikeys.verify_key('sk_notARealKey');
SELECT code FROM apikeys.verify_key(NULL);

-- A usage quota, refilled daily, and a rate limit of 2 per minute.
SELECT key AS metered FROM apikeys.create_api_key(
         id => 'metered', owner => 'acme', remaining => 100, refill_amount => 100, refill_interval => '1 day',
         rate_limit_max => 2, rate_limit_window => '1 minute') \gset
SELECT valid, code, remaining, rate_limit_remaining FROM apikeys.verify_key(:'metered');
SELECT valid, code, remaining, rate_limit_remaining FROM apikeys.verify_key(:'metered', cost => 5);
SELECT valid, code, remaining, rate_limit_remaining FROM apikeys.verify_key(:'metered');

-- Update: NULL leaves a field as it is; clear resets fields to their default.
SELECT name, remaining, expires_at IS NULL AS never_expires
  FROM apikeys.update_api_key('billing-svc', name => 'Billing (v2)', remaining => 10,
                              clear => ARRAY['expires_at']);

-- List an owner's keys (never the secret or its hash).
SELECT name, owner, prefix, remaining, rate_limit_max FROM apikeys.list_api_keys('acme') ORDER BY name;

-- Rotate with a grace period: the old key keeps working for an hour.
SELECT key AS rotated FROM apikeys.rotate_api_key('billing-svc', grace => '1 hour') \gset
SELECT code FROM apikeys.verify_key(:'new_key');
SELECT code FROM apikeys.verify_key(:'rotated');

-- Disable, revoke, delete.
SELECT (apikeys.update_api_key('billing-svc', enabled => false)).enabled;
SELECT code FROM apikeys.verify_key(:'rotated');
SELECT apikeys.revoke_api_key('billing-svc');
SELECT code FROM apikeys.verify_key(:'rotated');
SELECT apikeys.delete_api_key('billing-svc');
SELECT code FROM apikeys.verify_key(:'rotated');

-- Expired keys, and cleaning them up.
SELECT id FROM apikeys.create_api_key(id => 'temp', expires_at => now() - interval '1 day');
SELECT apikeys.delete_expired_api_keys();

-- Every management action is audited with the role that performed it.
SELECT action, key_id, actor FROM apikeys.audit_log ORDER BY id;

-- Errors carry SQLSTATEs: 22023 for bad arguments, 23505 duplicates, P0002 unknown ids.
\set VERBOSITY sqlstate
SELECT apikeys.create_api_key(rate_limit_max => 10);
SELECT id FROM apikeys.create_api_key(id => 'dup');
SELECT id FROM apikeys.create_api_key(id => 'dup');
SELECT apikeys.revoke_api_key('no-such-key');
\set VERBOSITY default
SELECT apikeys.create_api_key(permissions => '{"orders": "read"}');
