-- pg_apikeys 0.4.0 -> 0.5.0 (security release)

-- An installation that adopted a schema apikeys somebody else made is not upgraded: that owner
-- could rename the schema and put its own objects under the name the extension's code uses.
DO $refuse_foreign_schema$
DECLARE
    found record;
BEGIN
    SELECT n.nspowner::pg_catalog.regrole AS owner,
           n.nspowner OPERATOR(pg_catalog.=) e.extowner AS ours,
           EXISTS (SELECT FROM pg_catalog.aclexplode(n.nspacl) a
                    WHERE a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
                      AND a.grantee OPERATOR(pg_catalog.<>) n.nspowner) AS shared
      INTO STRICT found
      FROM pg_catalog.pg_namespace n, pg_catalog.pg_extension e
     WHERE n.nspname OPERATOR(pg_catalog.=) 'apikeys'
       AND e.extname OPERATOR(pg_catalog.=) 'pg_apikeys';
    IF NOT found.ours OR found.shared THEN
        RAISE EXCEPTION 'schema "apikeys" belongs to role %, not to the extension''s owner, or others may create objects in it', found.owner
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Check what the schema holds, make the extension''s owner its owner and revoke CREATE on it from other roles, then update again.';
    END IF;
END
$refuse_foreign_schema$;

-- Minting and token verification read only unretired signing keys, through this index.
CREATE INDEX signing_keys_live_idx ON apikeys.signing_keys (created_at) WHERE retired_at IS NULL;

-- Deletes signing keys retired longer ago than retired_before (admin, audited).
CREATE FUNCTION apikeys.purge_signing_keys(
	"retired_before" interval DEFAULT '30 days'
) RETURNS INT
VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'purge_signing_keys_wrapper';
REVOKE EXECUTE ON FUNCTION apikeys.purge_signing_keys(interval) FROM PUBLIC;

-- authenticate_request checks that schema apikeys is the extension's before it names it.
CREATE OR REPLACE FUNCTION apikeys.authenticate_request() RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record;  -- not apikeys.verification: no name is resolved before the check below
BEGIN
    -- This body names schema apikeys: it must be the extension's own (see catalog.rs).
    IF pg_catalog.to_regnamespace('apikeys')::pg_catalog.oid IS DISTINCT FROM
       (SELECT e.extnamespace FROM pg_catalog.pg_extension e
         WHERE e.extname OPERATOR(pg_catalog.=) 'pg_apikeys') THEN
        RAISE EXCEPTION 'schema "apikeys" is not the schema of extension pg_apikeys'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    v := apikeys.authenticate_headers(
        nullif(current_setting('request.headers', true), '')::jsonb);
    IF NOT v.valid THEN
        RAISE SQLSTATE 'PT401' USING
            MESSAGE = 'authentication failed: ' || v.code,
            HINT = 'Send an API key as "x-api-key: <key>" or a key or token as "Authorization: Bearer <credential>".';
    END IF;
    IF v.role IS NOT NULL THEN
        PERFORM set_config('role', v.role, true);
    END IF;
END
$$;
