-- Per-minute limits apply per user by default (a user with N keys does not
-- get N times the tier's limit), per key where a tier says so; a rotation's
-- successor shares its predecessor's bucket through the lineage (the first
-- key of the rotation chain), so rotating never resets a limit.
SET LOCAL lock_timeout = '10s';

ALTER TABLE access_tiers
    ADD COLUMN rate_limit_scope text NOT NULL DEFAULT 'user'
        CHECK (rate_limit_scope IN ('user', 'key'));

ALTER TABLE api_keys ADD COLUMN lineage_id uuid;  -- NULL: the key starts its own lineage

WITH RECURSIVE chain AS (
    SELECT id, id AS root FROM api_keys WHERE rotated_from IS NULL
    UNION ALL
    SELECT k.id, c.root FROM api_keys k JOIN chain c ON k.rotated_from = c.id
)
UPDATE api_keys k SET lineage_id = chain.root
FROM chain
WHERE k.id = chain.id AND chain.root <> k.id;

COMMENT ON COLUMN api_keys.lineage_id IS
    'the first key of this key''s rotation chain (NULL: itself); per-key limits are per lineage';
COMMENT ON COLUMN access_tiers.rate_limit_scope IS
    'user: the per-minute limit is shared by all of a user''s keys; key: per key lineage';
