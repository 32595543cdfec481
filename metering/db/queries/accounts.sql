-- Tiers, users and API keys: the queries of metering.accounts.store.
-- Every change to a key's verdict at the edge sets its version from the
-- api_key_versions sequence (migration 0006); the edge cache compares it.

-- name: list_tiers
-- Every tier, oldest first.
SELECT id, name, daily_quota, rate_limit_per_minute, price_monthly, limits_mode, features,
       rate_limit_scope
FROM access_tiers
ORDER BY id;

-- name: create_tier
-- A new tier ($1 name, $2 daily quota or NULL, $3 per minute, $4 price, $5 limits mode,
-- $6 rate limit scope: user or key).
INSERT INTO access_tiers (name, daily_quota, rate_limit_per_minute, price_monthly, limits_mode,
                          rate_limit_scope)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id, name, daily_quota, rate_limit_per_minute, price_monthly, limits_mode, features,
          rate_limit_scope;

-- name: set_tier_limits_mode
-- enforce or shadow for a whole tier ($1 name, $2 mode).
UPDATE access_tiers SET limits_mode = $2 WHERE name = $1;

-- name: set_tier_detection
-- A tier's detection thresholds ($2 a JSON object; NULL removes them).
UPDATE access_tiers
SET features = CASE WHEN $2::jsonb IS NULL THEN features - 'detection'
                    ELSE jsonb_set(features, '{detection}', $2::jsonb) END
WHERE name = $1;

-- name: tier_id
-- A tier's id by name.
SELECT id FROM access_tiers WHERE name = $1;

-- name: create_user
-- A new user ($1 email, $2 name, $3 tier id); returns the id.
INSERT INTO users (email, name, tier_id) VALUES ($1, $2, $3) RETURNING id;

-- name: user_by_id
SELECT u.id, u.email, u.name, t.name AS tier, u.status, u.created_at
FROM users u JOIN access_tiers t ON t.id = u.tier_id
WHERE u.id = $1;

-- name: user_by_email
-- E-mail addresses compare case-insensitively (users_email_key is on lower(email)).
SELECT u.id, u.email, u.name, t.name AS tier, u.status, u.created_at
FROM users u JOIN access_tiers t ON t.id = u.tier_id
WHERE lower(u.email) = lower($1);

-- name: list_users
SELECT u.id, u.email, u.name, t.name AS tier, u.status, u.created_at
FROM users u JOIN access_tiers t ON t.id = u.tier_id
ORDER BY u.created_at;

-- name: lock_user
-- Serialises changes to one user (tier, status) inside their transaction.
SELECT id FROM users WHERE id = $1 FOR UPDATE;

-- name: set_user_tier
UPDATE users SET tier_id = $2, updated_at = now() WHERE id = $1;

-- name: set_user_status
UPDATE users SET status = $2, updated_at = now() WHERE id = $1;

-- name: bump_user_keys
-- A user-wide change (tier, status) changes every cached identity of theirs:
-- new versions for the keys an edge may hold, returned with their hashes.
UPDATE api_keys SET version = nextval('api_key_versions')
WHERE user_id = $1 AND status IN ('active', 'rotating')
RETURNING key_hash, version;

-- name: insert_key
-- A new key; only its hash is stored.
-- A rotation's successor ($10 = the key it replaces) joins its lineage.
INSERT INTO api_keys (user_id, name, prefix, key_hash, environment, scopes, ip_allowlist,
                      expires_at, limits_mode, rotated_from, lineage_id)
VALUES ($1, $2, $3, $4, $5, $6, $7::cidr[], $8, $9, $10,
        (SELECT coalesce(p.lineage_id, p.id) FROM api_keys p WHERE p.id = $10))
RETURNING id, user_id, name, prefix, environment, scopes, ip_allowlist::text[] AS ip_allowlist,
          status, limits_mode, created_at, last_used_at, expires_at, rotates_at, rotated_from,
          key_hash, quarantine_limit, rotate_by;

-- name: key_by_id
SELECT id, user_id, name, prefix, environment, scopes, ip_allowlist::text[] AS ip_allowlist,
       status, limits_mode, created_at, last_used_at, expires_at, rotates_at, rotated_from,
       key_hash, quarantine_limit, rotate_by
FROM api_keys
WHERE id = $1;

-- name: key_by_prefix
SELECT id, user_id, name, prefix, environment, scopes, ip_allowlist::text[] AS ip_allowlist,
       status, limits_mode, created_at, last_used_at, expires_at, rotates_at, rotated_from,
       key_hash, quarantine_limit, rotate_by
FROM api_keys
WHERE prefix = $1;

-- name: list_keys
-- A user's keys ($1, or everyone's when NULL); deleted ones only when $2.
SELECT id, user_id, name, prefix, environment, scopes, ip_allowlist::text[] AS ip_allowlist,
       status, limits_mode, created_at, last_used_at, expires_at, rotates_at, rotated_from,
       key_hash, quarantine_limit, rotate_by
FROM api_keys
WHERE ($1::uuid IS NULL OR user_id = $1) AND ($2 OR status <> 'deleted')
ORDER BY created_at;

-- name: lock_key
-- The key's status, locked until the transaction ends.
SELECT status FROM api_keys WHERE id = $1 FOR UPDATE;

-- name: mark_rotating
-- The old key of a rotation works until now + $2.
UPDATE api_keys
SET status = 'rotating', rotates_at = now() + $2, version = nextval('api_key_versions')
WHERE id = $1
RETURNING key_hash, version;

-- name: revoke_key
UPDATE api_keys
SET status = 'revoked', revoked_at = now(), revocation_reason = $2,
    version = nextval('api_key_versions')
WHERE id = $1
RETURNING key_hash, version;

-- name: delete_key
-- Soft delete: the row stays for the audit trail and the usage history.
UPDATE api_keys
SET status = 'deleted', deleted_at = now(), version = nextval('api_key_versions')
WHERE id = $1
RETURNING key_hash, version;

-- name: audit_key_event
-- One row of a key's history ($1 key id, $2 action, $3 detail as JSON).
INSERT INTO api_key_events (api_key_id, action, detail) VALUES ($1, $2, $3::jsonb);

-- name: lookup_identity
-- What the edge needs to decide on a request, by key hash (the UNIQUE index).
-- Unusable keys are returned too: their version orders the cache's entries.
-- A forced rotation's deadline is an expiry; a quarantine is a per-minute
-- limit of the key's own, enforced in shadow mode too (least() ignores NULLs).
SELECT k.id, k.user_id, k.prefix, k.status, k.version,
       least(k.expires_at, k.rotate_by) AS expires_at, k.rotate_by, k.rotates_at, k.scopes,
       k.ip_allowlist::text[] AS ip_allowlist,
       coalesce(k.limits_mode, t.limits_mode) AS limits_mode,
       k.quarantine_limit IS NOT NULL AS quarantined,
       u.status AS user_status, t.name AS tier, t.daily_quota,
       least(t.rate_limit_per_minute, k.quarantine_limit) AS rate_limit_per_minute,
       CASE WHEN k.quarantine_limit IS NOT NULL THEN 'quarantine:' || k.id
            WHEN t.rate_limit_scope = 'key' THEN 'key:' || coalesce(k.lineage_id, k.id)
            ELSE 'user:' || k.user_id END AS limit_key
FROM api_keys k
JOIN users u ON u.id = k.user_id
JOIN access_tiers t ON t.id = u.tier_id
WHERE k.key_hash = $1;

-- name: touch_last_used
-- One UPDATE for many keys ($1 ids, $2 times): last_used_at only moves forward.
UPDATE api_keys k SET last_used_at = greatest(coalesce(k.last_used_at, v.ts), v.ts)
FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, ts)
WHERE k.id = v.id;

-- name: quarantine_key
-- The key's per-minute limit drops to $2 (its own bucket, always enforced).
UPDATE api_keys
SET quarantine_limit = $2, quarantined_at = now(), version = nextval('api_key_versions')
WHERE id = $1 AND status IN ('active', 'rotating')
RETURNING key_hash, version;

-- name: lift_quarantine
-- $2: the alert lifting it; another open alert that acted on the key keeps it
-- (NULL: an operator's release, whatever the alerts).
UPDATE api_keys
SET quarantine_limit = NULL, quarantined_at = NULL, version = nextval('api_key_versions')
WHERE id = $1 AND quarantine_limit IS NOT NULL
  AND ($2::bigint IS NULL OR NOT EXISTS (
        SELECT 1 FROM key_alerts a
        WHERE a.api_key_id = $1 AND a.id <> $2 AND a.status = 'open' AND a.action <> 'none'))
RETURNING key_hash, version;

-- name: force_rotation
-- The key stops at $2 unless an earlier deadline stands; until then the edge
-- answers with Sunset.
UPDATE api_keys
SET rotate_by = least(rotate_by, $2), version = nextval('api_key_versions')
WHERE id = $1 AND status IN ('active', 'rotating')
RETURNING key_hash, version;

-- name: cancel_forced_rotation
-- $2: the alert undoing it; another unresolved alert that forced it keeps it
-- (NULL: an operator's release).
UPDATE api_keys
SET rotate_by = NULL, version = nextval('api_key_versions')
WHERE id = $1 AND rotate_by IS NOT NULL
  AND ($2::bigint IS NULL OR NOT EXISTS (
        SELECT 1 FROM key_alerts a
        WHERE a.api_key_id = $1 AND a.id <> $2 AND a.status <> 'resolved'
          AND a.action IN ('force_rotation', 'revoke')))
RETURNING key_hash, version;

-- name: reinstate_key
-- Undo a revocation whose reason matches $2 (an alert's: 'alert <id>: %'):
-- the key works again as it did, in its rotation grace if it was in one; a
-- grace that has ended meanwhile, or a revocation by anyone else, stays.
UPDATE api_keys
SET status = CASE WHEN rotates_at IS NOT NULL THEN 'rotating' ELSE 'active' END,
    revoked_at = NULL, revocation_reason = NULL, version = nextval('api_key_versions')
WHERE id = $1 AND status = 'revoked' AND revocation_reason LIKE $2
  AND (rotates_at IS NULL OR rotates_at > now())
RETURNING key_hash, version;

-- name: key_history
-- A key's audit trail, oldest first.
SELECT action, detail::text AS detail, actor, created_at
FROM api_key_events WHERE api_key_id = $1 ORDER BY id;
