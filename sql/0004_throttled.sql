-- 0004: requests answered 429 are counted apart, so a throttled client does
-- not burn its daily quota with requests that were never served.
ALTER TABLE daily_usage ADD COLUMN throttled_count bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION check_quota_exceeded(p_user_id uuid, p_tier_quota bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_tier_quota IS NOT NULL AND COALESCE((
        SELECT request_count - throttled_count FROM daily_usage
        WHERE user_id = p_user_id AND date = (now() AT TIME ZONE 'UTC')::date
    ), 0) >= p_tier_quota
$$;
