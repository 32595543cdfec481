-- 0005: partition creation that is idempotent under concurrency, and a
-- daily bytes_out sum that cannot overflow.

-- The column change below rewrites daily_usage under an ACCESS EXCLUSIVE
-- lock: rather than queue every writer behind a long analyst query, give up
-- after 10 s (the migration fails with a clear error; run it again).
SET LOCAL lock_timeout = '10s';

-- Two sessions creating the same month: the loser waited on the advisory
-- lock, but its re-check can run on a catalog snapshot that misses the
-- winner's commit and CREATE answers 42P07. "Already exists" is success.
CREATE OR REPLACE FUNCTION ensure_usage_logs_partition(p_ts timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_month timestamp   := date_trunc('month', p_ts AT TIME ZONE 'UTC');
    v_from  timestamptz := v_month AT TIME ZONE 'UTC';
    v_to    timestamptz := (v_month + interval '1 month') AT TIME ZONE 'UTC';
    v_name  text        := usage_logs_partition_name(p_ts);
BEGIN
    IF to_regclass(quote_ident(v_name)) IS NOT NULL THEN
        RETURN v_name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('metering:usage_logs:partitions'));
    BEGIN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF usage_logs FOR VALUES FROM (%L) TO (%L)',
            v_name, v_from, v_to);
    EXCEPTION
        -- duplicate_table: committed by another session after our check;
        -- unique_violation: its catalog rows (pg_type) raced with ours.
        WHEN duplicate_table OR unique_violation THEN
            NULL;
    END;
    RETURN v_name;
END
$$;

-- The contract allows 2^62 bytes per event; a bigint day sum overflowed
-- (22003) on the second such event of a user-day and dead-lettered it.
DROP VIEW daily_usage_report;
ALTER TABLE daily_usage ALTER COLUMN bytes_out TYPE numeric;
CREATE VIEW daily_usage_report AS
SELECT d.date,
       d.user_id,
       u.email,
       t.name AS tier,
       d.request_count,
       d.units,
       d.client_error_count,
       d.server_error_count,
       CASE WHEN d.request_count > 0
            THEN d.total_response_time_ms / d.request_count END AS avg_response_time_ms,
       d.bytes_out,
       t.daily_quota,
       CASE WHEN t.daily_quota IS NOT NULL
            THEN round(100.0 * d.request_count / t.daily_quota, 2) END AS quota_used_pct
FROM daily_usage d
LEFT JOIN users u ON u.id = d.user_id
LEFT JOIN access_tiers t ON t.id = u.tier_id;
