-- 0002: raw usage log (month partitions), daily aggregates, partition
-- maintenance and the seed functions.

-- Raw events. One row per distinct event. created_at is the event time
-- (occurred_at), which is also the partition key, so the unique key is
-- (event_id, created_at): a redelivered event carries the same pair.
CREATE TABLE usage_logs (
    event_id         uuid NOT NULL,
    created_at       timestamptz NOT NULL,
    user_id          uuid,                    -- NULL: anonymous / failed authentication
    api_key_id       uuid,
    endpoint         text NOT NULL,
    method           text NOT NULL,
    status_code      smallint NOT NULL CHECK (status_code BETWEEN 100 AND 599),
    response_time_ms double precision NOT NULL CHECK (response_time_ms >= 0),
    client_ip        inet NOT NULL,
    bytes_out        bigint,
    units            integer NOT NULL DEFAULT 1 CHECK (units >= 0),
    schema_version   smallint NOT NULL DEFAULT 1,
    ingested_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, created_at)
) PARTITION BY RANGE (created_at);

CREATE INDEX usage_logs_user_id_created_at_idx ON usage_logs (user_id, created_at);
CREATE INDEX usage_logs_api_key_id_created_at_idx ON usage_logs (api_key_id, created_at)
    WHERE api_key_id IS NOT NULL;

-- Per user and UTC day. Only rows actually inserted into usage_logs add to it.
CREATE TABLE daily_usage (
    user_id                uuid NOT NULL,
    date                   date NOT NULL,        -- UTC date of the event time
    request_count          bigint NOT NULL DEFAULT 0,
    units                  bigint NOT NULL DEFAULT 0,
    client_error_count     bigint NOT NULL DEFAULT 0,  -- 4xx
    server_error_count     bigint NOT NULL DEFAULT 0,  -- 5xx
    total_response_time_ms double precision NOT NULL DEFAULT 0,
    bytes_out              bigint NOT NULL DEFAULT 0,
    updated_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, date)                  -- also the (user_id, date) index
);

-- Partition naming: usage_logs_yYYYYmMM, by the UTC month of created_at.
CREATE FUNCTION usage_logs_partition_name(p_ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT 'usage_logs_' || to_char(p_ts AT TIME ZONE 'UTC', '"y"YYYY"m"MM')
$$;

-- Create the partition holding p_ts if it is missing. Safe under concurrency.
CREATE FUNCTION ensure_usage_logs_partition(p_ts timestamptz) RETURNS text
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
    IF to_regclass(quote_ident(v_name)) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF usage_logs FOR VALUES FROM (%L) TO (%L)',
            v_name, v_from, v_to);
    END IF;
    RETURN v_name;
END
$$;

-- Create partitions from p_months_back months ago to p_months_ahead ahead.
CREATE FUNCTION ensure_usage_logs_partitions(p_months_back integer DEFAULT 1,
                                             p_months_ahead integer DEFAULT 2)
RETURNS SETOF text LANGUAGE sql AS $$
    SELECT ensure_usage_logs_partition(now() + make_interval(months => m))
    FROM generate_series(-p_months_back, p_months_ahead) AS m
$$;

-- Drop partitions whose whole month is older than the retention.
CREATE FUNCTION drop_expired_usage_logs_partitions(p_retention interval DEFAULT interval '90 days')
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    r      record;
    v_to   timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('metering:usage_logs:partitions'));
    FOR r IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_logs'::regclass
          AND c.relname ~ '^usage_logs_y[0-9]{4}m[0-9]{2}$'
        ORDER BY c.relname
    LOOP
        v_to := (make_timestamp(substr(r.relname, 13, 4)::int, substr(r.relname, 18, 2)::int,
                                1, 0, 0, 0) + interval '1 month') AT TIME ZONE 'UTC';
        IF v_to <= now() - p_retention THEN
            EXECUTE format('DROP TABLE IF EXISTS %I', r.relname);
            RETURN NEXT r.relname;
        END IF;
    END LOOP;
END
$$;

SELECT ensure_usage_logs_partitions(1, 2);

-- Seed functions, kept with the seed signatures. NULL quota = unlimited.
CREATE FUNCTION check_quota_exceeded(p_user_id uuid, p_tier_quota bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_tier_quota IS NOT NULL AND COALESCE((
        SELECT request_count FROM daily_usage
        WHERE user_id = p_user_id AND date = (now() AT TIME ZONE 'UTC')::date
    ), 0) >= p_tier_quota
$$;

-- Requests by the user in the last p_window_minutes (from the raw log).
CREATE FUNCTION get_rate_limit(p_user_id uuid, p_window_minutes integer) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM usage_logs
    WHERE user_id = p_user_id
      AND created_at > now() - make_interval(mins => p_window_minutes)
$$;

-- For analysts: daily usage with the user's tier and quota use.
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
