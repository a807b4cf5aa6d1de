-- pg_apikeys 0.5.0 -> 0.6.0 (metering engine)
--
-- Use of keys moves out of apikeys.keys into apikeys.meters, which only the metering engine's
-- writer (or, without shared_preload_libraries, the verification) writes: request_count,
-- last_used_at, the quota left and the rate-limit window. keys.remaining and last_refill_at stay
-- what management set; meter_version (with remaining_version and refill_version: the version at
-- which management last set each) tells which of the meters row's counts still apply. Rate limits gain a
-- sliding window (the default for new keys); keys that exist keep their fixed window.

CREATE TABLE apikeys.meters (
    key_id          text PRIMARY KEY,
    key_created_at  timestamptz NOT NULL,
    meter_version   bigint NOT NULL,
    remaining       bigint,
    last_refill_at  timestamptz,
    window_start    timestamptz,
    window_count    bigint NOT NULL DEFAULT 0,
    window_previous bigint NOT NULL DEFAULT 0,
    request_count   bigint NOT NULL DEFAULT 0,
    last_used_at    timestamptz
) WITH (fillfactor = 50);  -- room on each page for HOT updates: the writer updates every row often
SELECT pg_catalog.pg_extension_config_dump('apikeys.meters', '');
REVOKE ALL ON apikeys.meters FROM PUBLIC;

ALTER TABLE apikeys.keys
    ADD COLUMN rate_limit_algorithm text NOT NULL DEFAULT 'fixed'
        CHECK (rate_limit_algorithm IN ('sliding', 'fixed')),
    ADD COLUMN meter_version bigint NOT NULL DEFAULT 1,
    ADD COLUMN remaining_version bigint NOT NULL DEFAULT 1,
    ADD COLUMN refill_version bigint NOT NULL DEFAULT 1;
ALTER TABLE apikeys.keys ALTER COLUMN rate_limit_algorithm SET DEFAULT 'sliding';

INSERT INTO apikeys.meters (key_id, key_created_at, meter_version, remaining, last_refill_at,
                            window_start, window_count, request_count, last_used_at)
SELECT id, created_at, meter_version, remaining, last_refill_at,
       rate_window_start, rate_window_count, request_count, last_used_at
  FROM apikeys.keys
 WHERE request_count OPERATOR(pg_catalog.>) 0 OR last_used_at IS NOT NULL
    OR rate_window_start IS NOT NULL OR remaining IS NOT NULL;

ALTER TABLE apikeys.keys
    DROP COLUMN rate_window_start,
    DROP COLUMN rate_window_count,
    DROP COLUMN request_count,
    DROP COLUMN last_used_at;

ALTER TYPE apikeys.api_key ADD ATTRIBUTE rate_limit_algorithm text;

-- create_api_key and update_api_key gain rate_limit_algorithm (last, so positional calls keep
-- working). Replacing them would drop the EXECUTE grants a DBA gave: they are carried over.
-- (Kept in a transaction-local setting: a table made here would become part of the extension.)
SELECT pg_catalog.set_config('pg_apikeys_upgrade.grants', COALESCE(pg_catalog.jsonb_agg(
           pg_catalog.jsonb_build_object('name', p.proname, 'grantee', a.grantee::pg_catalog.int8))::pg_catalog.text, '[]'), true)
  FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
 WHERE p.pronamespace OPERATOR(pg_catalog.=) 'apikeys'::pg_catalog.regnamespace
   AND p.proname OPERATOR(pg_catalog.=) ANY (ARRAY['create_api_key', 'update_api_key']::pg_catalog.name[])
   AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
   AND a.grantee OPERATOR(pg_catalog.<>) p.proowner;

DROP FUNCTION apikeys.create_api_key(text, text, jsonb, interval, timestamptz, text, text, text,
    text, text, jsonb, boolean, bigint, bigint, interval, integer, interval, boolean);
DROP FUNCTION apikeys.update_api_key(text, text, text, jsonb, interval, timestamptz, text, text,
    jsonb, bigint, bigint, interval, integer, interval, boolean, text[]);

CREATE FUNCTION apikeys.create_api_key(
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
	"rate_limit_algorithm" TEXT DEFAULT NULL
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

CREATE FUNCTION apikeys.update_api_key(
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
	"rate_limit_algorithm" TEXT DEFAULT NULL
) RETURNS apikeys.api_key
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_api_key_wrapper';

REVOKE EXECUTE ON FUNCTION apikeys.create_api_key(text, text, jsonb, interval, timestamptz, text,
    text, text, text, text, jsonb, boolean, bigint, bigint, interval, integer, interval, boolean,
    text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_api_key(text, text, text, jsonb, interval, timestamptz,
    text, text, jsonb, bigint, bigint, interval, integer, interval, boolean, text[], text) FROM PUBLIC;

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
