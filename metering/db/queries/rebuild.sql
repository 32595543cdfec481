-- Recomputing a month's daily tables from its raw partition (metering.usage.rebuild).
-- The formulas are the pipeline's (usage.sql, insert_and_aggregate), row for row.

-- name: rebuild_create_daily
-- The recomputed rows live in the session's temp tables until the transaction ends.
CREATE TEMP TABLE IF NOT EXISTS rebuilt_daily (LIKE daily_usage) ON COMMIT DELETE ROWS;

-- name: rebuild_create_endpoint
CREATE TEMP TABLE IF NOT EXISTS rebuilt_endpoint (LIKE daily_endpoint_usage) ON COMMIT DELETE ROWS;

-- name: rebuild_daily
-- daily_usage of the events from $1 to $2 (timestamptz, a UTC month).
INSERT INTO rebuilt_daily (user_id, date, request_count, units, client_error_count,
                           server_error_count, throttled_count, rejected_count,
                           total_response_time_ms, bytes_out, updated_at)
SELECT user_id,
       (created_at AT TIME ZONE 'UTC')::date,
       sum(request_count),
       coalesce(sum(units) FILTER (WHERE rejected IS NULL), 0),
       coalesce(sum(request_count) FILTER (WHERE status_code BETWEEN 400 AND 499), 0),
       coalesce(sum(request_count) FILTER (WHERE status_code >= 500), 0),
       coalesce(sum(request_count) FILTER (WHERE status_code = 429), 0),
       coalesce(sum(request_count) FILTER (WHERE rejected IS NOT NULL), 0),
       sum(response_time_ms),
       coalesce(sum(bytes_out), 0),
       now()
FROM usage_logs
WHERE created_at >= $1 AND created_at < $2 AND user_id IS NOT NULL
GROUP BY 1, 2;

-- name: rebuild_endpoint
-- daily_endpoint_usage (with the latency histograms) of the events from $1 to $2.
INSERT INTO rebuilt_endpoint (user_id, date, api_key_id, endpoint, requests, refused, units,
                              client_errors, server_errors, latency_sum_ms, latency_buckets,
                              latency_counts, latency_merged, updated_at)
SELECT user_id, date, api_key_id, endpoint,
       sum(requests), sum(refused), sum(units), sum(client_errors), sum(server_errors),
       sum(latency_ms),
       coalesce(array_agg(bucket ORDER BY bucket) FILTER (WHERE bucket IS NOT NULL), '{}'),
       coalesce(array_agg(served ORDER BY bucket) FILTER (WHERE bucket IS NOT NULL), '{}'),
       count(bucket),
       now()
FROM (
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
    FROM usage_logs
    WHERE created_at >= $1 AND created_at < $2 AND user_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
) AS b
GROUP BY 1, 2, 3, 4;

-- name: rebuild_diff_daily
-- Each (user, day) of $1..$2 (dates) where the stored row and the rebuilt one differ.
SELECT coalesce(s.user_id, r.user_id) AS user_id,
       coalesce(s.date, r.date) AS date,
       s.request_count AS stored_requests, r.request_count AS rebuilt_requests,
       s.rejected_count AS stored_refused, r.rejected_count AS rebuilt_refused,
       s.units AS stored_units, r.units AS rebuilt_units,
       s.client_error_count + s.server_error_count AS stored_errors,
       r.client_error_count + r.server_error_count AS rebuilt_errors
FROM (SELECT * FROM daily_usage WHERE date >= $1 AND date < $2) AS s
FULL JOIN rebuilt_daily AS r ON r.user_id = s.user_id AND r.date = s.date
WHERE (s.request_count, s.units, s.rejected_count, s.client_error_count, s.server_error_count,
       s.throttled_count, s.bytes_out)
      IS DISTINCT FROM
      (r.request_count, r.units, r.rejected_count, r.client_error_count, r.server_error_count,
       r.throttled_count, r.bytes_out)
   OR abs(coalesce(s.total_response_time_ms, -1) - coalesce(r.total_response_time_ms, -1))
      > 1e-6 * greatest(abs(coalesce(r.total_response_time_ms, 0)), 1)
ORDER BY 1, 2;

-- name: rebuild_diff_endpoint
-- How many (user, day, key, endpoint) rows of $1..$2 differ, and how many
-- histograms: the stored arrays are compared merged (the pipeline appends
-- batch by batch; the rebuild writes them merged).
SELECT count(*) AS rows,
       count(*) FILTER (WHERE (s.buckets, s.counts)
                              IS DISTINCT FROM (r.latency_buckets, r.latency_counts)) AS histograms
FROM (SELECT e.*, m.buckets, m.counts
      FROM daily_endpoint_usage e
      CROSS JOIN LATERAL latency_hist_merge(e.latency_buckets, e.latency_counts, '{}', '{}') AS m
      WHERE e.date >= $1 AND e.date < $2) AS s
FULL JOIN rebuilt_endpoint AS r
  ON r.user_id = s.user_id AND r.date = s.date AND r.endpoint = s.endpoint
 AND r.api_key_id IS NOT DISTINCT FROM s.api_key_id
WHERE (s.requests, s.refused, s.units, s.client_errors, s.server_errors, s.buckets, s.counts)
      IS DISTINCT FROM
      (r.requests, r.refused, r.units, r.client_errors, r.server_errors, r.latency_buckets,
       r.latency_counts);

-- name: rebuild_billed
-- Per user: the month's invoice ($1, its first day) and its billed units, the
-- stored and the rebuilt units of the month (only users where any differ).
SELECT coalesce(i.user_id, s.user_id, r.user_id) AS user_id, i.number, i.status,
       i.units AS billed_units, coalesce(s.units, 0) AS stored_units,
       coalesce(r.units, 0) AS rebuilt_units
FROM (SELECT user_id, number, status, units FROM invoices WHERE month = $1) AS i
FULL JOIN (SELECT user_id, sum(units) AS units FROM daily_usage
           WHERE date >= $1 AND date < $2 GROUP BY 1) AS s ON s.user_id = i.user_id
FULL JOIN (SELECT user_id, sum(units) AS units FROM rebuilt_daily GROUP BY 1) AS r
  ON r.user_id = coalesce(i.user_id, s.user_id)
WHERE coalesce(r.units, 0) <> coalesce(s.units, 0)
   OR (i.units IS NOT NULL AND i.units <> coalesce(r.units, 0))
ORDER BY 1;

-- name: rebuild_lock
-- The pipeline's writes to the daily tables wait while a rebuild replaces
-- them; taken in the order the batch statement takes them (its text names
-- daily_endpoint_usage first), so the two cannot deadlock.
LOCK TABLE daily_endpoint_usage, daily_usage IN EXCLUSIVE MODE;

-- name: rebuild_delete_daily
DELETE FROM daily_usage WHERE date >= $1 AND date < $2;

-- name: rebuild_insert_daily
INSERT INTO daily_usage SELECT * FROM rebuilt_daily;

-- name: rebuild_delete_endpoint
DELETE FROM daily_endpoint_usage WHERE date >= $1 AND date < $2;

-- name: rebuild_insert_endpoint
INSERT INTO daily_endpoint_usage SELECT * FROM rebuilt_endpoint;
