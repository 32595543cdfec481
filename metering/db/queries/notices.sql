-- Usage threshold notifications (metering.billing.notices).

-- name: notice_quota_crossings
-- Users whose requests served on a day since $1 reached 80 % or 100 % of
-- their tier's daily quota and were not told yet: recorded here, once per
-- threshold and day, and returned so that their webhooks are queued in the
-- same transaction.
WITH crossed AS (
    SELECT d.user_id, d.date, th.pct, d.request_count - d.rejected_count AS used,
           t.daily_quota AS quota
    FROM daily_usage d
    JOIN users u ON u.id = d.user_id
    JOIN access_tiers t ON t.id = u.tier_id
    CROSS JOIN (VALUES (80), (100)) AS th (pct)
    WHERE d.date >= $1
      AND t.daily_quota IS NOT NULL
      AND u.status = 'active'
      AND (d.request_count - d.rejected_count) * 100 >= th.pct * t.daily_quota
)
INSERT INTO usage_notices (user_id, kind, period, threshold, used, limit_value)
SELECT user_id, 'daily_quota', date, pct, used, quota FROM crossed
ON CONFLICT DO NOTHING
RETURNING user_id, kind, period, threshold, used, limit_value, currency,
          (SELECT email FROM users WHERE id = user_id) AS email;

-- name: notice_spend_users
-- Users with a monthly spend limit not yet told they reached it in month $1.
SELECT id, email, monthly_spend_limit
FROM users u
WHERE monthly_spend_limit IS NOT NULL
  AND status <> 'deleted'
  AND NOT EXISTS (SELECT 1 FROM usage_notices n
                  WHERE n.user_id = u.id AND n.kind = 'monthly_spend' AND n.period = $1
                    AND n.threshold = 100);

-- name: notice_insert
-- One notice ($1 user, $2 kind, $3 period, $4 threshold, $5 used, $6 limit,
-- $7 currency); nothing when it was sent before.
INSERT INTO usage_notices (user_id, kind, period, threshold, used, limit_value, currency)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT DO NOTHING
RETURNING created_at;

-- name: enqueue_user_webhooks
-- A message about user $4 to the operators' endpoints that take its type
-- ($2) and to the user's own; the id is the message's ($1 plus the
-- endpoint), so enqueueing twice sends once.
INSERT INTO webhook_deliveries (id, endpoint_id, event_type, body)
SELECT $1 || '_' || e.id, e.id, $2, $3
FROM webhook_endpoints e
WHERE e.active
  AND (e.event_types = '{}' OR $2 = ANY (e.event_types))
  AND (e.user_id IS NULL OR e.user_id = $4)
ON CONFLICT (id) DO NOTHING;

-- name: set_spend_limit
UPDATE users SET monthly_spend_limit = $2, updated_at = now() WHERE id = $1 RETURNING id;

-- name: list_notices
-- The latest notices ($1 user or NULL, $2 the most).
SELECT n.user_id, u.email, n.kind, n.period, n.threshold, n.used, n.limit_value, n.currency,
       n.created_at
FROM usage_notices n JOIN users u ON u.id = n.user_id
WHERE ($1::uuid IS NULL OR n.user_id = $1)
ORDER BY n.created_at DESC
LIMIT $2;
