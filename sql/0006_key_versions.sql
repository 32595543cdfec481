-- Every change to what the edge decides for a key (revoke, delete, rotate,
-- a tier or status change of its owner) gives the key a new version from one
-- sequence. The shared edge cache stores the version beside each entry and
-- refuses a write carrying an older one, so a refresh computed from a stale
-- read can never overwrite a newer state (metering/redis/lua/identity_cache.lua).
SET LOCAL lock_timeout = '10s';

CREATE SEQUENCE api_key_versions;

ALTER TABLE api_keys ADD COLUMN version bigint;
UPDATE api_keys SET version = nextval('api_key_versions');
ALTER TABLE api_keys
    ALTER COLUMN version SET DEFAULT nextval('api_key_versions'),
    ALTER COLUMN version SET NOT NULL;
ALTER SEQUENCE api_key_versions OWNED BY api_keys.version;
