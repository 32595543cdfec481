-- name: upsert_alert
-- One alert per subject and rule while it is not resolved: a new finding
-- opens it, a repeated one updates it (evidence, last seen, occurrences, and
-- the severity only upwards). The key and user are linked when they exist.
INSERT INTO key_alerts (subject, api_key_id, user_id, rule, severity, evidence,
                        first_seen, last_seen)
VALUES ($1, (SELECT id FROM api_keys WHERE id = $2), (SELECT id FROM users WHERE id = $3),
        $4, $5, $6::jsonb, $7, $8)
ON CONFLICT (subject, rule) WHERE status <> 'resolved' DO UPDATE
SET evidence = excluded.evidence,
    severity = CASE WHEN array_position(ARRAY['low', 'medium', 'high', 'critical'], excluded.severity)
                       > array_position(ARRAY['low', 'medium', 'high', 'critical'], key_alerts.severity)
                    THEN excluded.severity ELSE key_alerts.severity END,
    first_seen = least(key_alerts.first_seen, excluded.first_seen),
    last_seen = greatest(key_alerts.last_seen, excluded.last_seen),
    occurrences = key_alerts.occurrences + 1,
    updated_at = now()
RETURNING id, (xmax = 0) AS created;

-- name: alert_by_id
SELECT a.id, a.subject, a.api_key_id, a.user_id, a.rule, a.severity, a.status, a.action,
       a.evidence::text AS evidence, a.occurrences, a.first_seen, a.last_seen, a.created_at,
       a.updated_at, a.notified_severity, a.notified_action, a.acknowledged_by,
       a.acknowledged_at, a.resolved_by, a.resolved_at, a.note,
       k.prefix AS key_prefix, u.email AS user_email
FROM key_alerts a
LEFT JOIN api_keys k ON k.id = a.api_key_id
LEFT JOIN users u ON u.id = a.user_id
WHERE a.id = $1;

-- name: list_alerts
-- Newest first; $1 a status or NULL for all, $2 a key id or NULL, $3 the most to return.
SELECT a.id, a.subject, a.api_key_id, a.user_id, a.rule, a.severity, a.status, a.action,
       a.evidence::text AS evidence, a.occurrences, a.first_seen, a.last_seen, a.created_at,
       a.updated_at, a.notified_severity, a.notified_action, a.acknowledged_by,
       a.acknowledged_at, a.resolved_by, a.resolved_at, a.note,
       k.prefix AS key_prefix, u.email AS user_email
FROM key_alerts a
LEFT JOIN api_keys k ON k.id = a.api_key_id
LEFT JOIN users u ON u.id = a.user_id
WHERE ($1::text IS NULL OR a.status = $1) AND ($2::uuid IS NULL OR a.api_key_id = $2)
ORDER BY a.last_seen DESC, a.id DESC
LIMIT $3;

-- name: lock_alert
SELECT id FROM key_alerts WHERE id = $1 FOR UPDATE;

-- name: set_alert_action
-- The strongest action taken for the alert (none < quarantine < force_rotation < revoke).
UPDATE key_alerts
SET action = CASE WHEN array_position(ARRAY['none', 'quarantine', 'force_rotation', 'revoke'], $2)
                     > array_position(ARRAY['none', 'quarantine', 'force_rotation', 'revoke'], action)
                  THEN $2 ELSE action END,
    updated_at = now()
WHERE id = $1;

-- name: acknowledge_alert
UPDATE key_alerts
SET status = 'acknowledged', acknowledged_by = $2, acknowledged_at = now(),
    note = coalesce($3, note), updated_at = now()
WHERE id = $1 AND status = 'open'
RETURNING id;

-- name: resolve_alert
UPDATE key_alerts
SET status = 'resolved', resolved_by = $2, resolved_at = now(),
    note = coalesce($3, note), updated_at = now()
WHERE id = $1 AND status <> 'resolved'
RETURNING id;

-- name: mark_notified
-- The webhook for this severity and action is queued (with it, in one transaction).
UPDATE key_alerts SET notified_severity = $2, notified_action = $3 WHERE id = $1;

-- name: rotating_keys
-- Keys in their rotation grace period and when it began (the grace_new_address
-- rule flags addresses first seen after that).
SELECT k.id, extract(epoch FROM coalesce(
           (SELECT max(e.created_at) FROM api_key_events e
            WHERE e.api_key_id = k.id AND e.action = 'rotated'), now()))::float8 AS since
FROM api_keys k
WHERE k.status = 'rotating' AND k.rotates_at > now();

-- name: tier_detection_overrides
-- Users whose tier overrides detection thresholds, with the overrides.
SELECT u.id AS user_id, t.name AS tier, (t.features -> 'detection')::text AS overrides
FROM users u JOIN access_tiers t ON t.id = u.tier_id
WHERE t.features ? 'detection';

-- name: add_webhook
-- $5: the customer it belongs to, or NULL for an operators' endpoint.
INSERT INTO webhook_endpoints (url, secret, event_types, description, user_id)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, url, event_types, description, active, created_at, user_id;

-- name: list_webhooks
SELECT e.id, e.url, e.event_types, e.description, e.active, e.created_at, e.user_id,
       count(d.id) FILTER (WHERE d.status = 'delivered') AS delivered,
       count(d.id) FILTER (WHERE d.status = 'pending') AS pending,
       count(d.id) FILTER (WHERE d.status = 'failed') AS failed
FROM webhook_endpoints e LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.id
GROUP BY e.id ORDER BY e.id;

-- name: webhook_by_id
SELECT id, url, secret, event_types, description, active, created_at
FROM webhook_endpoints WHERE id = $1;

-- name: enqueue_webhooks
-- One delivery per active operators' endpoint (not a customer's) that takes
-- the event type ($2); the id is the message's ($1 plus the endpoint), so
-- enqueueing twice sends once.
INSERT INTO webhook_deliveries (id, endpoint_id, event_type, body)
SELECT $1 || '_' || e.id, e.id, $2, $3
FROM webhook_endpoints e
WHERE e.active AND e.user_id IS NULL AND (e.event_types = '{}' OR $2 = ANY (e.event_types))
ON CONFLICT (id) DO NOTHING;

-- name: claim_deliveries
-- Due deliveries to active endpoints, leased for $2 seconds (another worker
-- skips them meanwhile).
UPDATE webhook_deliveries d
SET next_attempt_at = now() + make_interval(secs => $2)
FROM webhook_endpoints e
WHERE d.id IN (SELECT id FROM webhook_deliveries
               WHERE status = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
  AND e.id = d.endpoint_id AND e.active
RETURNING d.id, d.endpoint_id, d.event_type, d.body, d.attempts, e.url, e.secret;

-- name: record_attempt
-- One attempt's outcome; $3 delivered or not, $7 the next attempt's delay (s)
-- or NULL when there is none (delivered, or given up).
WITH attempt AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error, duration_ms)
    VALUES ($1, $2, $4, $5, $6)
)
UPDATE webhook_deliveries
SET attempts = $2,
    status = CASE WHEN $3 THEN 'delivered' WHEN $7::float8 IS NULL THEN 'failed' ELSE 'pending' END,
    delivered_at = CASE WHEN $3 THEN now() END,
    last_error = CASE WHEN $3 THEN NULL ELSE $5 END,
    next_attempt_at = now() + make_interval(secs => coalesce($7::float8, 0))
WHERE id = $1 AND status = 'pending' AND attempts = $2 - 1;  -- a late answer changes nothing

-- name: delivery_attempts
SELECT d.id, d.event_type, d.status, d.attempts, a.attempt, a.attempted_at, a.status_code,
       a.error, a.duration_ms
FROM webhook_deliveries d JOIN webhook_attempts a ON a.delivery_id = d.id
WHERE d.endpoint_id = $1
ORDER BY a.attempted_at DESC
LIMIT $2;

-- name: insert_delivery
-- One message to one endpoint (webhooks test), claimed at once by its sender.
INSERT INTO webhook_deliveries (id, endpoint_id, event_type, body, next_attempt_at)
VALUES ($1, $2, $3, $4, now() + interval '1 minute');
