-- The README's "Analytics, self-service and IP allow-lists" examples: allow-lists of both
-- address families, end users managing their own keys through PostgREST RPC, and the counts of
-- every verification.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
RESET client_min_messages;

-- IP allow-lists: a key accepted only from the office networks.
SELECT key AS office_key FROM apikeys.create_api_key(id => 'office', owner => 'umbrella',
    allowed_cidrs => '{10.0.0.0/8, 2001:db8::/32}') \gset
SELECT code FROM apikeys.verify_key(:'office_key', client_ip => '10.1.2.3');
SELECT code FROM apikeys.verify_key(:'office_key', client_ip => '2001:db8::7');
SELECT code FROM apikeys.verify_key(:'office_key', client_ip => '::ffff:10.0.0.1');
SELECT code FROM apikeys.verify_key(:'office_key', client_ip => '192.0.2.1');
SELECT code FROM apikeys.verify_key(:'office_key');
-- An identity's list applies to all its keys, as well as each key's own.
SELECT owner, allowed_cidrs FROM apikeys.create_identity('umbrella', allowed_cidrs => '{10.1.0.0/16}');
SELECT code FROM apikeys.verify_key(:'office_key', client_ip => '10.1.2.3');
SELECT code FROM apikeys.verify_key(:'office_key', client_ip => '10.2.0.1');

-- Self-service through PostgREST RPC: thin functions in the API schema.
CREATE ROLE portal_user;
CREATE SCHEMA api;
GRANT USAGE ON SCHEMA api TO portal_user;
CREATE FUNCTION api.create_key(name text, permissions jsonb DEFAULT '{}')
    RETURNS TABLE (id text, key text) LANGUAGE sql
    AS $$ SELECT id, key FROM apikeys.my_create_api_key(name, permissions) $$;
CREATE FUNCTION api.my_keys() RETURNS TABLE (id text, name text, enabled boolean) LANGUAGE sql
    AS $$ SELECT id, name, enabled FROM apikeys.my_list_api_keys() $$;
CREATE FUNCTION api.revoke_key(id text) RETURNS boolean LANGUAGE sql
    AS $$ SELECT apikeys.my_revoke_api_key(id) $$;
SELECT key AS portal_key FROM apikeys.create_api_key(id => 'alice-portal', owner => 'alice',
    role => 'portal_user', permissions => '{"apikeys": ["manage"], "docs": ["read", "write"]}') \gset

-- POST /rpc/create_key {"name": "ci", "permissions": {"docs": ["read"]}} with x-api-key, as
-- PostgREST runs it: the pre-request authenticates (and switches to the key's role), then the call.
BEGIN;
SELECT set_config('request.headers', json_build_object('x-api-key', :'portal_key')::text, true) IS NOT NULL AS headers_set;
SELECT apikeys.authenticate_request();
SELECT current_user, id LIKE 'key_%' AS generated_id, key LIKE 'sk_%' AS shown_once
  FROM api.create_key('ci', '{"docs": ["read"]}');
SELECT name, enabled FROM api.my_keys() ORDER BY name NULLS FIRST;
COMMIT;

-- Wider permissions than the caller's, or someone else's key: 42501.
BEGIN;
SELECT set_config('request.headers', json_build_object('x-api-key', :'portal_key')::text, true) IS NOT NULL AS headers_set;
SELECT apikeys.authenticate_request();
SELECT * FROM api.create_key('admin', '{"billing": ["*"]}');
ROLLBACK;
BEGIN;
SELECT set_config('request.headers', json_build_object('x-api-key', :'portal_key')::text, true) IS NOT NULL AS headers_set;
SELECT apikeys.authenticate_request();
SELECT api.revoke_key('office');
ROLLBACK;
SELECT action, acting_key_id FROM apikeys.audit_log WHERE acting_key_id IS NOT NULL ORDER BY id;

-- An HTTP refusal: PostgREST answers the status and headers of DETAIL with MESSAGE as the body.
BEGIN;
SELECT set_config('request.headers', json_build_object('x-api-key', :'office_key')::text, true) IS NOT NULL AS headers_set;
SELECT apikeys.authenticate_request();
ROLLBACK;

-- Every verification above was counted; the writer writes the counts within seconds.
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT sum(count) FROM apikeys.verification_stats(key_id => 'office',
                       until => clock_timestamp() + '1 hour'::interval)) >= 8;
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT code, sum(count) AS calls, sum(cost) AS spent
  FROM apikeys.verification_stats(owner => 'umbrella', bucket => '1 day',
                                  until => now() + '1 day'::interval)
 GROUP BY code ORDER BY code;

DROP SCHEMA api CASCADE;
DROP ROLE portal_user;
