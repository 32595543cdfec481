-- A usage record may stand for several alike requests: the edge summarises
-- refused requests of no known user beyond a small allowance per client and
-- minute (the event's `count`). usage_logs keeps the count; sums over
-- usage_logs count requests with sum(request_count), not count(*).
SET LOCAL lock_timeout = '10s';

ALTER TABLE usage_logs
    ADD COLUMN request_count integer NOT NULL DEFAULT 1 CHECK (request_count >= 1);

COMMENT ON COLUMN usage_logs.request_count IS
    'requests this row stands for: 1, or a summary of refused requests of no known user';
