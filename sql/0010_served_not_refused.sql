-- The SQL helpers count what the edge served, like the edge itself (0007):
-- requests the edge refused are recorded, never counted against a quota.
SET LOCAL lock_timeout = '10s';

-- Rows written before 0007 kept refused requests only as 429s: those were
-- already left out of the quota, so they are the refused ones of those days.
UPDATE daily_usage SET rejected_count = throttled_count
WHERE rejected_count = 0 AND throttled_count > 0;

CREATE OR REPLACE FUNCTION check_quota_exceeded(p_user_id uuid, p_tier_quota bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_tier_quota IS NOT NULL AND COALESCE((
        SELECT request_count - rejected_count FROM daily_usage
        WHERE user_id = p_user_id AND date = (now() AT TIME ZONE 'UTC')::date
    ), 0) >= p_tier_quota
$$;

-- Requests the user was served in the last p_window_minutes (from the raw log).
CREATE OR REPLACE FUNCTION get_rate_limit(p_user_id uuid, p_window_minutes integer) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(request_count), 0) FROM usage_logs
    WHERE user_id = p_user_id
      AND rejected IS NULL
      AND created_at > now() - make_interval(mins => p_window_minutes)
$$;

DROP VIEW daily_usage_report;
CREATE VIEW daily_usage_report AS
SELECT d.date,
       d.user_id,
       u.email,
       t.name AS tier,
       d.request_count,
       d.rejected_count,
       d.request_count - d.rejected_count AS served_count,
       d.units,
       d.client_error_count,
       d.server_error_count,
       CASE WHEN d.request_count > 0
            THEN d.total_response_time_ms / d.request_count END AS avg_response_time_ms,
       d.bytes_out,
       t.daily_quota,
       CASE WHEN t.daily_quota IS NOT NULL
            THEN round(100.0 * (d.request_count - d.rejected_count) / t.daily_quota, 2)
       END AS quota_used_pct
FROM daily_usage d
LEFT JOIN users u ON u.id = d.user_id
LEFT JOIN access_tiers t ON t.id = u.tier_id;
