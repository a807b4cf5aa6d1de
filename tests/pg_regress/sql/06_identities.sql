-- The README's "Identities and limits" examples: a tenant's keys sharing a quota and named
-- limits, per-call costs, credits, roles and permission queries, and a standalone rate limit.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
RESET client_min_messages;

-- A tenant whose keys share 1000 calls a day (refilled at 00:00 UTC), at most 5 calls per
-- hour (applied to every call), and a budget of 50000 tokens per hour that calls name.
SELECT owner, remaining, refill_schedule,
       (next_refill_at AT TIME ZONE 'UTC')::time = '00:00' AS refills_at_midnight_utc
  FROM apikeys.create_identity('initech',
         remaining => 1000, refill_amount => 1000, refill_interval => '1 day',
         refill_schedule => 'calendar', rate_limit_algorithm => 'fixed',
         ratelimits => '[{"name": "requests", "limit": 5, "duration": "1 hour", "auto_apply": true},
                         {"name": "tokens", "limit": 50000, "duration": "1 hour"}]');
SELECT key AS web_key FROM apikeys.create_api_key(id => 'initech-web', owner => 'initech') \gset
SELECT key AS batch_key FROM apikeys.create_api_key(id => 'initech-batch', owner => 'initech',
    remaining => 2) \gset

-- Both keys spend the identity's quota; the result shows what is left at each level.
SELECT code, remaining, identity_remaining FROM apikeys.verify_key(:'web_key');
SELECT code, remaining, identity_remaining FROM apikeys.verify_key(:'batch_key');

-- A gateway charges the tokens a request used: the call names the limit and its cost. Every
-- limit applied is reported, at its level.
SELECT v.code, l->>'name' AS name, l->>'level' AS level, l->>'remaining' AS remaining,
       l->>'exceeded' AS exceeded
  FROM apikeys.verify_key(:'web_key', ratelimits => '[{"name": "tokens", "cost": 1200}]') v,
       jsonb_array_elements(v.ratelimits) l;

-- The key's own quota runs out before the identity's: limited_by says which level refused,
-- and nothing is spent at any level when one refuses.
SELECT code, limited_by, remaining, identity_remaining
  FROM apikeys.verify_key(:'batch_key', cost => 2);
SELECT code, limited_by FROM apikeys.verify_key(:'batch_key');
-- Five calls an hour across the tenant's keys: the sixth is refused by its "requests" limit.
SELECT code, limited_by FROM apikeys.verify_key(:'web_key');
SELECT code, limited_by FROM apikeys.verify_key(:'web_key');

-- Credits: top the quotas up atomically, while verifications go on.
SELECT apikeys.update_credits('initech-batch', 'increment', 10) AS key_remaining;
SELECT apikeys.update_identity_credits('initech', 'decrement', 100) AS identity_remaining;
SELECT remaining FROM apikeys.get_identity('initech');

-- Roles: a key has its own permissions and its roles'; a role change reaches every key at once.
SELECT name, permissions FROM apikeys.create_role('reader',
    '{"orders": ["read"], "reports": ["read"]}', 'read-only access');
SELECT key AS clerk_key FROM apikeys.create_api_key(id => 'clerk', roles => ARRAY['reader'],
    permissions => '{"orders": ["write"]}') \gset
SELECT code, permissions FROM apikeys.verify_key(:'clerk_key');
-- Permission queries: every part of "all", some part of "any".
SELECT code FROM apikeys.verify_key(:'clerk_key',
    '{"all": [{"orders": ["read"]}, {"any": [{"admin": ["*"]}, {"orders": ["write"]}]}]}');
SELECT code FROM apikeys.verify_key(:'clerk_key', '{"any": [{"admin": ["*"]}, {"billing": ["pay"]}]}');
SELECT name FROM apikeys.update_role('reader', permissions => '{"orders": ["read"]}');
SELECT code FROM apikeys.verify_key(:'clerk_key', '{"reports": ["read"]}');

-- A standalone limit, no key involved: 3 login attempts per address per minute.
CREATE ROLE login_service;
GRANT EXECUTE ON FUNCTION apikeys.ratelimit TO login_service;
SET ROLE login_service;
SELECT success, "limit", remaining FROM apikeys.ratelimit('login', '203.0.113.7', 3, '1 minute');
SELECT success, "limit", remaining FROM apikeys.ratelimit('login', '203.0.113.7', 3, '1 minute');
SELECT success, "limit", remaining FROM apikeys.ratelimit('login', '203.0.113.7', 3, '1 minute');
SELECT success, "limit", remaining FROM apikeys.ratelimit('login', '203.0.113.7', 3, '1 minute');
RESET ROLE;
-- An override replaces the limit callers give, for one identifier.
SELECT apikeys.set_ratelimit_override('login', '198.51.100.1', 100, '1 minute');
SELECT success, "limit", remaining FROM apikeys.ratelimit('login', '198.51.100.1', 3, '1 minute');
