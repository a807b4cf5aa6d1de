//! The data model. Tables are owned by the extension, registered with pg_extension_config_dump so
//! pg_dump keeps their rows, and closed to PUBLIC: all access goes through the functions.

use pgrx::prelude::*;

extension_sql!(
    r#"
-- The schema must be the one CREATE EXTENSION just created for us, or one that only the role
-- installing the extension owns and can create objects in: a role that made `apikeys` earlier
-- could rename it later and put its own objects under the name our code uses.
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
        RAISE EXCEPTION 'schema "apikeys" already exists and belongs to role %, or others may create objects in it', found.owner
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'pg_apikeys installs only into a schema apikeys that it creates itself: drop or rename the existing one (after checking what it holds), then run CREATE EXTENSION again.';
    END IF;
    -- Keys, ids, names and permissions are text the extension reads as UTF-8.
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'pg_apikeys needs a UTF8 database; this one is %', pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create the database with ENCODING ''UTF8'' (for example from template0).';
    END IF;
END
$refuse_foreign_schema$;

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
    refill_day           integer CHECK (refill_day BETWEEN 1 AND 31),  -- monthly at 00:00 UTC
    refill_schedule      text NOT NULL DEFAULT 'interval' CHECK (refill_schedule IN ('interval', 'calendar')),
    last_refill_at       timestamptz,
    rate_limit_max       integer CHECK (rate_limit_max > 0),
    rate_limit_window    interval,
    rate_limit_algorithm text NOT NULL DEFAULT 'sliding' CHECK (rate_limit_algorithm IN ('sliding', 'fixed')),
    -- bumped by every management change of the quota or its refill; remaining (last_refill_at)
    -- above is what management set at remaining_version (refill_version): apikeys.meters' own
    -- counts apply from the version they were written at, if not older than that
    meter_version        bigint NOT NULL DEFAULT 1,
    remaining_version    bigint NOT NULL DEFAULT 1,
    refill_version       bigint NOT NULL DEFAULT 1,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by           text NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_by           text NOT NULL,
    roles                text[] NOT NULL DEFAULT '{}',  -- apikeys.roles whose permissions the key has too
    -- permissions ∪ the roles' permissions, kept current by every change of either (NULL: the
    -- key has no roles, permissions alone): what verification reads, in the same row probe
    effective_permissions jsonb,
    -- credits added (or taken) by update_credits since remaining was last set: the quota left
    -- is what was counted plus the credits added since (apikeys.meters.credits)
    credits              bigint NOT NULL DEFAULT 0,
    -- named rate limits (SPEC §7): [{"name", "limit", "duration", "auto_apply"}], NULL: none
    ratelimits           jsonb,
    -- apikeys.identities.id of the identity owner names (NULL: none), kept by management
    identity_id          bigint,
    -- the networks callers may verify the key from (SPEC §8), NULL: anywhere
    allowed_cidrs        cidr[],
    CHECK ((refill_amount IS NULL) = (refill_interval IS NULL AND refill_day IS NULL)),
    CHECK ((rate_limit_max IS NULL) = (rate_limit_window IS NULL))
);
CREATE INDEX keys_owner_idx ON apikeys.keys (owner);
CREATE INDEX keys_expires_at_idx ON apikeys.keys (expires_at) WHERE expires_at IS NOT NULL;
-- The keys a role change reaches.
CREATE INDEX keys_roles_idx ON apikeys.keys USING gin (roles);

-- A tenant, user or team whose keys (keys.owner = identities.owner) share its quota, its named
-- rate limits and its metadata (SPEC §7). id is the metering engine's handle for it.
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
    -- the networks its keys may be verified from, besides each key's own list (NULL: anywhere)
    allowed_cidrs        cidr[],
    CHECK ((refill_amount IS NULL) = (refill_interval IS NULL AND refill_day IS NULL))
);
CREATE INDEX keys_identity_id_idx ON apikeys.keys (identity_id) WHERE identity_id IS NOT NULL;

-- What use changed of an identity's quota: written by the metering engine's writer.
CREATE TABLE apikeys.identity_meters (
    identity_id         bigint PRIMARY KEY,
    identity_created_at timestamptz NOT NULL,
    meter_version       bigint NOT NULL,
    remaining           bigint,
    last_refill_at      timestamptz,
    credits             bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

-- Named sets of permissions (SPEC §7): a key with roles has its own permissions and theirs.
CREATE TABLE apikeys.roles (
    name        text PRIMARY KEY,
    permissions jsonb NOT NULL DEFAULT '{}',
    description text,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- What use changes, apart from the keys the lookups read on every call: written by the metering
-- engine's writer in batches (or, without shared_preload_libraries, by each verification).
-- remaining and last_refill_at count while meter_version is the key's; the window and the
-- usage counts belong to the key created at key_created_at.
CREATE TABLE apikeys.meters (
    key_id          text PRIMARY KEY,
    key_created_at  timestamptz NOT NULL,
    meter_version   bigint NOT NULL,          -- 0: no quota counted yet
    remaining       bigint,
    last_refill_at  timestamptz,
    window_start    timestamptz,              -- the fixed window's start, or the sliding bucket's
    window_count    bigint NOT NULL DEFAULT 0,
    window_previous bigint NOT NULL DEFAULT 0, -- the previous sliding bucket's count
    request_count   bigint NOT NULL DEFAULT 0,
    last_used_at    timestamptz,
    credits         bigint NOT NULL DEFAULT 0  -- keys.credits that remaining includes
) WITH (fillfactor = 50);  -- room on each page for HOT updates: the writer updates every row often

-- Limits that replace what apikeys.ratelimit callers give, per identifier (SPEC §7).
CREATE TABLE apikeys.ratelimit_overrides (
    namespace  text NOT NULL,
    identifier text NOT NULL,
    "limit"    integer NOT NULL CHECK ("limit" > 0),
    duration   interval NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (namespace, identifier)
);

-- Verifications counted per minute, hour and day (SPEC §8): every code, by key and owner, with
-- the cost spent. Written by the metering engine's writer from counts kept in shared memory
-- (never a row per call); NOT_FOUND attempts have key_id ''. owner is the key's when written.
-- Hour and day rows include the minutes before verification_rollup.through.
CREATE TABLE apikeys.verification_counts (
    granularity text NOT NULL CHECK (granularity IN ('minute', 'hour', 'day')),
    bucket      timestamptz NOT NULL,     -- the minute's, hour's or day's start (UTC)
    key_id      text COLLATE pg_catalog."C" NOT NULL,  -- '' for NOT_FOUND (C: compared bytewise, fast)
    owner       text COLLATE pg_catalog."C",
    code        text COLLATE pg_catalog."C" NOT NULL,
    count       bigint NOT NULL,
    cost        bigint NOT NULL
) WITH (fillfactor = 50);  -- hour and day rows are updated in place: room for HOT updates
CREATE UNIQUE INDEX verification_counts_bucket_idx ON apikeys.verification_counts
    (granularity, bucket, key_id, code, (COALESCE(owner, '')), (owner IS NULL));

-- Tallies as the writer takes them from shared memory every few seconds, one row per minute
-- they count in (arrays: one row per write, however many keys), until that minute is over and
-- they are added to verification_counts (compacted): a key used a few times a minute costs one
-- row there per minute, not one per write. verification_stats reads both.
CREATE TABLE apikeys.verification_batches (
    minute     timestamptz NOT NULL,
    key_ids    text[] NOT NULL,           -- '' for NOT_FOUND
    created    timestamptz[] NOT NULL,    -- each key's created_at (NULL for NOT_FOUND)
    codes      text[] NOT NULL,
    counts     bigint[] NOT NULL,
    costs      bigint[] NOT NULL
) WITH (vacuum_truncate = false);  -- emptied every minute: no AccessExclusive truncation
CREATE INDEX verification_batches_minute_idx ON apikeys.verification_batches (minute);
-- How far the minute counts are included in the hour and day counts (one row; none: not at all).
-- The writer adds the minutes since to their hours and days every ten minutes, a write per key
-- and hour rather than one per key and minute; verification_stats adds the minutes from here on.
CREATE TABLE apikeys.verification_rollup (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    through timestamptz NOT NULL
);
-- Short-lived (a minute or two): stored out of line uncompressed, compressing them cost more
-- than writing them.
ALTER TABLE apikeys.verification_batches ALTER COLUMN key_ids SET STORAGE EXTERNAL,
    ALTER COLUMN created SET STORAGE EXTERNAL, ALTER COLUMN codes SET STORAGE EXTERNAL,
    ALTER COLUMN counts SET STORAGE EXTERNAL, ALTER COLUMN costs SET STORAGE EXTERNAL;

-- Every management action, with the database role that performed it.
CREATE TABLE apikeys.audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor   text NOT NULL,   -- the calling role (after SET ROLE), not the functions' owner
    action  text NOT NULL,   -- create, update, revoke, delete, rotate, delete_expired,
                             -- rotate_signing_key, retire_signing_key, export_signing_key,
                             -- purge_signing_keys
    key_id  text,
    details jsonb,
    acting_key_id text  -- self-service (my_* functions): the authenticated key that acted
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
-- The keys minting and token verification read: retired ones, however many, stay off that path.
CREATE INDEX signing_keys_live_idx ON apikeys.signing_keys (created_at) WHERE retired_at IS NULL;

SELECT pg_catalog.pg_extension_config_dump('apikeys.keys', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.meters', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.roles', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.ratelimit_overrides', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.identities', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.identities_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.identity_meters', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.signing_keys', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.verification_counts', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.verification_batches', '');
SELECT pg_catalog.pg_extension_config_dump('apikeys.verification_rollup', '');
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
    created_at timestamptz, created_by text, updated_at timestamptz, updated_by text,
    rate_limit_algorithm text, roles text[], ratelimits jsonb,
    refill_day integer, refill_schedule text, next_refill_at timestamptz,
    allowed_cidrs cidr[]
);

-- What callers see of an identity.
CREATE TYPE apikeys.identity AS (
    owner text, metadata jsonb, remaining bigint, refill_amount bigint, refill_interval interval,
    refill_day integer, refill_schedule text, last_refill_at timestamptz, next_refill_at timestamptz,
    ratelimits jsonb, rate_limit_algorithm text, created_at timestamptz, created_by text,
    updated_at timestamptz, updated_by text, allowed_cidrs cidr[]
);

-- The result of every verification.
CREATE TYPE apikeys.verification AS (
    valid boolean, code text, key_id text, owner text, name text, role text,
    permissions jsonb, metadata jsonb, expires_at timestamptz,
    remaining bigint, rate_limit_remaining bigint, rate_limit_reset timestamptz,
    claims jsonb,
    -- one object per rate limit applied: name, level, limit, remaining, reset_at, exceeded
    ratelimits jsonb,
    limited_by text,           -- key or identity: which level refused (USAGE_EXCEEDED, RATE_LIMITED)
    identity_remaining bigint, -- the quota left of the key's identity
    next_refill_at timestamptz -- when the key's quota refills next
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
GRANT EXECUTE ON FUNCTION apikeys.verify_key(text, jsonb, integer, jsonb, inet) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.verify_token(text, jsonb, integer, jsonb, inet) TO PUBLIC;
-- Minting needs a valid API key, which is its own authorization.
GRANT EXECUTE ON FUNCTION apikeys.mint_token(text, bigint, text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.jwks() TO PUBLIC;
-- The request context: authenticating needs a valid credential, reading it needs nothing.
GRANT EXECUTE ON FUNCTION apikeys.authenticate(text, jsonb, jsonb, inet) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.authenticate_headers(jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.authenticate_http(jsonb, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.authenticate_request(jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_key_id() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_owner() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_permissions() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.current_claims() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.has_permission(text, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.reset() TO PUBLIC;
-- Self-service: each function checks the authenticated key's apikeys: manage and owner.
GRANT EXECUTE ON FUNCTION apikeys.my_create_api_key(text, jsonb, interval, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_list_api_keys() TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_update_api_key(text, text, jsonb, boolean) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_rotate_api_key(text, interval) TO PUBLIC;
GRANT EXECUTE ON FUNCTION apikeys.my_revoke_api_key(text) TO PUBLIC;
"#,
    name = "privileges",
    finalize
);

/// The quota left as the rows hold it, over `API_KEY_FROM` (`k`, `m`): what use counted
/// (`apikeys.meters`, while written at or after the version management last set `remaining`
/// at, else the key's own) plus the credits added since, in numeric (no overflow) and clamped to
/// 0..=i64::MAX; NULL (unlimited) stays NULL (GREATEST would turn it into 0: hence the CASEs).
#[macro_export]
macro_rules! remaining_sql {
    () => {
        "(CASE WHEN m.meter_version >= k.remaining_version \
              THEN CASE WHEN m.remaining IS NOT NULL \
                   THEN LEAST(GREATEST(m.remaining::numeric + k.credits - m.credits, 0), \
                              9223372036854775807)::bigint END \
              ELSE CASE WHEN k.remaining IS NOT NULL \
                   THEN LEAST(GREATEST(k.remaining::numeric + k.credits, 0), \
                              9223372036854775807)::bigint END END)"
    };
}

/// Columns of `apikeys.api_key`, in order, as expressions over `API_KEY_FROM`: a key's row
/// with what use has changed (as of the metering engine's last write; `keys::live` adds what
/// shared memory holds beyond it).
pub const API_KEY_ROW: &str = concat!(
    "ROW(k.id, k.name, k.owner, k.prefix, k.start, k.description, k.permissions, k.metadata, \
     k.role, k.master, k.enabled, k.expires_at, k.revoked_at, ",
    remaining_sql!(),
    ", k.refill_amount, k.refill_interval, \
     CASE WHEN m.meter_version >= k.refill_version THEN m.last_refill_at ELSE k.last_refill_at END, \
     k.rate_limit_max, k.rate_limit_window, COALESCE(m.request_count, 0), m.last_used_at, \
     k.created_at, k.created_by, k.updated_at, k.updated_by, k.rate_limit_algorithm, \
     k.roles, k.ratelimits, k.refill_day, k.refill_schedule, NULL::timestamptz, \
     k.allowed_cidrs)::apikeys.api_key"
);

/// The rows `API_KEY_ROW` reads.
pub const API_KEY_FROM: &str = "apikeys.keys k LEFT JOIN apikeys.meters m \
     ON m.key_id = k.id AND m.key_created_at = k.created_at";

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    /// The three kinds of caller: any role (PUBLIC), a role granted management exactly as the
    /// README shows, and the extension's owner.
    const ROLES: [&str; 3] = ["matrix_public", "matrix_admin", "owner"];

    /// Every function in schema apikeys: a call that succeeds for whoever may make it, and
    /// whether [PUBLIC, admin, owner] may. Placeholders: {id} {key} {token} {kid}.
    const FUNCTIONS: &[(&str, &str, [bool; 3])] = &[
        ("create_api_key", "SELECT apikeys.create_api_key(name => 'matrix')", [false, true, true]),
        ("get_api_key", "SELECT apikeys.get_api_key('{id}')", [false, true, true]),
        ("list_api_keys", "SELECT count(*) FROM apikeys.list_api_keys()", [false, true, true]),
        ("update_api_key", "SELECT apikeys.update_api_key('{id}', name => 'renamed')", [false, true, true]),
        ("revoke_api_key", "SELECT apikeys.revoke_api_key('{id}')", [false, true, true]),
        ("delete_api_key", "SELECT apikeys.delete_api_key('{id}')", [false, true, true]),
        ("rotate_api_key", "SELECT apikeys.rotate_api_key('{id}')", [false, true, true]),
        ("delete_expired_api_keys", "SELECT apikeys.delete_expired_api_keys()", [false, true, true]),
        ("rotate_signing_key", "SELECT apikeys.rotate_signing_key()", [false, true, true]),
        ("retire_signing_key", "SELECT apikeys.retire_signing_key('{kid}')", [false, true, true]),
        ("export_signing_key", "SELECT apikeys.export_signing_key('{kid}')", [false, true, true]),
        ("list_signing_keys", "SELECT count(*) FROM apikeys.list_signing_keys()", [false, true, true]),
        ("purge_signing_keys", "SELECT apikeys.purge_signing_keys()", [false, true, true]),
        ("create_role", "SELECT apikeys.create_role('matrix_' || md5(random()::text))", [false, true, true]),
        ("update_role", "SELECT apikeys.update_role('matrix_role', description => 'x')", [false, true, true]),
        ("delete_role", "SELECT apikeys.delete_role(c.name) FROM apikeys.create_role('matrix_' || md5(random()::text)) c", [false, true, true]),
        ("list_roles", "SELECT count(*) FROM apikeys.list_roles()", [false, true, true]),
        ("update_credits", "SELECT apikeys.update_credits('{id}', 'set', 5)", [false, true, true]),
        ("ratelimit", "SELECT apikeys.ratelimit('matrix', '{id}', 5, '1 minute')", [false, true, true]),
        ("set_ratelimit_override", "SELECT apikeys.set_ratelimit_override('matrix', '{id}', 5, '1 minute')", [false, true, true]),
        ("delete_ratelimit_override", "SELECT apikeys.delete_ratelimit_override('matrix', '{id}')", [false, true, true]),
        ("create_identity", "SELECT apikeys.create_identity('{id}', remaining => 5)", [false, true, true]),
        ("get_identity", "SELECT apikeys.get_identity('matrix_identity')", [false, true, true]),
        ("list_identities", "SELECT count(*) FROM apikeys.list_identities()", [false, true, true]),
        ("update_identity", "SELECT apikeys.update_identity('matrix_identity', metadata => '{}')", [false, true, true]),
        ("delete_identity", "SELECT apikeys.delete_identity(c.owner) FROM apikeys.create_identity('matrix_' || md5(random()::text)) c", [false, true, true]),
        ("update_identity_credits", "SELECT apikeys.update_identity_credits('matrix_identity', 'set', 5)", [false, true, true]),
        // A trigger function: only the table's writes (the owner's) run it.
        ("identities_changed", "UPDATE apikeys.identities SET metadata = metadata WHERE false", [false, false, true]),
        ("verify_key", "SELECT apikeys.verify_key('{key}')", [true, true, true]),
        ("verify_token", "SELECT apikeys.verify_token('{token}')", [true, true, true]),
        ("mint_token", "SELECT apikeys.mint_token('{key}', 1000)", [true, true, true]),
        ("jwks", "SELECT apikeys.jwks()", [true, true, true]),
        ("authenticate", "SELECT apikeys.authenticate('{key}')", [true, true, true]),
        ("authenticate_headers", "SELECT apikeys.authenticate_headers('{\"x-api-key\": \"{key}\"}')", [true, true, true]),
        ("authenticate_request", "SELECT apikeys.authenticate_request() FROM (SELECT set_config('request.headers', '{\"x-api-key\": \"{key}\"}', true)) s", [true, true, true]),
        ("authenticate_http", "SELECT apikeys.authenticate_http('{\"x-api-key\": \"{key}\"}')", [true, true, true]),
        ("verification_stats", "SELECT count(*) FROM apikeys.verification_stats()", [false, true, true]),
        // Self-service: PUBLIC, and only for an authenticated key granting apikeys: manage.
        ("my_create_api_key", "SELECT apikeys.authenticate('{key}'); SELECT apikeys.my_create_api_key('mine')", [true, true, true]),
        ("my_list_api_keys", "SELECT apikeys.authenticate('{key}'); SELECT count(*) FROM apikeys.my_list_api_keys()", [true, true, true]),
        ("my_update_api_key", "SELECT apikeys.authenticate('{key}'); SELECT apikeys.my_update_api_key('{id}', name => 'mine')", [true, true, true]),
        ("my_rotate_api_key", "SELECT apikeys.authenticate('{key}'); SELECT apikeys.my_rotate_api_key('{id}', '1 minute')", [true, true, true]),
        ("my_revoke_api_key", "SELECT apikeys.authenticate('{key}'); SELECT apikeys.my_revoke_api_key('{id}')", [true, true, true]),
        ("current_key_id", "SELECT apikeys.current_key_id()", [true, true, true]),
        ("current_owner", "SELECT apikeys.current_owner()", [true, true, true]),
        ("current_permissions", "SELECT apikeys.current_permissions()", [true, true, true]),
        ("current_claims", "SELECT apikeys.current_claims()", [true, true, true]),
        ("has_permission", "SELECT apikeys.has_permission('orders', 'read')", [true, true, true]),
        ("reset", "SELECT apikeys.reset()", [true, true, true]),
    ];

    /// Table privileges: only the owner has any. TRUNCATE is checked through the catalog only
    /// (for the owner it would empty the table); every other one is also attempted.
    const TABLE_PRIVILEGES: &[(&str, &str)] = &[
        ("SELECT", "SELECT count(*) FROM apikeys.{t}"),
        (
            "INSERT",
            "INSERT INTO apikeys.{t} SELECT (NULL::apikeys.{t}).* WHERE false",
        ),
        ("UPDATE", "UPDATE apikeys.{t} SET {c} = {c} WHERE false"),
        ("DELETE", "DELETE FROM apikeys.{t} WHERE false"),
        ("TRUNCATE", "TRUNCATE apikeys.{t}"),
        ("REFERENCES", ""),
        ("TRIGGER", ""),
    ];

    fn as_role(role: &str, sql: &str) -> Option<String> {
        if role != "owner" {
            run(&format!("SET LOCAL ROLE {role}"));
        }
        let err = error_of(sql);
        run("RESET ROLE");
        err
    }

    /// Asserts that `sql` as `role` succeeds when `allowed` and fails with 42501 when not.
    fn check(role: &str, sql: &str, allowed: bool) {
        match (as_role(role, sql), allowed) {
            (None, true) => {}
            (Some(err), false) if err.starts_with("42501: permission denied") => {}
            (got, _) => panic!("{role}: {sql}: expected allowed = {allowed}, got {got:?}"),
        }
    }

    #[pg_test]
    fn privileges_matrix() {
        run("CREATE ROLE matrix_public");
        run("CREATE ROLE matrix_admin");
        // The README's grant for a key administrator, verbatim.
        run("GRANT EXECUTE ON FUNCTION apikeys.create_api_key, apikeys.get_api_key, apikeys.list_api_keys,
                apikeys.update_api_key, apikeys.revoke_api_key, apikeys.delete_api_key,
                apikeys.rotate_api_key, apikeys.delete_expired_api_keys, apikeys.rotate_signing_key,
                apikeys.retire_signing_key, apikeys.export_signing_key, apikeys.list_signing_keys,
                apikeys.purge_signing_keys, apikeys.create_role, apikeys.update_role,
                apikeys.delete_role, apikeys.list_roles, apikeys.update_credits,
                apikeys.set_ratelimit_override, apikeys.delete_ratelimit_override,
                apikeys.create_identity, apikeys.get_identity, apikeys.list_identities,
                apikeys.update_identity, apikeys.delete_identity, apikeys.update_identity_credits,
                apikeys.verification_stats
                TO matrix_admin");
        run("SELECT apikeys.create_identity('matrix_identity')");
        // What an application that rate-limits by IP is granted.
        run("GRANT EXECUTE ON FUNCTION apikeys.ratelimit TO matrix_admin");
        run("SELECT apikeys.create_role('matrix_role')");
        assert_eq!(
            one::<bool>("SELECT extowner = current_user::regrole FROM pg_extension WHERE extname = 'pg_apikeys'"),
            Some(true)
        );

        // Every function is in the matrix, and nothing else is in the schema.
        let mut listed: Vec<&str> = FUNCTIONS.iter().map(|f| f.0).collect();
        listed.sort_unstable();
        let in_schema = one::<Vec<String>>(
            "SELECT array_agg(proname::text ORDER BY proname) FROM pg_proc WHERE pronamespace = 'apikeys'::regnamespace",
        )
        .unwrap();
        assert_eq!(in_schema, listed);

        for (name, call, allowed) in FUNCTIONS {
            for (role, allowed) in ROLES.iter().zip(allowed) {
                // Fresh material for every call: a key, its token, a signing key.
                let kid = one::<String>("SELECT apikeys.rotate_signing_key()").unwrap();
                let (id, key) = create(
                    "owner => 'matrix_owner', permissions => '{\"orders\": [\"read\"], \"apikeys\": [\"manage\"]}'",
                );
                let token = mint(&key, "60000");
                let sql = call
                    .replace("{id}", &id)
                    .replace("{key}", &key)
                    .replace("{token}", &token)
                    .replace("{kid}", &kid);
                check(role, &sql, *allowed);
                if *role != "owner" {
                    let granted = one::<bool>(&format!(
                        "SELECT has_function_privilege('{role}', p.oid, 'EXECUTE') FROM pg_proc p
                          WHERE pronamespace = 'apikeys'::regnamespace AND proname = '{name}'"
                    ));
                    assert_eq!(granted, Some(*allowed), "{role} {name}");
                }
            }
            // PUBLIC's column is the grant to PUBLIC itself, not just to a role without grants.
            let public = one::<bool>(&format!(
                "SELECT has_function_privilege('public', p.oid, 'EXECUTE') FROM pg_proc p
                  WHERE pronamespace = 'apikeys'::regnamespace AND proname = '{name}'"
            ));
            assert_eq!(public, Some(allowed[0]), "PUBLIC {name}");
        }

        // Tables: no one but the owner reads or writes them, not even a key administrator.
        for (table, column) in [
            ("keys", "id"),
            ("audit_log", "id"),
            ("signing_keys", "kid"),
            ("meters", "key_id"),
            ("roles", "name"),
            ("ratelimit_overrides", "namespace"),
            ("identities", "owner"),
            ("identity_meters", "identity_id"),
            ("verification_counts", "granularity"),
            ("verification_batches", "minute"),
            ("verification_rollup", "through"),
        ] {
            for (privilege, statement) in TABLE_PRIVILEGES {
                for role in ["public", "matrix_public", "matrix_admin"] {
                    let has = one::<bool>(&format!(
                        "SELECT has_table_privilege('{role}', 'apikeys.{table}', '{privilege}')"
                    ));
                    assert_eq!(has, Some(false), "{role} {privilege} {table}");
                    if !statement.is_empty() && role != "public" {
                        check(
                            role,
                            &statement.replace("{t}", table).replace("{c}", column),
                            false,
                        );
                    }
                }
                if !statement.is_empty() && *privilege != "TRUNCATE" {
                    check(
                        "owner",
                        &statement.replace("{t}", table).replace("{c}", column),
                        true,
                    );
                }
            }
        }
        for role in ["public", "matrix_public", "matrix_admin"] {
            for privilege in ["USAGE", "SELECT", "UPDATE"] {
                for sequence in ["audit_log_id_seq", "identities_id_seq"] {
                    let has = one::<bool>(&format!(
                        "SELECT has_sequence_privilege('{role}', 'apikeys.{sequence}', '{privilege}')"
                    ));
                    assert_eq!(has, Some(false), "{role} {privilege} {sequence}");
                }
            }
            // Everyone may use the schema and its types; no one but the owner may add to it.
            let usage = one::<bool>(&format!(
                "SELECT has_schema_privilege('{role}', 'apikeys', 'USAGE')
                    AND has_type_privilege('{role}', 'apikeys.verification', 'USAGE')
                    AND has_type_privilege('{role}', 'apikeys.api_key', 'USAGE')
                    AND has_type_privilege('{role}', 'apikeys.identity', 'USAGE')
                    AND NOT has_schema_privilege('{role}', 'apikeys', 'CREATE')"
            ));
            assert_eq!(usage, Some(true), "{role} schema");
        }
        for role in ["matrix_public", "matrix_admin"] {
            check(role, "SELECT nextval('apikeys.audit_log_id_seq')", false);
            check(role, "CREATE TABLE apikeys.intruder ()", false);
            check(
                role,
                "CREATE FUNCTION apikeys.verify_key(text) RETURNS int LANGUAGE sql AS 'SELECT 1'",
                false,
            );
        }
        check(
            "owner",
            "SELECT last_value FROM apikeys.audit_log_id_seq",
            true,
        );
        // What the admin did is audited under its own name.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.audit_log WHERE actor = 'matrix_admin' AND action = 'create' AND acting_key_id IS NULL"),
            Some(1)
        );
    }
}
