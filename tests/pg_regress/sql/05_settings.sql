-- Settings. The apikeys.* namespace is pg_apikeys' own: on PostgreSQL 15 and later a setting it
-- does not define is an error, not a silent placeholder (a typo, or an attempt to forge the
-- request context, which is not a setting at all). PostgreSQL 14 cannot reserve a prefix: there
-- the SET below succeeds and sets a placeholder nothing reads (expected/05_settings_1.out).
SET apikeys.key_id = 'acme-app';
SHOW apikeys.token_cache_size;
