-- pg_apikeys 0.1.0 -> 0.2.0: tokens (mint_token, verify_token) and their signing keys.
\echo Use "ALTER EXTENSION pg_apikeys UPDATE TO '0.2.0'" to load this file. \quit

-- Keys that sign tokens. The newest unretired one signs; every unretired one verifies.
CREATE TABLE apikeys.signing_keys (
    kid        text PRIMARY KEY,         -- the JWT header's "kid"
    algorithm  text NOT NULL CHECK (algorithm IN ('HS256', 'ES256', 'EdDSA')),
    secret     bytea NOT NULL,           -- HMAC key or PKCS#8 private key: never leaves the extension
    public_jwk jsonb,                    -- ES256/EdDSA: the public half, as jwks() publishes it
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by text NOT NULL,
    retired_at timestamptz,              -- set once: its tokens stop verifying
    retired_by text
);
SELECT pg_catalog.pg_extension_config_dump('apikeys.signing_keys', '');

CREATE FUNCTION apikeys."export_signing_key"("kid" TEXT) RETURNS jsonb
VOLATILE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'export_signing_key_wrapper';

CREATE FUNCTION apikeys."jwks"() RETURNS jsonb
STRICT STABLE SECURITY DEFINER PARALLEL SAFE SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'jwks_wrapper';

CREATE FUNCTION apikeys."list_signing_keys"() RETURNS TABLE (
    "kid" TEXT, "algorithm" TEXT, "signs" bool, "created_at" timestamp with time zone,
    "created_by" TEXT, "retired_at" timestamp with time zone, "retired_by" TEXT
)
STRICT STABLE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'list_signing_keys_wrapper';

CREATE FUNCTION apikeys."mint_token"(
    "key" TEXT, "ms" bigint, "for_key" TEXT DEFAULT NULL, "claims" jsonb DEFAULT NULL
) RETURNS TEXT
VOLATILE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'mint_token_wrapper';

CREATE FUNCTION apikeys."retire_signing_key"("kid" TEXT) RETURNS bool
VOLATILE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'retire_signing_key_wrapper';

CREATE FUNCTION apikeys."rotate_signing_key"("algorithm" TEXT DEFAULT 'HS256') RETURNS TEXT
VOLATILE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'rotate_signing_key_wrapper';

CREATE FUNCTION apikeys."verify_token"(
    "token" TEXT, "required" jsonb DEFAULT NULL, "cost" INT DEFAULT 1
) RETURNS apikeys.verification
VOLATILE SECURITY DEFINER SET search_path TO pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'verify_token_wrapper';

-- The same privileges as a fresh install.
REVOKE ALL ON apikeys.signing_keys FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION apikeys.export_signing_key(text), apikeys.jwks(), apikeys.list_signing_keys(),
    apikeys.mint_token(text, bigint, text, jsonb), apikeys.retire_signing_key(text),
    apikeys.rotate_signing_key(text), apikeys.verify_token(text, jsonb, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.verify_token(text, jsonb, integer) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.mint_token(text, bigint, text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.jwks() TO PUBLIC;
