-- pg_apikeys 0.3.0 -> 0.4.0
-- verify_key runs with the caller's rights: it reads keys through their indexes without
-- privileges and switches to the table owner (with a fixed search_path) only to write.
-- The per-call SECURITY DEFINER ... SET search_path save and restore was 5% of a verification.
ALTER FUNCTION apikeys.verify_key(text, jsonb, integer) SECURITY INVOKER RESET search_path;
-- The same for the token functions: signing keys are read without SPI too.
ALTER FUNCTION apikeys.mint_token(text, bigint, text, jsonb) SECURITY INVOKER RESET search_path;
ALTER FUNCTION apikeys.verify_token(text, jsonb, integer) SECURITY INVOKER RESET search_path;
