-- pg_apikeys 0.2.0 -> 0.3.0: the request context for row-level security and PostgREST.
\echo Use "ALTER EXTENSION pg_apikeys UPDATE TO '0.3.0'" to load this file. \quit

CREATE FUNCTION apikeys."authenticate"("credential" TEXT, "required" jsonb DEFAULT NULL)
RETURNS apikeys.verification
VOLATILE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'authenticate_wrapper';

CREATE FUNCTION apikeys."authenticate_headers"("headers" jsonb) RETURNS apikeys.verification
VOLATILE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'authenticate_headers_wrapper';

-- For PostgREST's db-pre-request: authenticates the request's x-api-key or
-- Authorization: Bearer credential, switches to the key's role for the transaction, and
-- raises SQLSTATE PT401 (HTTP 401) when the request carries no valid credential.
CREATE FUNCTION apikeys.authenticate_request() RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v apikeys.verification := apikeys.authenticate_headers(
        nullif(current_setting('request.headers', true), '')::jsonb);
BEGIN
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

CREATE FUNCTION apikeys."current_key_id"() RETURNS TEXT
STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'current_key_id_wrapper';

CREATE FUNCTION apikeys."current_owner"() RETURNS TEXT
STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'current_owner_wrapper';

CREATE FUNCTION apikeys."current_permissions"() RETURNS jsonb
STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'current_permissions_wrapper';

CREATE FUNCTION apikeys."current_claims"() RETURNS jsonb
STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'current_claims_wrapper';

CREATE FUNCTION apikeys."has_permission"("resource" TEXT, "action" TEXT) RETURNS bool
STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'has_permission_wrapper';

CREATE FUNCTION apikeys."reset"() RETURNS void
STRICT VOLATILE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'reset_wrapper';

-- Functions are created executable by PUBLIC: match a fresh install, where the privileges block
-- revokes everything and grants the context functions back.
REVOKE EXECUTE ON FUNCTION apikeys.authenticate(text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.authenticate_headers(jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.authenticate_request() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.current_key_id() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.current_owner() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.current_permissions() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.current_claims() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.has_permission(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.reset() FROM PUBLIC;
-- The request context: authenticating needs a valid credential, reading it needs nothing.
GRANT EXECUTE ON FUNCTION apikeys.authenticate(text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.authenticate_headers(jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.authenticate_request() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_key_id() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_owner() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_permissions() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_claims() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.has_permission(text, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.reset() TO PUBLIC;
