-- Suspicious key activity: what the stream's rules found (key_alerts), the
-- security actions they took on keys (quarantine, forced rotation, revoke),
-- and the signed webhooks that tell the on-call (Standard Webhooks).
SET LOCAL lock_timeout = '10s';

-- Quarantine: the key's per-minute limit drops to quarantine_limit (its
-- learned baseline, or a floor) until the alert is acknowledged.
-- Forced rotation: the key works until rotate_by, every response says so
-- (Sunset), and at rotate_by it stops as if it had expired.
ALTER TABLE api_keys
    ADD COLUMN quarantine_limit integer CHECK (quarantine_limit IS NULL OR quarantine_limit > 0),
    ADD COLUMN quarantined_at timestamptz,
    ADD COLUMN rotate_by timestamptz;

ALTER TABLE api_key_events DROP CONSTRAINT api_key_events_action_check;
ALTER TABLE api_key_events ADD CONSTRAINT api_key_events_action_check CHECK (action IN (
    'created', 'rotated', 'revoked', 'deleted',
    'quarantined', 'quarantine_lifted', 'rotation_forced', 'rotation_cancelled', 'reinstated'));

-- One finding per subject and rule while it is not resolved: a rule that
-- keeps firing updates its alert (last_seen, occurrences, evidence).
-- subject: 'key:<api key id>', or 'net:<address or prefix>' for findings
-- about a client address with no key (failed-authentication floods).
CREATE TABLE key_alerts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject         text NOT NULL,
    api_key_id      uuid REFERENCES api_keys (id),
    user_id         uuid REFERENCES users (id),
    rule            text NOT NULL CHECK (rule ~ '^[a-z][a-z0-9_]{0,63}$'),
    severity        text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    status          text NOT NULL DEFAULT 'open'
                    CHECK (status IN ('open', 'acknowledged', 'resolved')),
    action          text NOT NULL DEFAULT 'none'
                    CHECK (action IN ('none', 'quarantine', 'force_rotation', 'revoke')),
    evidence        jsonb NOT NULL,
    occurrences     integer NOT NULL DEFAULT 1,
    first_seen      timestamptz NOT NULL,  -- event time of the first event in the evidence
    last_seen       timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- what the last webhook said (NULL: none yet): a rise of either notifies again
    notified_severity text,
    notified_action text,
    acknowledged_by text,
    acknowledged_at timestamptz,
    resolved_by     text,
    resolved_at     timestamptz,
    note            text
);
CREATE UNIQUE INDEX key_alerts_one_per_rule ON key_alerts (subject, rule) WHERE status <> 'resolved';
CREATE INDEX key_alerts_key_idx ON key_alerts (api_key_id, created_at);
CREATE INDEX key_alerts_status_idx ON key_alerts (status, last_seen);

-- Receivers of signed webhooks. The secret signs (HMAC-SHA256): it has to
-- be kept to sign, unlike an API key; it is shown once and never logged.
CREATE TABLE webhook_endpoints (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         text NOT NULL CHECK (url ~ '^https?://'),
    secret      text NOT NULL,
    event_types text[] NOT NULL DEFAULT '{}',  -- empty: every event type
    description text,
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One message per endpoint; body is the exact bytes signed and sent, the
-- same on every retry (id = the webhook-id header, the receiver's dedup key).
CREATE TABLE webhook_deliveries (
    id              text PRIMARY KEY,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id),
    event_type      text NOT NULL,
    body            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

-- Every attempt, successful or not.
CREATE TABLE webhook_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  text NOT NULL REFERENCES webhook_deliveries (id),
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    error        text,
    duration_ms  double precision NOT NULL
);
CREATE INDEX webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, attempt);
