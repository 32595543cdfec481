-- The usage pipeline's and the usage report's queries (metering.usage).

-- name: create_usage_stage
-- The session's staging table: a batch is COPYed here, then inserted and
-- aggregated by insert_and_aggregate in the same transaction.
CREATE TEMP TABLE IF NOT EXISTS usage_stage (
    event_id uuid, created_at timestamptz, user_id uuid, api_key_id uuid,
    endpoint text, method text, status_code smallint, response_time_ms double precision,
    client_ip text, bytes_out bigint, units integer, schema_version smallint, rejected text,
    request_count integer
) ON COMMIT DELETE ROWS;

-- name: insert_and_aggregate
-- Data-modifying CTEs: all run once, in one snapshot, in one statement.
-- Aggregates are ordered so concurrent writers lock daily_usage rows in the
-- same order (no deadlocks during a rebalance overlap).
WITH inserted AS (
    INSERT INTO usage_logs (event_id, created_at, user_id, api_key_id, endpoint, method,
                            status_code, response_time_ms, client_ip, bytes_out, units,
                            schema_version, rejected, request_count)
    SELECT event_id, created_at, user_id, api_key_id, endpoint, method,
           status_code, response_time_ms, client_ip::inet, bytes_out, units, schema_version,
           rejected, request_count
    FROM usage_stage
    ON CONFLICT DO NOTHING
    RETURNING user_id, created_at, api_key_id, endpoint, status_code, response_time_ms,
              bytes_out, units, rejected, request_count
), per_day AS (
    SELECT user_id,
           (created_at AT TIME ZONE 'UTC')::date AS date,
           sum(request_count) AS request_count,
           -- a refused request is never billable, whatever units it carries
           coalesce(sum(units) FILTER (WHERE rejected IS NULL), 0) AS units,
           coalesce(sum(request_count) FILTER (WHERE status_code BETWEEN 400 AND 499), 0)
               AS client_errors,
           coalesce(sum(request_count) FILTER (WHERE status_code >= 500), 0) AS server_errors,
           coalesce(sum(request_count) FILTER (WHERE status_code = 429), 0) AS throttled,
           coalesce(sum(request_count) FILTER (WHERE rejected IS NOT NULL), 0) AS rejected,
           sum(response_time_ms) AS response_time_ms,
           coalesce(sum(bytes_out), 0) AS bytes_out
    FROM inserted
    WHERE user_id IS NOT NULL
    GROUP BY 1, 2
    ORDER BY 1, 2
), per_bucket AS (
    -- per key, endpoint and day, and latency bucket (NULL for refused requests)
    SELECT user_id,
           (created_at AT TIME ZONE 'UTC')::date AS date,
           api_key_id,
           endpoint,
           CASE WHEN rejected IS NULL THEN latency_bucket(response_time_ms) END AS bucket,
           sum(request_count) AS requests,
           coalesce(sum(request_count) FILTER (WHERE rejected IS NOT NULL), 0) AS refused,
           coalesce(sum(units) FILTER (WHERE rejected IS NULL), 0) AS units,
           coalesce(sum(request_count) FILTER (WHERE status_code BETWEEN 400 AND 499), 0)
               AS client_errors,
           coalesce(sum(request_count) FILTER (WHERE status_code >= 500), 0) AS server_errors,
           coalesce(sum(response_time_ms) FILTER (WHERE rejected IS NULL), 0) AS latency_ms,
           count(*) FILTER (WHERE rejected IS NULL) AS served
    FROM inserted
    WHERE user_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
), per_endpoint AS (
    SELECT user_id, date, api_key_id, endpoint,
           sum(requests) AS requests, sum(refused) AS refused, sum(units) AS units,
           sum(client_errors) AS client_errors, sum(server_errors) AS server_errors,
           sum(latency_ms) AS latency_ms,
           coalesce(array_agg(bucket ORDER BY bucket) FILTER (WHERE bucket IS NOT NULL), '{}')
               AS buckets,
           coalesce(array_agg(served ORDER BY bucket) FILTER (WHERE bucket IS NOT NULL), '{}')
               AS counts
    FROM per_bucket
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
), detail AS (
    INSERT INTO daily_endpoint_usage AS e (user_id, date, api_key_id, endpoint, requests, refused,
                                           units, client_errors, server_errors, latency_sum_ms,
                                           latency_buckets, latency_counts, latency_merged)
    SELECT user_id, date, api_key_id, endpoint, requests, refused, units, client_errors,
           server_errors, latency_ms, buckets, counts, cardinality(buckets)
    FROM per_endpoint
    ON CONFLICT (user_id, date, api_key_id, endpoint) DO UPDATE SET
        requests       = e.requests + EXCLUDED.requests,
        refused        = e.refused + EXCLUDED.refused,
        units          = e.units + EXCLUDED.units,
        client_errors  = e.client_errors + EXCLUDED.client_errors,
        server_errors  = e.server_errors + EXCLUDED.server_errors,
        latency_sum_ms = e.latency_sum_ms + EXCLUDED.latency_sum_ms,
        -- appended; merged into distinct buckets when twice as long as at the last merge
        latency_buckets = CASE
            WHEN cardinality(e.latency_buckets) + cardinality(EXCLUDED.latency_buckets)
                 > greatest(64, 2 * e.latency_merged)
            THEN (latency_hist_merge(e.latency_buckets, e.latency_counts,
                                     EXCLUDED.latency_buckets, EXCLUDED.latency_counts)).buckets
            ELSE e.latency_buckets || EXCLUDED.latency_buckets END,
        latency_counts = CASE
            WHEN cardinality(e.latency_buckets) + cardinality(EXCLUDED.latency_buckets)
                 > greatest(64, 2 * e.latency_merged)
            THEN (latency_hist_merge(e.latency_buckets, e.latency_counts,
                                     EXCLUDED.latency_buckets, EXCLUDED.latency_counts)).counts
            ELSE e.latency_counts || EXCLUDED.latency_counts END,
        latency_merged = CASE
            WHEN cardinality(e.latency_buckets) + cardinality(EXCLUDED.latency_buckets)
                 > greatest(64, 2 * e.latency_merged)
            THEN cardinality((latency_hist_merge(e.latency_buckets, e.latency_counts,
                                                 EXCLUDED.latency_buckets,
                                                 EXCLUDED.latency_counts)).buckets)
            ELSE e.latency_merged END,
        updated_at     = now()
), upserted AS (
    INSERT INTO daily_usage AS d (user_id, date, request_count, units, client_error_count,
                                  server_error_count, throttled_count, rejected_count,
                                  total_response_time_ms, bytes_out)
    SELECT user_id, date, request_count, units, client_errors, server_errors, throttled,
           rejected, response_time_ms, bytes_out
    FROM per_day
    ON CONFLICT (user_id, date) DO UPDATE SET
        request_count          = d.request_count + EXCLUDED.request_count,
        units                  = d.units + EXCLUDED.units,
        client_error_count     = d.client_error_count + EXCLUDED.client_error_count,
        server_error_count     = d.server_error_count + EXCLUDED.server_error_count,
        throttled_count        = d.throttled_count + EXCLUDED.throttled_count,
        rejected_count         = d.rejected_count + EXCLUDED.rejected_count,
        total_response_time_ms = d.total_response_time_ms + EXCLUDED.total_response_time_ms,
        bytes_out              = d.bytes_out + EXCLUDED.bytes_out,
        updated_at             = now()
    RETURNING d.user_id, d.date, d.request_count, d.units,
              d.client_error_count + d.server_error_count AS errors, d.throttled_count AS throttled,
              d.rejected_count AS rejected
)
SELECT (SELECT count(*) FROM inserted) AS inserted,
       coalesce((SELECT array_agg(u.user_id) FROM upserted u), '{}') AS user_ids,
       coalesce((SELECT array_agg(u.date) FROM upserted u), '{}') AS dates,
       coalesce((SELECT array_agg(u.request_count) FROM upserted u), '{}') AS requests,
       coalesce((SELECT array_agg(u.units) FROM upserted u), '{}') AS units,
       coalesce((SELECT array_agg(u.errors) FROM upserted u), '{}') AS errors,
       coalesce((SELECT array_agg(u.throttled) FROM upserted u), '{}') AS throttled,
       coalesce((SELECT array_agg(u.rejected) FROM upserted u), '{}') AS rejected;

-- name: totals_of
-- Totals of (user, day) pairs a batch touched but did not change (all its
-- events there were duplicates): $1 user ids, $2 dates.
SELECT d.user_id, d.date, d.request_count, d.units,
       d.client_error_count + d.server_error_count AS errors, d.throttled_count AS throttled,
       d.rejected_count AS rejected
FROM unnest($1::uuid[], $2::date[]) AS t(user_id, date)
JOIN daily_usage d ON d.user_id = t.user_id AND d.date = t.date;

-- name: ensure_month_partition
-- The usage_logs partition of the month that starts at $1 (race-safe, 0005).
SELECT ensure_usage_logs_partition($1);

-- name: daily_totals_since
-- Every user's daily totals from $1 on (to rebuild the Redis counters).
SELECT user_id, date, request_count, units,
       client_error_count + server_error_count AS errors, throttled_count, rejected_count
FROM daily_usage
WHERE date >= $1;

-- name: daily_usage_report
-- `metering usage`: daily rows from $1 on, of one user ($2) or all (NULL).
SELECT d.date, d.user_id, u.email, t.name AS tier, d.request_count, d.units,
       d.client_error_count, d.server_error_count, d.throttled_count, d.rejected_count,
       d.total_response_time_ms / NULLIF(d.request_count, 0) AS avg_ms,
       t.daily_quota
FROM daily_usage d
LEFT JOIN users u ON u.id = d.user_id
LEFT JOIN access_tiers t ON t.id = u.tier_id
WHERE d.date >= $1 AND ($2::uuid IS NULL OR d.user_id = $2)
ORDER BY d.date DESC, d.request_count DESC;

-- name: statement_days
-- A customer's days from $2 to $3 (exclusive): usage, and the day's latency
-- percentiles merged over their keys and endpoints.
SELECT d.date, d.request_count - d.rejected_count AS served, d.rejected_count AS refused,
       d.units, d.client_error_count AS client_errors, d.server_error_count AS server_errors,
       h.p50, h.p95, h.p99
FROM daily_usage d
LEFT JOIN LATERAL (
    SELECT latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.50) AS p50,
           latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.95) AS p95,
           latency_quantile(hist_concat(e.latency_buckets), hist_concat(e.latency_counts), 0.99) AS p99
    FROM daily_endpoint_usage e
    WHERE e.user_id = d.user_id AND e.date = d.date
) AS h ON true
WHERE d.user_id = $1 AND d.date >= $2 AND d.date < $3
ORDER BY d.date;

-- name: statement_invoice
SELECT id, number, status, currency, subtotal, adjustments, total, units
FROM invoices WHERE user_id = $1 AND month = $2;

-- name: report_top
-- The month's ($1) first $2 consumers by billable units, with their invoice if any.
SELECT c.rank, c.user_id, c.email, c.tier, c.units, c.served,
       (SELECT sum(d.rejected_count) FROM daily_usage d
        WHERE d.user_id = c.user_id AND d.date >= $1
          AND d.date < ($1 + interval '1 month')::date) AS refused,
       i.number, i.status, i.total, i.currency
FROM top_consumers c
LEFT JOIN invoices i ON i.user_id = c.user_id AND i.month = c.month
WHERE c.month = $1 AND c.rank <= $2
ORDER BY c.rank, c.email;
