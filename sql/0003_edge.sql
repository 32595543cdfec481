-- 0003: what the edge needs from keys and tiers.

-- Shadow mode: limits are computed, reported in headers and metrics, but
-- nothing is rejected. Per tier, and per key (NULL = the tier's mode).
ALTER TABLE access_tiers
    ADD COLUMN limits_mode text NOT NULL DEFAULT 'enforce'
        CHECK (limits_mode IN ('enforce', 'shadow'));
ALTER TABLE api_keys
    ADD COLUMN limits_mode text CHECK (limits_mode IN ('enforce', 'shadow'));

-- Keys that can still authenticate, for the verifier's lookup by hash.
CREATE INDEX api_keys_live_idx ON api_keys (key_hash) WHERE status IN ('active', 'rotating');

-- Audit trail of key lifecycle changes (who did what, never the key).
CREATE TABLE api_key_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    api_key_id uuid NOT NULL REFERENCES api_keys (id),
    action     text NOT NULL CHECK (action IN ('created', 'rotated', 'revoked', 'deleted')),
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb,
    actor      text NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_key_events_key_idx ON api_key_events (api_key_id, created_at);
