-- Usage threshold notifications to customers: 80 % and 100 % of the daily
-- quota and of a monthly spend limit, one per threshold and period, sent
-- through the signed-webhook queue of 0011.
SET LOCAL lock_timeout = '10s';

-- NULL: an operator's endpoint (every user's events of the types it takes);
-- a user: that customer's own endpoint, which gets only usage.threshold
-- events about that user.
ALTER TABLE webhook_endpoints ADD COLUMN user_id uuid REFERENCES users (id);
CREATE INDEX webhook_endpoints_user_idx ON webhook_endpoints (user_id) WHERE user_id IS NOT NULL;

-- What the customer wants to be told about: the month's invoice reaching it
-- (in their price's currency). NULL: no spend notifications.
ALTER TABLE users ADD COLUMN monthly_spend_limit numeric(14, 2)
    CHECK (monthly_spend_limit IS NULL OR monthly_spend_limit > 0);

-- One row per notification sent: the primary key makes it once per
-- threshold and period, however often the check runs or a worker restarts.
CREATE TABLE usage_notices (
    user_id     uuid NOT NULL REFERENCES users (id),
    kind        text NOT NULL CHECK (kind IN ('daily_quota', 'monthly_spend')),
    period      date NOT NULL,        -- the UTC day (quota) or the month's first day (spend)
    threshold   smallint NOT NULL CHECK (threshold IN (80, 100)),  -- percent
    used        numeric NOT NULL,     -- requests served, or the month's amount so far
    limit_value numeric NOT NULL,
    currency    text,                 -- spend only
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, kind, period, threshold)
);

-- Today's rows across users (the quota check, analysts' per-day questions).
CREATE INDEX daily_usage_date_idx ON daily_usage (date);
