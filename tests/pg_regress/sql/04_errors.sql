-- Every error a caller can meet, as psql shows it: the SQLSTATE (\echo :LAST_ERROR_SQLSTATE),
-- a message that names the argument or the key and says what was expected, and a HINT where
-- there is a fix. The README's "Errors" section is this file.
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
\set VERBOSITY default
SET intervalstyle = postgres;
SELECT key AS demo FROM apikeys.create_api_key(id => 'errors-demo') \gset
SELECT key AS master FROM apikeys.create_api_key(id => 'errors-master', master => true) \gset
SELECT key AS plain FROM apikeys.create_api_key(id => 'errors-plain', owner => 'errors') \gset

-- 22023: bad arguments to create_api_key / update_api_key.
SELECT apikeys.create_api_key(id => 'has space');
\echo :LAST_ERROR_SQLSTATE
SELECT apikeys.create_api_key(name => repeat('x', 300));
SELECT apikeys.create_api_key(prefix => 'Live-Keys');
SELECT apikeys.create_api_key(permissions => '["orders"]');
SELECT apikeys.create_api_key(permissions => '{"orders": "read"}');
SELECT apikeys.create_api_key(metadata => jsonb_build_object('blob', repeat('x', 70000)));
SELECT apikeys.create_api_key(expires_in => '-1 day');
SELECT apikeys.create_api_key(expires_in => '1 mon -29 days');
SELECT apikeys.create_api_key(expires_in => '2000 years');
SELECT apikeys.create_api_key(expires_in => '1 day', expires_at => '2030-01-01');
SELECT apikeys.create_api_key(remaining => -1);
SELECT apikeys.create_api_key(rate_limit_max => 10);
SELECT apikeys.create_api_key(rate_limit_max => 0, rate_limit_window => '1 minute');
SELECT apikeys.create_api_key(refill_amount => 10, refill_interval => '0');
SELECT apikeys.create_api_key(role => 'no_such_role');
SELECT apikeys.create_api_key(secret => 'short');
SELECT apikeys.create_api_key(secret => 'eyJhbGciOiJIUzI1NiJ9.e30.c2ln');
SELECT apikeys.update_api_key(NULL, name => 'x');
SELECT apikeys.update_api_key('errors-demo', clear => ARRAY['colour']);
SELECT apikeys.update_api_key('errors-demo', name => 'x', clear => ARRAY['name']);
SET apikeys.default_prefix = 'Not Valid';
\echo :LAST_ERROR_SQLSTATE

-- 22023: bad arguments to verification and tokens.
SELECT code FROM apikeys.verify_key(:'plain', required => '{"orders": ["read", 1]}');
SELECT code FROM apikeys.verify_key(:'plain', cost => -1);
SELECT apikeys.mint_token(:'plain', 0);
SELECT apikeys.mint_token(:'plain', 100000000000);
SELECT apikeys.mint_token(:'plain', 60000, claims => '{"exp": 1}');
SELECT apikeys.rotate_signing_key('RS256');
SELECT apikeys.retire_signing_key(NULL);
SELECT apikeys.purge_signing_keys('-1 day');
-- jsonb that PostgreSQL accepts but that cannot be read as JSON numbers and arrays.
SELECT code FROM apikeys.verify_key(:'plain', required => '{"orders": 1e400}');
SELECT apikeys.mint_token(:'plain', 60000, claims => ('{"x": ' || repeat('[', 200) || repeat(']', 200) || '}')::jsonb);

-- 23505: ids and imported secrets are unique.
SELECT apikeys.create_api_key(id => 'errors-demo');
\echo :LAST_ERROR_SQLSTATE
SELECT apikeys.create_api_key(secret => :'plain');

-- P0002: unknown ids.
SELECT apikeys.revoke_api_key('no-such-key');
\echo :LAST_ERROR_SQLSTATE
SELECT apikeys.export_signing_key('no-such-kid');
SELECT apikeys.mint_token(:'master', 60000, for_key => 'no-such-key');

-- 28000: a credential that is not valid.
SELECT apikeys.mint_token('sk_not_a_key', 60000);
\echo :LAST_ERROR_SQLSTATE
SELECT apikeys.mint_token(apikeys.mint_token(:'plain', 60000), 60000);
SELECT apikeys.authenticate('sk_not_a_key');
SELECT apikeys.revoke_api_key('errors-demo');
SELECT apikeys.mint_token(:'demo', 60000);
SELECT apikeys.mint_token(:'master', 60000, for_key => 'errors-demo');
SELECT apikeys.authenticate(:'demo');

-- 42501: minting for another key needs a master key; management needs a grant.
SELECT apikeys.mint_token(:'plain', 60000, for_key => 'errors-demo');
\echo :LAST_ERROR_SQLSTATE
CREATE ROLE errors_nobody;
SET ROLE errors_nobody;
SELECT apikeys.create_api_key();
RESET ROLE;
DROP ROLE errors_nobody;

-- Not an error (since 0.6.0): a metered key verifies in a READ ONLY transaction (PostgREST runs
-- GET that way), and a rollback does not give the spend back: a VALID answer is a request made.
-- Only a standby refuses it (25006): it cannot enforce a quota exactly.
SELECT key AS metered FROM apikeys.create_api_key(id => 'errors-metered', remaining => 10) \gset
BEGIN READ ONLY;
SELECT code, remaining FROM apikeys.verify_key(:'metered');
ROLLBACK;
SELECT remaining FROM apikeys.get_api_key('errors-metered');

-- PGRST: authenticate_request without a valid credential (PostgREST answers 401 with
-- WWW-Authenticate, the JSON of MESSAGE as the body).
SELECT set_config('request.headers', '{"x-api-key": "sk_not_a_key"}', false);
SELECT apikeys.authenticate_request();
\echo :LAST_ERROR_SQLSTATE
