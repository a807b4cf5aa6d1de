-- pg_apikeys 0.6.0 -> 0.7.0 (identities, named and standalone rate limits, roles, credits)
--
-- New tables: identities (+ identity_meters, written by the metering engine), roles,
-- ratelimit_overrides, all dumped with pg_dump. Keys gain roles (and the effective permissions
-- verification reads), named rate limits, credits, calendar refills and the identity their owner
-- names. create_api_key/update_api_key and the verification functions gain arguments (last, so
-- positional calls keep working); replacing them would drop the EXECUTE grants a DBA gave: they
-- are carried over. verify_key, verify_token and authenticate keep their PUBLIC grant.

ALTER TABLE apikeys.keys
    ADD COLUMN refill_day integer CHECK (refill_day BETWEEN 1 AND 31),
    ADD COLUMN refill_schedule text NOT NULL DEFAULT 'interval' CHECK (refill_schedule IN ('interval', 'calendar')),
    ADD COLUMN roles text[] NOT NULL DEFAULT '{}',
    ADD COLUMN effective_permissions jsonb,
    ADD COLUMN credits bigint NOT NULL DEFAULT 0,
    ADD COLUMN ratelimits jsonb,
    ADD COLUMN identity_id bigint;
-- A refill is monthly on refill_day, or every refill_interval.
ALTER TABLE apikeys.keys DROP CONSTRAINT keys_check;
ALTER TABLE apikeys.keys ADD CONSTRAINT keys_check
    CHECK ((refill_amount IS NULL) = (refill_interval IS NULL AND refill_day IS NULL));
CREATE INDEX keys_roles_idx ON apikeys.keys USING gin (roles);
CREATE INDEX keys_identity_id_idx ON apikeys.keys (identity_id) WHERE identity_id IS NOT NULL;

ALTER TABLE apikeys.meters ADD COLUMN credits bigint NOT NULL DEFAULT 0;

CREATE TABLE apikeys.identities (
    id                   bigserial NOT NULL UNIQUE,
    owner                text PRIMARY KEY,
    metadata             jsonb,
    remaining            bigint CHECK (remaining >= 0),          -- NULL: unlimited
    refill_amount        bigint CHECK (refill_amount >= 0),
    refill_interval      interval,
    refill_day           integer CHECK (refill_day BETWEEN 1 AND 31),
    refill_schedule      text NOT NULL DEFAULT 'interval' CHECK (refill_schedule IN ('interval', 'calendar')),
    last_refill_at       timestamptz,
    ratelimits           jsonb,
    rate_limit_algorithm text NOT NULL DEFAULT 'sliding' CHECK (rate_limit_algorithm IN ('sliding', 'fixed')),
    -- as in apikeys.keys: update_identity_credits since the quota was last set, and the
    -- versions at which management last changed the quota and its refill
    credits              bigint NOT NULL DEFAULT 0,
    meter_version        bigint NOT NULL DEFAULT 1,
    remaining_version    bigint NOT NULL DEFAULT 1,
    refill_version       bigint NOT NULL DEFAULT 1,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by           text NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_by           text NOT NULL,
    CHECK ((refill_amount IS NULL) = (refill_interval IS NULL AND refill_day IS NULL))
);

CREATE TABLE apikeys.identity_meters (
    identity_id         bigint PRIMARY KEY,
    identity_created_at timestamptz NOT NULL,
    meter_version       bigint NOT NULL,
    remaining           bigint,
    last_refill_at      timestamptz,
    credits             bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE TABLE apikeys.roles (
    name        text PRIMARY KEY,
    permissions jsonb NOT NULL DEFAULT '{}',
    description text,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE apikeys.ratelimit_overrides (
    namespace  text NOT NULL,
    identifier text NOT NULL,
    "limit"    integer NOT NULL CHECK ("limit" > 0),
    duration   interval NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (namespace, identifier)
);

SELECT pg_catalog.pg_extension_config_dump('apikeys.roles', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.ratelimit_overrides', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.identities', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.identities_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.identity_meters', '');
REVOKE ALL ON apikeys.identities, apikeys.identity_meters, apikeys.roles,
    apikeys.ratelimit_overrides FROM PUBLIC;
REVOKE ALL ON SEQUENCE apikeys.identities_id_seq FROM PUBLIC;

ALTER TYPE apikeys.api_key
    ADD ATTRIBUTE roles text[], ADD ATTRIBUTE ratelimits jsonb, ADD ATTRIBUTE refill_day integer,
    ADD ATTRIBUTE refill_schedule text, ADD ATTRIBUTE next_refill_at timestamptz;
ALTER TYPE apikeys.verification
    ADD ATTRIBUTE ratelimits jsonb, ADD ATTRIBUTE limited_by text,
    ADD ATTRIBUTE identity_remaining bigint, ADD ATTRIBUTE next_refill_at timestamptz;

CREATE TYPE apikeys.identity AS (
    owner text, metadata jsonb, remaining bigint, refill_amount bigint, refill_interval interval,
    refill_day integer, refill_schedule text, last_refill_at timestamptz, next_refill_at timestamptz,
    ratelimits jsonb, rate_limit_algorithm text, created_at timestamptz, created_by text,
    updated_at timestamptz, updated_by text
);

-- (Kept in a transaction-local setting: a table made here would become part of the extension.)
SELECT pg_catalog.set_config('pg_apikeys_upgrade.grants', COALESCE(pg_catalog.jsonb_agg(
           pg_catalog.jsonb_build_object('name', p.proname, 'grantee', a.grantee::pg_catalog.int8))::pg_catalog.text, '[]'), true)
  FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
 WHERE p.pronamespace OPERATOR(pg_catalog.=) 'apikeys'::pg_catalog.regnamespace
   AND p.proname OPERATOR(pg_catalog.=) ANY (ARRAY['create_api_key', 'update_api_key', 'verify_key', 'verify_token', 'authenticate']::pg_catalog.name[])
   AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
   AND a.grantee OPERATOR(pg_catalog.<>) p.proowner;

DROP FUNCTION apikeys.create_api_key(text, text, jsonb, interval, timestamptz, text, text, text, text, text, jsonb, boolean, bigint, bigint, interval, integer, interval, boolean, text);
DROP FUNCTION apikeys.update_api_key(text, text, text, jsonb, interval, timestamptz, text, text, jsonb, bigint, bigint, interval, integer, interval, boolean, text[], text);
DROP FUNCTION apikeys.verify_key(text, jsonb, integer);
DROP FUNCTION apikeys.verify_token(text, jsonb, integer);
DROP FUNCTION apikeys.authenticate(text, jsonb);

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
	"refill_schedule" TEXT DEFAULT NULL
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
	"refill_schedule" TEXT DEFAULT NULL
) RETURNS apikeys.api_key
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_api_key_wrapper';

CREATE FUNCTION apikeys."verify_key"(
	"key" TEXT,
	"required" jsonb DEFAULT NULL,
	"cost" INT DEFAULT 1,
	"ratelimits" jsonb DEFAULT NULL
) RETURNS apikeys.verification
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'verify_key_with_limits_wrapper';

CREATE FUNCTION apikeys."verify_token"(
	"token" TEXT,
	"required" jsonb DEFAULT NULL,
	"cost" INT DEFAULT 1,
	"ratelimits" jsonb DEFAULT NULL
) RETURNS apikeys.verification
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'verify_token_with_limits_wrapper';

CREATE FUNCTION apikeys."authenticate"(
	"credential" TEXT,
	"required" jsonb DEFAULT NULL,
	"ratelimits" jsonb DEFAULT NULL
) RETURNS apikeys.verification
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'authenticate_with_limits_wrapper';

CREATE FUNCTION apikeys."create_role"(
	"name" TEXT,
	"permissions" jsonb DEFAULT '{}',
	"description" TEXT DEFAULT NULL
) RETURNS apikeys.roles
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_role_wrapper';

CREATE FUNCTION apikeys."update_role"(
	"name" TEXT,
	"permissions" jsonb DEFAULT NULL,
	"description" TEXT DEFAULT NULL
) RETURNS apikeys.roles
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_role_wrapper';

CREATE FUNCTION apikeys."delete_role"(
	"name" TEXT
) RETURNS bool
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'delete_role_wrapper';

CREATE FUNCTION apikeys."list_roles"() RETURNS SETOF apikeys.roles
STRICT STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'list_roles_wrapper';

CREATE FUNCTION apikeys."update_credits"(
	"id" TEXT,
	"operation" TEXT,
	"amount" bigint
) RETURNS bigint
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_credits_wrapper';

CREATE FUNCTION apikeys."ratelimit"(
	"namespace" TEXT,
	"identifier" TEXT,
	"limit" INT,
	"duration" interval,
	"cost" INT DEFAULT 1
) RETURNS TABLE (
	"success" bool,
	"limit" INT,
	"remaining" bigint,
	"reset_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'ratelimit_wrapper';

CREATE FUNCTION apikeys."set_ratelimit_override"(
	"namespace" TEXT,
	"identifier" TEXT,
	"limit" INT,
	"duration" interval
) RETURNS bool
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'set_ratelimit_override_wrapper';

CREATE FUNCTION apikeys."delete_ratelimit_override"(
	"namespace" TEXT,
	"identifier" TEXT
) RETURNS bool
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'delete_ratelimit_override_wrapper';

CREATE FUNCTION apikeys."create_identity"(
	"owner" TEXT,
	"metadata" jsonb DEFAULT NULL,
	"remaining" bigint DEFAULT NULL,
	"refill_amount" bigint DEFAULT NULL,
	"refill_interval" interval DEFAULT NULL,
	"refill_day" INT DEFAULT NULL,
	"ratelimits" jsonb DEFAULT NULL,
	"refill_schedule" TEXT DEFAULT NULL,
	"rate_limit_algorithm" TEXT DEFAULT NULL
) RETURNS apikeys.identity
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_identity_wrapper';

CREATE FUNCTION apikeys."get_identity"(
	"owner" TEXT
) RETURNS apikeys.identity
STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'get_identity_wrapper';

CREATE FUNCTION apikeys."list_identities"() RETURNS SETOF apikeys.identity
STRICT STABLE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'list_identities_wrapper';

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
	"clear" TEXT[] DEFAULT NULL
) RETURNS apikeys.identity
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_identity_wrapper';

CREATE FUNCTION apikeys."delete_identity"(
	"owner" TEXT
) RETURNS bool
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'delete_identity_wrapper';

CREATE FUNCTION apikeys."update_identity_credits"(
	"owner" TEXT,
	"operation" TEXT,
	"amount" bigint
) RETURNS bigint
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_identity_credits_wrapper';

-- Verifications cache identities per backend: every change of the table invalidates them.
CREATE FUNCTION apikeys.identities_changed() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'identities_changed';
CREATE TRIGGER identities_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikeys.identities
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys.identities_changed();
REVOKE EXECUTE ON FUNCTION apikeys.identities_changed FROM PUBLIC;

-- New and replaced functions are not PUBLIC's (the replaced ones get their grants back below).
REVOKE EXECUTE ON FUNCTION apikeys.create_api_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_api_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.verify_key FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.verify_token FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.authenticate FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.create_role FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_role FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.delete_role FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.list_roles FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_credits FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.ratelimit FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.set_ratelimit_override FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.delete_ratelimit_override FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.create_identity FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.get_identity FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.list_identities FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_identity FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.delete_identity FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.update_identity_credits FROM PUBLIC;

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
