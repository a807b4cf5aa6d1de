-- The README's examples for tokens: mint from a key, verify, rotate signing keys, publish JWKS.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_apikeys;
RESET client_min_messages;
CREATE ROLE orders_reader;

SELECT key AS api_key FROM apikeys.create_api_key(
         id => 'orders-svc', owner => 'acme', role => 'orders_reader',
         permissions => '{"orders": ["read"]}') \gset

-- Mint a token that carries the key's access for 15 minutes (900 000 ms).
SELECT apikeys.mint_token(:'api_key', 900000, claims => '{"request_id": "r-42"}') AS token \gset

-- Anyone can verify it; the result is the key's, plus the token's claims.
SELECT valid, code, key_id, owner, role, permissions,
       claims->>'sub' AS sub, claims->>'request_id' AS request_id,
       (claims->>'exp_ms')::bigint - (claims->>'iat')::bigint * 1000 BETWEEN 900000 AND 901000 AS lasts_15_min,
       (claims->>'exp')::bigint * 1000 <= (claims->>'exp_ms')::bigint AS exp_not_after_exp_ms
  FROM apikeys.verify_token(:'token', required => '{"orders": ["read"]}');

-- A token cannot mint tokens, and it cannot override the reserved claims.
SELECT apikeys.mint_token(:'token', 1000);
SELECT apikeys.mint_token(:'api_key', 1000, claims => '{"sub": "someone-else"}');

-- Only a master key mints for another key.
SELECT key AS master_key FROM apikeys.create_api_key(id => 'gateway', master => true) \gset
SELECT apikeys.mint_token(:'api_key', 1000, for_key => 'gateway');
SELECT code, key_id FROM apikeys.verify_token(apikeys.mint_token(:'master_key', 60000, for_key => 'orders-svc'));

-- Asymmetric signing keys: new tokens are signed with the newest key; older ones still verify.
SELECT apikeys.rotate_signing_key('ES256') AS es256_kid \gset
SELECT apikeys.mint_token(:'api_key', 60000) AS es256_token \gset
SELECT code FROM apikeys.verify_token(:'es256_token');
SELECT code FROM apikeys.verify_token(:'token');

-- The public JWK set for outside verifiers: ES256 and EdDSA keys, never a secret.
SELECT k->>'kty' AS kty, k->>'crv' AS crv, k->>'alg' AS alg, k->>'use' AS use,
       k->>'kid' = :'es256_kid' AS is_new_key, k ? 'd' AS has_private_part
  FROM jsonb_array_elements(apikeys.jwks()->'keys') k;

-- Retiring a signing key stops its tokens at once.
SELECT apikeys.retire_signing_key(:'es256_kid');
SELECT code FROM apikeys.verify_token(:'es256_token');

-- The signing keys, newest first, never with their secrets.
SELECT algorithm, signs, retired_at IS NOT NULL AS retired, created_by FROM apikeys.list_signing_keys();

-- Retired keys are deleted once they have been retired long enough (default '30 days');
-- '0' deletes every retired key now. Their tokens then verify as NOT_FOUND.
SELECT apikeys.purge_signing_keys('0');
SELECT code FROM apikeys.verify_token(:'es256_token');

-- Revoking the key kills every token minted from it.
SELECT apikeys.revoke_api_key('orders-svc');
SELECT code FROM apikeys.verify_token(:'token');

-- Garbage is never an error.
SELECT valid, code FROM apikeys.verify_token('not.a.token');

DROP ROLE orders_reader;
