//! The data model. Tables are owned by the extension, registered with pg_extension_config_dump so
//! pg_dump keeps their rows, and closed to PUBLIC: all access goes through the functions.

use pgrx::prelude::*;

extension_sql!(
    r#"
-- One row per API key. The key string itself is never stored: only its SHA-256.
CREATE TABLE apikeys.keys (
    id                   text PRIMARY KEY,
    hash                 bytea NOT NULL UNIQUE,
    -- after rotate_api_key(id, grace): the old key's hash, accepted until previous_valid_until
    previous_hash        bytea UNIQUE,
    previous_valid_until timestamptz,
    prefix               text NOT NULL,
    start                text NOT NULL,           -- prefix and first body characters, for display
    name                 text,
    owner                text,                    -- the principal the key acts for
    description          text,
    permissions          jsonb NOT NULL DEFAULT '{}',
    metadata             jsonb,
    role                 text,                    -- database role carried into tokens
    master               boolean NOT NULL DEFAULT false,
    enabled              boolean NOT NULL DEFAULT true,
    expires_at           timestamptz,             -- NULL: never
    revoked_at           timestamptz,             -- set once, permanent
    remaining            bigint CHECK (remaining >= 0),          -- NULL: unlimited
    refill_amount        bigint CHECK (refill_amount >= 0),
    refill_interval      interval,
    last_refill_at       timestamptz,
    rate_limit_max       integer CHECK (rate_limit_max > 0),
    rate_limit_window    interval,
    rate_window_start    timestamptz,             -- the current fixed window ...
    rate_window_count    bigint NOT NULL DEFAULT 0, -- ... and what it has used
    request_count        bigint NOT NULL DEFAULT 0,
    last_used_at         timestamptz,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by           text NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_by           text NOT NULL,
    CHECK ((refill_amount IS NULL) = (refill_interval IS NULL)),
    CHECK ((rate_limit_max IS NULL) = (rate_limit_window IS NULL))
);
CREATE INDEX keys_owner_idx ON apikeys.keys (owner);
CREATE INDEX keys_expires_at_idx ON apikeys.keys (expires_at) WHERE expires_at IS NOT NULL;

-- Every management action, with the database role that performed it.
CREATE TABLE apikeys.audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor   text NOT NULL,   -- the calling role (after SET ROLE), not the functions' owner
    action  text NOT NULL,   -- create, update, revoke, delete, rotate, delete_expired,
                             -- rotate_signing_key, retire_signing_key, export_signing_key
    key_id  text,
    details jsonb
);
CREATE INDEX audit_log_key_id_idx ON apikeys.audit_log (key_id);

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

SELECT pg_catalog.pg_extension_config_dump('apikeys.keys', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.signing_keys', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.audit_log_id_seq', '');

-- What callers see of a key: never the hash.
CREATE TYPE apikeys.api_key AS (
    id text, name text, owner text, prefix text, start text, description text,
    permissions jsonb, metadata jsonb, role text, master boolean, enabled boolean,
    expires_at timestamptz, revoked_at timestamptz,
    remaining bigint, refill_amount bigint, refill_interval interval, last_refill_at timestamptz,
    rate_limit_max integer, rate_limit_window interval,
    request_count bigint, last_used_at timestamptz,
    created_at timestamptz, created_by text, updated_at timestamptz, updated_by text
);

-- The result of every verification.
CREATE TYPE apikeys.verification AS (
    valid boolean, code text, key_id text, owner text, name text, role text,
    permissions jsonb, metadata jsonb, expires_at timestamptz,
    remaining bigint, rate_limit_remaining bigint, rate_limit_reset timestamptz,
    claims jsonb
);
"#,
    name = "data_model",
    bootstrap
);

extension_sql!(
    r#"
-- Management is for roles a DBA grants it to; verification is for everyone.
REVOKE ALL ON ALL TABLES IN SCHEMA apikeys FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA apikeys FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA apikeys FROM PUBLIC;
GRANT USAGE ON SCHEMA apikeys TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.verify_key(text, jsonb, integer) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.verify_token(text, jsonb, integer) TO PUBLIC;
-- Minting needs a valid API key, which is its own authorization.
GRANT EXECUTE ON FUNCTION apikeys.mint_token(text, bigint, text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.jwks() TO PUBLIC;
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
"#,
    name = "privileges",
    finalize
);

/// Columns of `apikeys.api_key`, in order, as expressions over `apikeys.keys`.
pub const API_KEY_ROW: &str =
    "ROW(id, name, owner, prefix, start, description, permissions, metadata, \
     role, master, enabled, expires_at, revoked_at, remaining, refill_amount, refill_interval, \
     last_refill_at, rate_limit_max, rate_limit_window, request_count, last_used_at, created_at, \
     created_by, updated_at, updated_by)::apikeys.api_key";
