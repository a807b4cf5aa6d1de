-- pg_apikeys 0.7.0 -> 0.8.0 (verification analytics, self-service keys, HTTP statuses, IP
-- allow-lists: SPEC §8)
--
-- New tables verification_counts, verification_batches and verification_rollup (dumped with
-- pg_dump), written by the metering engine's writer.
-- Keys and identities gain allowed_cidrs; audit rows name the key a self-service call acted for.
-- create_api_key, update_api_key, create_identity and update_identity gain allowed_cidrs,
-- verify_key, verify_token and authenticate gain client_ip (last, so positional calls keep
-- working), authenticate_request gains `required`; replacing them would drop the EXECUTE grants
-- a DBA gave: they are carried over. New: verification_stats (admin), my_* (PUBLIC, checked by
-- the authenticated key), authenticate_http (PUBLIC, the layer under authenticate_request).

ALTER TABLE apikeys.keys ADD COLUMN allowed_cidrs cidr[];
ALTER TABLE apikeys.identities ADD COLUMN allowed_cidrs cidr[];
ALTER TABLE apikeys.audit_log ADD COLUMN acting_key_id text;

CREATE TABLE apikeys.verification_counts (
    granularity text NOT NULL CHECK (granularity IN ('minute', 'hour', 'day')),
    bucket      timestamptz NOT NULL,
    key_id      text COLLATE pg_catalog."C" NOT NULL,
    owner       text COLLATE pg_catalog."C",
    code        text COLLATE pg_catalog."C" NOT NULL,
    count       bigint NOT NULL,
    cost        bigint NOT NULL
) WITH (fillfactor = 50);  -- hour and day rows are updated in place: room for HOT updates
CREATE UNIQUE INDEX verification_counts_bucket_idx ON apikeys.verification_counts
    (granularity, bucket, key_id, code, (COALESCE(owner, '')), (owner IS NULL));
CREATE TABLE apikeys.verification_batches (
    minute     timestamptz NOT NULL,
    key_ids    text[] NOT NULL,
    created    timestamptz[] NOT NULL,
    codes      text[] NOT NULL,
    counts     bigint[] NOT NULL,
    costs      bigint[] NOT NULL
) WITH (vacuum_truncate = false);  -- emptied every minute: no AccessExclusive truncation
CREATE INDEX verification_batches_minute_idx ON apikeys.verification_batches (minute);
CREATE TABLE apikeys.verification_rollup (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    through timestamptz NOT NULL
);
-- Short-lived (a minute or two): stored out of line uncompressed, compressing them cost more
-- than writing them.
ALTER TABLE apikeys.verification_batches ALTER COLUMN key_ids SET STORAGE EXTERNAL,
    ALTER COLUMN created SET STORAGE EXTERNAL, ALTER COLUMN codes SET STORAGE EXTERNAL,
    ALTER COLUMN counts SET STORAGE EXTERNAL, ALTER COLUMN costs SET STORAGE EXTERNAL;
SELECT pg_catalog.pg_extension_config_dump('apikeys.verification_counts', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.verification_batches', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.verification_rollup', '');
REVOKE ALL ON apikeys.verification_counts, apikeys.verification_batches,
    apikeys.verification_rollup FROM PUBLIC;

ALTER TYPE apikeys.api_key ADD ATTRIBUTE allowed_cidrs cidr[];
ALTER TYPE apikeys.identity ADD ATTRIBUTE allowed_cidrs cidr[];

-- (Kept in a transaction-local setting: a table made here would become part of the extension.)
SELECT pg_catalog.set_config('pg_apikeys_upgrade.grants', COALESCE(pg_catalog.jsonb_agg(
           pg_catalog.jsonb_build_object('name', p.proname, 'grantee', a.grantee::pg_catalog.int8))::pg_catalog.text, '[]'), true)
  FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
 WHERE p.pronamespace OPERATOR(pg_catalog.=) 'apikeys'::pg_catalog.regnamespace
   AND p.proname OPERATOR(pg_catalog.=) ANY (ARRAY['create_api_key', 'update_api_key',
       'create_identity', 'update_identity', 'verify_key', 'verify_token', 'authenticate',
       'authenticate_request']::pg_catalog.name[])
   AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
   AND a.grantee OPERATOR(pg_catalog.<>) p.proowner;

DROP FUNCTION apikeys.create_api_key(text, text, jsonb, interval, timestamptz, text, text, text, text, text, jsonb, boolean, bigint, bigint, interval, integer, interval, boolean, text, text[], jsonb, integer, text);
DROP FUNCTION apikeys.update_api_key(text, text, text, jsonb, interval, timestamptz, text, text, jsonb, bigint, bigint, interval, integer, interval, boolean, text[], text, text[], jsonb, integer, text);
DROP FUNCTION apikeys.create_identity(text, jsonb, bigint, bigint, interval, integer, jsonb, text, text);
DROP FUNCTION apikeys.update_identity(text, jsonb, bigint, bigint, interval, integer, jsonb, text, text, text[]);
DROP FUNCTION apikeys.verify_key(text, jsonb, integer, jsonb);
DROP FUNCTION apikeys.verify_token(text, jsonb, integer, jsonb);
DROP FUNCTION apikeys.authenticate(text, jsonb, jsonb);
DROP FUNCTION apikeys.authenticate_request();

CREATE FUNCTION apikeys."create_api_key"(
	"name" TEXT DEFAULT NULL,
	"owner" TEXT DEFAULT NULL,
	"permissions" jsonb DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"expires_at" timestamp with time zone DEFAULT NULL,
	"prefix" TEXT DEFAULT NULL,
	"id" TEXT DEFAULT NULL,
	"secret" TEXT DEFAULT NULL,
	"role" TEXT DEFAULT NULL,
	"description" TEXT DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"master" bool DEFAULT false,
	"remaining" bigint DEFAULT NULL,
	"refill_amount" bigint DEFAULT NULL,
	"refill_interval" interval DEFAULT NULL,
	"rate_limit_max" INT DEFAULT NULL,
	"rate_limit_window" interval DEFAULT NULL,
	"enabled" bool DEFAULT true,
	"rate_limit_algorithm" TEXT DEFAULT NULL,
	"roles" TEXT[] DEFAULT NULL,
	"ratelimits" jsonb DEFAULT NULL,
	"refill_day" INT DEFAULT NULL,
	"refill_schedule" TEXT DEFAULT NULL,
	"allowed_cidrs" cidr[] DEFAULT NULL
) RETURNS TABLE (
	"id" TEXT,
	"key" TEXT,
	"start" TEXT,
	"prefix" TEXT,
	"name" TEXT,
	"owner" TEXT,
	"expires_at" timestamp with time zone,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_api_key_wrapper';

CREATE FUNCTION apikeys."update_api_key"(
	"id" TEXT,
	"name" TEXT DEFAULT NULL,
	"owner" TEXT DEFAULT NULL,
	"permissions" jsonb DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"expires_at" timestamp with time zone DEFAULT NULL,
	"role" TEXT DEFAULT NULL,
	"description" TEXT DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"remaining" bigint DEFAULT NULL,
	"refill_amount" bigint DEFAULT NULL,
	"refill_interval" interval DEFAULT NULL,
	"rate_limit_max" INT DEFAULT NULL,
	"rate_limit_window" interval DEFAULT NULL,
	"enabled" bool DEFAULT NULL,
	"clear" TEXT[] DEFAULT NULL,
	"rate_limit_algorithm" TEXT DEFAULT NULL,
	"roles" TEXT[] DEFAULT NULL,
	"ratelimits" jsonb DEFAULT NULL,
	"refill_day" INT DEFAULT NULL,
	"refill_schedule" TEXT DEFAULT NULL,
	"allowed_cidrs" cidr[] DEFAULT NULL
) RETURNS apikeys.api_key
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_api_key_wrapper';

CREATE FUNCTION apikeys."create_identity"(
	"owner" TEXT,
	"metadata" jsonb DEFAULT NULL,
	"remaining" bigint DEFAULT NULL,
	"refill_amount" bigint DEFAULT NULL,
	"refill_interval" interval DEFAULT NULL,
	"refill_day" INT DEFAULT NULL,
	"ratelimits" jsonb DEFAULT NULL,
	"refill_schedule" TEXT DEFAULT NULL,
	"rate_limit_algorithm" TEXT DEFAULT NULL,
	"allowed_cidrs" cidr[] DEFAULT NULL
) RETURNS apikeys.identity
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_identity_wrapper';

CREATE FUNCTION apikeys."update_identity"(
	"owner" TEXT,
	"metadata" jsonb DEFAULT NULL,
	"remaining" bigint DEFAULT NULL,
	"refill_amount" bigint DEFAULT NULL,
	"refill_interval" interval DEFAULT NULL,
	"refill_day" INT DEFAULT NULL,
	"ratelimits" jsonb DEFAULT NULL,
	"refill_schedule" TEXT DEFAULT NULL,
	"rate_limit_algorithm" TEXT DEFAULT NULL,
	"clear" TEXT[] DEFAULT NULL,
	"allowed_cidrs" cidr[] DEFAULT NULL
) RETURNS apikeys.identity
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_identity_wrapper';

CREATE FUNCTION apikeys."verify_key"(
	"key" TEXT,
	"required" jsonb DEFAULT NULL,
	"cost" INT DEFAULT 1,
	"ratelimits" jsonb DEFAULT NULL,
	"client_ip" inet DEFAULT NULL
) RETURNS apikeys.verification
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'verify_key_from_wrapper';

CREATE FUNCTION apikeys."verify_token"(
	"token" TEXT,
	"required" jsonb DEFAULT NULL,
	"cost" INT DEFAULT 1,
	"ratelimits" jsonb DEFAULT NULL,
	"client_ip" inet DEFAULT NULL
) RETURNS apikeys.verification
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'verify_token_from_wrapper';

CREATE FUNCTION apikeys."authenticate"(
	"credential" TEXT,
	"required" jsonb DEFAULT NULL,
	"ratelimits" jsonb DEFAULT NULL,
	"client_ip" inet DEFAULT NULL
) RETURNS apikeys.verification
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'authenticate_from_wrapper';

CREATE FUNCTION apikeys."authenticate_http"(
	"headers" jsonb,
	"required" jsonb DEFAULT NULL
) RETURNS TABLE (
	"role" TEXT,
	"message" TEXT,
	"detail" TEXT
)
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'authenticate_http_wrapper';

CREATE FUNCTION apikeys."verification_stats"(
	"key_id" TEXT DEFAULT NULL,
	"owner" TEXT DEFAULT NULL,
	"since" timestamp with time zone DEFAULT now() - '1 day'::interval,
	"until" timestamp with time zone DEFAULT now(),
	"bucket" interval DEFAULT '1 hour'
) RETURNS TABLE (
	"bucket" timestamp with time zone,
	"key_id" TEXT,
	"owner" TEXT,
	"code" TEXT,
	"count" bigint,
	"cost" bigint
)
STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'verification_stats_wrapper';

CREATE FUNCTION apikeys."my_create_api_key"(
	"name" TEXT DEFAULT NULL,
	"permissions" jsonb DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL
) RETURNS TABLE (
	"id" TEXT,
	"key" TEXT,
	"start" TEXT,
	"prefix" TEXT,
	"name" TEXT,
	"owner" TEXT,
	"expires_at" timestamp with time zone,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'my_create_api_key_wrapper';

CREATE FUNCTION apikeys."my_list_api_keys"() RETURNS SETOF apikeys.api_key
STRICT STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'my_list_api_keys_wrapper';

CREATE FUNCTION apikeys."my_update_api_key"(
	"id" TEXT,
	"name" TEXT DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"enabled" bool DEFAULT NULL
) RETURNS apikeys.api_key
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'my_update_api_key_wrapper';

CREATE FUNCTION apikeys."my_rotate_api_key"(
	"id" TEXT,
	"grace" interval DEFAULT '0'
) RETURNS TABLE (
	"id" TEXT,
	"key" TEXT,
	"start" TEXT,
	"expires_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'my_rotate_api_key_wrapper';

CREATE FUNCTION apikeys."my_revoke_api_key"(
	"id" TEXT
) RETURNS bool
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'my_revoke_api_key_wrapper';

-- For PostgREST's db-pre-request: authenticates the request's x-api-key or
-- Authorization: Bearer credential (and `required` permissions), switches to the key's role for
-- the transaction, and refuses with PostgREST's custom error (SQLSTATE PGRST: HTTP 401, 403 or
-- 429 with WWW-Authenticate or Retry-After) when the request may not go on.
CREATE FUNCTION apikeys.authenticate_request(required jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;  -- no name is resolved before the check below
BEGIN
    -- This body names schema apikeys: it must be the extension's own (see catalog.rs).
    IF pg_catalog.to_regnamespace('apikeys')::pg_catalog.oid IS DISTINCT FROM
       (SELECT e.extnamespace FROM pg_catalog.pg_extension e
         WHERE e.extname OPERATOR(pg_catalog.=) 'pg_apikeys') THEN
        RAISE EXCEPTION 'schema "apikeys" is not the schema of extension pg_apikeys'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT * INTO r FROM apikeys.authenticate_http(
        nullif(current_setting('request.headers', true), '')::jsonb, required);
    IF r.message IS NOT NULL THEN
        RAISE SQLSTATE 'PGRST' USING MESSAGE = r.message, DETAIL = r.detail;
    END IF;
    IF r.role IS NOT NULL THEN
        PERFORM set_config('role', r.role, true);
    END IF;
END
$$;


-- New and replaced functions are not PUBLIC's (the replaced ones get their grants back below).
REVOKE EXECUTE ON FUNCTION apikeys.create_api_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_api_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.create_identity FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_identity FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.verify_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.verify_token FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.authenticate FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.authenticate_request FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.verification_stats FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.authenticate_http FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.my_create_api_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.my_list_api_keys FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.my_update_api_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.my_rotate_api_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.my_revoke_api_key FROM PUBLIC;

DO $carry_grants$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT x.name, x.grantee
               FROM pg_catalog.jsonb_to_recordset(
                        pg_catalog.current_setting('pg_apikeys_upgrade.grants')::pg_catalog.jsonb)
                    AS x(name text, grantee pg_catalog.int8) LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION apikeys.%I TO %s', g.name,
            CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                 ELSE g.grantee::pg_catalog.oid::pg_catalog.regrole::pg_catalog.text END);
    END LOOP;
END
$carry_grants$;

-- What anyone may call (granted after the revokes above, as a fresh install orders the ACL):
-- authenticate_http is the layer under authenticate_request; the my_*
-- functions check the authenticated key themselves.
GRANT EXECUTE ON FUNCTION apikeys.authenticate_http(jsonb, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_create_api_key(text, jsonb, interval, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_list_api_keys() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_update_api_key(text, text, jsonb, boolean) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_rotate_api_key(text, interval) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_revoke_api_key(text) TO PUBLIC;
