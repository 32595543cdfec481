-- Requests the edge refused (401, 403, 429, its 503s) are recorded but never
-- billed or counted against the quota (DESIGN.md, "Billing"): the usage event
-- says so in `rejected` (the reason), usage_logs keeps it, and daily_usage
-- counts them apart. Billable requests of a day = request_count - rejected_count.
SET LOCAL lock_timeout = '10s';

ALTER TABLE usage_logs ADD COLUMN rejected text;
ALTER TABLE daily_usage ADD COLUMN rejected_count bigint NOT NULL DEFAULT 0;

COMMENT ON COLUMN usage_logs.rejected IS
    'why the edge refused the request (forbidden_ip, rate_limited, quota_exceeded, missing_scope ...); NULL: served';
COMMENT ON COLUMN daily_usage.rejected_count IS
    'requests the edge refused (part of request_count; never billable, not counted against the quota)';
COMMENT ON COLUMN daily_usage.units IS 'billable units of served requests only';
