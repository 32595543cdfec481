-- 0001: tiers, users, API keys.
-- Identifiers are UUIDs (as in the seeds); every timestamp is timestamptz and
-- every "day" in this schema is a UTC date.

CREATE TABLE access_tiers (
    id                    smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                  text NOT NULL UNIQUE,
    daily_quota           bigint CHECK (daily_quota IS NULL OR daily_quota > 0), -- NULL = unlimited
    rate_limit_per_minute integer NOT NULL CHECK (rate_limit_per_minute > 0),
    features              jsonb NOT NULL DEFAULT '{}'::jsonb,
    price_monthly         numeric(12, 2) NOT NULL DEFAULT 0 CHECK (price_monthly >= 0),
    created_at            timestamptz NOT NULL DEFAULT now()
);

INSERT INTO access_tiers (name, daily_quota, rate_limit_per_minute, features, price_monthly) VALUES
    ('free',       1000,   10,   '{"support": "community"}', 0),
    ('pro',        100000, 100,  '{"support": "email"}',     49),
    ('enterprise', NULL,   1000, '{"support": "sla"}',       499);

CREATE TABLE users (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email      text NOT NULL,
    name       text,
    tier_id    smallint NOT NULL REFERENCES access_tiers (id),
    status     text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'deleted')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE api_keys (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id           uuid NOT NULL REFERENCES users (id),
    name              text,
    prefix            text NOT NULL,                 -- shown to humans, e.g. mk_live_3f9a1c2b
    key_hash          text NOT NULL,                 -- hex SHA-256 / HMAC-SHA256; never the key
    environment       text NOT NULL DEFAULT 'live' CHECK (environment IN ('live', 'test')),
    scopes            text[] NOT NULL DEFAULT '{}',
    ip_allowlist      cidr[],                        -- NULL = any address
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'rotating', 'revoked', 'deleted')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    last_used_at      timestamptz,
    rotates_at        timestamptz,                   -- end of the grace period while rotating
    rotated_from      uuid REFERENCES api_keys (id), -- lineage: the key this one replaced
    revoked_at        timestamptz,
    revocation_reason text,
    deleted_at        timestamptz,                   -- soft delete only
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash),
    CONSTRAINT api_keys_rotating_has_deadline CHECK (status <> 'rotating' OR rotates_at IS NOT NULL),
    CONSTRAINT api_keys_revoked_has_time CHECK (status <> 'revoked' OR revoked_at IS NOT NULL)
);
-- api_keys(key_hash) is indexed by its UNIQUE constraint.
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
CREATE UNIQUE INDEX api_keys_prefix_key ON api_keys (prefix);
