-- The analyst's side: per key, endpoint and day usage with a latency
-- histogram that outlives the raw partitions, written by the pipeline's
-- batch statement (metering/db/queries/usage.sql), and the views of
-- docs/analysts.md.
SET LOCAL lock_timeout = '10s';

-- Latency histogram buckets, relative accuracy 1 %: bucket i holds the
-- values in (1.02^(i-1), 1.02^i] milliseconds, so any quantile read back is
-- within 1 % of a value in the raw rows' bucket (DDSketch's scheme).
-- Values are clamped to [0.01 ms, 10^12 ms].
CREATE FUNCTION latency_bucket(p_ms double precision) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ceil(ln(greatest(least(p_ms, 1e12), 0.01)) / ln(1.02))::smallint
$$;

-- The value a bucket stands for: within 1 % of everything in it.
CREATE FUNCTION latency_bucket_value(p_bucket smallint) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 2 * power(1.02::double precision, p_bucket) / 2.02
$$;

-- Two sparse histograms (sorted bucket indexes, their counts) as one.
CREATE FUNCTION latency_hist_merge(a_buckets smallint[], a_counts bigint[],
                                   b_buckets smallint[], b_counts bigint[],
                                   OUT buckets smallint[], OUT counts bigint[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(b ORDER BY b), '{}'), coalesce(array_agg(c ORDER BY b), '{}')
    FROM (SELECT b, sum(c)::bigint AS c
          FROM (SELECT * FROM unnest(a_buckets, a_counts)
                UNION ALL
                SELECT * FROM unnest(b_buckets, b_counts)) AS u (b, c)
          GROUP BY b) AS s
$$;

-- The q-quantile (0..1) of a histogram given as parallel arrays, in any
-- order and with repeated buckets (so that rows can be merged with
-- array_agg over unnest): the smallest value whose cumulative share is >= q,
-- like percentile_disc. NULL for an empty histogram.
CREATE FUNCTION latency_quantile(p_buckets smallint[], p_counts bigint[], p_q double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT latency_bucket_value(b)
    FROM (SELECT b, sum(c) OVER (ORDER BY b) AS cum, sum(c) OVER () AS n
          FROM unnest(p_buckets, p_counts) AS u (b, c)) AS h
    WHERE cum >= p_q * n AND n > 0
    ORDER BY b
    LIMIT 1
$$;

-- Histograms of several rows as one: concatenate their arrays (all
-- aggregates of a group see its rows in the same order) and read them with
-- latency_quantile, which takes repeated buckets.
CREATE AGGREGATE hist_concat(anycompatiblearray) (
    SFUNC = array_cat,
    STYPE = anycompatiblearray,
    INITCOND = '{}'
);

-- Per user, key, endpoint and UTC day. requests counts everything
-- recorded (refused included, summaries by their count); units, the
-- latency sum and the histogram count served requests only.
CREATE TABLE daily_endpoint_usage (
    user_id         uuid NOT NULL,
    date            date NOT NULL,
    api_key_id      uuid,                  -- NULL: served without a key
    endpoint        text NOT NULL,         -- the route template, e.g. /v1/items/{id}
    requests        bigint NOT NULL,
    refused         bigint NOT NULL,
    units           bigint NOT NULL,
    client_errors   bigint NOT NULL,       -- 4xx, refused included
    server_errors   bigint NOT NULL,       -- 5xx
    latency_sum_ms  double precision NOT NULL,
    latency_buckets smallint[] NOT NULL,   -- bucket numbers (latency_bucket); may repeat
    latency_counts  bigint[] NOT NULL,     -- served requests in each
    latency_merged  integer NOT NULL,      -- the arrays' length when last merged (see below)
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT daily_endpoint_usage_key UNIQUE NULLS NOT DISTINCT (user_id, date, api_key_id, endpoint)
);
CREATE INDEX daily_endpoint_usage_date_idx ON daily_endpoint_usage (date, endpoint);
CREATE INDEX daily_endpoint_usage_key_idx ON daily_endpoint_usage (api_key_id, date)
    WHERE api_key_id IS NOT NULL;
-- The pipeline appends each batch's histogram to the row's arrays and merges
-- them into distinct sorted buckets only when they have grown to twice their
-- length at the last merge (at least 64): the merge's cost is spread over
-- many batches, and a bucket may repeat in between. latency_quantile and
-- hist_concat read them either way.
COMMENT ON TABLE daily_endpoint_usage IS
    'usage per user, key, endpoint and UTC day, with a latency histogram (kept after raw-log retention)';

-- Views (docs/analysts.md documents each column).

CREATE VIEW monthly_usage AS
SELECT d.user_id,
       date_trunc('month', d.date)::date AS month,
       u.email,
       t.name AS tier,
       sum(d.request_count) AS requests,
       sum(d.request_count - d.rejected_count) AS served,
       sum(d.rejected_count) AS refused,
       sum(d.units) AS units,
       sum(d.client_error_count) AS client_errors,
       sum(d.server_error_count) AS server_errors,
       count(*) AS active_days,
       sum(d.total_response_time_ms) / NULLIF(sum(d.request_count), 0) AS avg_response_time_ms
FROM daily_usage d
JOIN users u ON u.id = d.user_id
JOIN access_tiers t ON t.id = u.tier_id
GROUP BY d.user_id, date_trunc('month', d.date), u.email, t.name;

CREATE VIEW key_daily_usage AS
SELECT e.date, e.user_id, e.api_key_id, k.prefix AS key_prefix, k.name AS key_name,
       sum(e.requests) AS requests,
       sum(e.refused) AS refused,
       sum(e.units) AS units,
       sum(e.client_errors) AS client_errors,
       sum(e.server_errors) AS server_errors,
       sum(e.latency_sum_ms) / NULLIF(sum(e.requests - e.refused), 0) AS avg_latency_ms,
       latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.50) AS p50_ms,
       latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.95) AS p95_ms,
       latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.99) AS p99_ms
FROM daily_endpoint_usage e
LEFT JOIN api_keys k ON k.id = e.api_key_id
GROUP BY e.date, e.user_id, e.api_key_id, k.prefix, k.name;

CREATE VIEW endpoint_daily_usage AS
SELECT e.date, e.endpoint,
       sum(e.requests) AS requests,
       sum(e.refused) AS refused,
       sum(e.requests - e.refused) AS served,
       sum(e.client_errors) AS client_errors,
       sum(e.server_errors) AS server_errors,
       round(100.0 * sum(e.client_errors + e.server_errors) / NULLIF(sum(e.requests), 0), 2)
           AS error_rate_pct,
       latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.50) AS p50_ms,
       latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.95) AS p95_ms,
       latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.99) AS p99_ms
FROM daily_endpoint_usage e
GROUP BY e.date, e.endpoint;

CREATE VIEW top_consumers AS
SELECT date_trunc('month', d.date)::date AS month,
       d.user_id, u.email, t.name AS tier,
       sum(d.units) AS units,
       sum(d.request_count - d.rejected_count) AS served,
       rank() OVER (PARTITION BY date_trunc('month', d.date) ORDER BY sum(d.units) DESC) AS rank
FROM daily_usage d
JOIN users u ON u.id = d.user_id
JOIN access_tiers t ON t.id = u.tier_id
GROUP BY date_trunc('month', d.date), d.user_id, u.email, t.name;

-- Each day counts under the tier the user was on that day (user_tier_history).
CREATE VIEW tier_quota_use AS
SELECT d.date, t.name AS tier, t.daily_quota,
       count(*) AS active_users,
       round(avg(100.0 * (d.request_count - d.rejected_count) / t.daily_quota), 2) AS avg_quota_used_pct,
       max(round(100.0 * (d.request_count - d.rejected_count) / t.daily_quota, 2)) AS max_quota_used_pct,
       count(*) FILTER (WHERE d.request_count - d.rejected_count >= 0.8 * t.daily_quota) AS users_over_80_pct,
       count(*) FILTER (WHERE d.request_count - d.rejected_count >= t.daily_quota) AS users_at_quota,
       sum(d.rejected_count) AS refused
FROM daily_usage d
JOIN users u ON u.id = d.user_id
LEFT JOIN LATERAL (SELECT h.tier_id FROM user_tier_history h
                   WHERE h.user_id = d.user_id AND h.effective_from <= d.date
                   ORDER BY h.effective_from DESC LIMIT 1) AS h ON true
JOIN access_tiers t ON t.id = coalesce(h.tier_id, u.tier_id)
WHERE t.daily_quota IS NOT NULL
GROUP BY d.date, t.name, t.daily_quota;
