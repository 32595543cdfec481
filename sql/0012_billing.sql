-- Billing: versioned tier prices, each user's tier history, and invoices
-- that never change once final (DESIGN.md, "Billing"; docs/billing.md).
SET LOCAL lock_timeout = '10s';

-- A tier's price, versioned: a change is a new row from a UTC day on, so
-- re-billing a month reads the prices that were in effect then. Rows are
-- never updated; one not yet used by any invoice may be replaced.
CREATE TABLE tier_prices (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tier_id        smallint NOT NULL REFERENCES access_tiers (id),
    effective_from date NOT NULL,             -- UTC day; '-infinity': since the tier began
    currency       text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    base_monthly   numeric(12, 2) NOT NULL CHECK (base_monthly >= 0),
    included_units bigint NOT NULL CHECK (included_units >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL DEFAULT current_user,
    CONSTRAINT tier_prices_one_per_day UNIQUE (tier_id, effective_from)
);
COMMENT ON TABLE tier_prices IS
    'tier prices by version: the row with the latest effective_from <= a day prices that day';
COMMENT ON COLUMN tier_prices.included_units IS 'billable units included each month (prorated by day)';

-- Overage, graduated: a band's price per 1,000 units applies to the overage
-- units from from_units up to the next band's from_units. No bands: overage is free.
CREATE TABLE tier_price_bands (
    price_id   bigint NOT NULL REFERENCES tier_prices (id) ON DELETE CASCADE,
    from_units bigint NOT NULL CHECK (from_units >= 0),
    per_1000   numeric(14, 6) NOT NULL CHECK (per_1000 >= 0),
    PRIMARY KEY (price_id, from_units)
);

-- Every tier so far gets a first version from the seeds' price_monthly.
INSERT INTO tier_prices (tier_id, effective_from, currency, base_monthly, included_units)
SELECT id, '-infinity', 'USD', price_monthly,
       CASE name WHEN 'free' THEN 30000 WHEN 'pro' THEN 1000000 WHEN 'enterprise' THEN 20000000
                 ELSE 0 END
FROM access_tiers;
INSERT INTO tier_price_bands (price_id, from_units, per_1000)
SELECT p.id, b.from_units, b.per_1000
FROM tier_prices p
JOIN access_tiers t ON t.id = p.tier_id
JOIN (VALUES ('pro', 0, 0.50), ('pro', 4000000, 0.30), ('enterprise', 0, 0.20))
     AS b (tier, from_units, per_1000) ON b.tier = t.name;

-- A tier created later starts with its price_monthly, no included units, no overage.
CREATE FUNCTION access_tiers_first_price() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tier_prices (tier_id, effective_from, currency, base_monthly, included_units)
    VALUES (NEW.id, '-infinity', 'USD', NEW.price_monthly, 0);
    RETURN NULL;
END
$$;
CREATE TRIGGER access_tiers_first_price AFTER INSERT ON access_tiers
    FOR EACH ROW EXECUTE FUNCTION access_tiers_first_price();
COMMENT ON COLUMN access_tiers.price_monthly IS
    'the base price of the tier''s newest price version (the seeds'' column); billing reads tier_prices';

-- Which tier each user was on, by UTC day: a change takes effect on the day
-- it is made (the last change of a day wins). Kept by the trigger below.
CREATE TABLE user_tier_history (
    user_id        uuid NOT NULL REFERENCES users (id),
    effective_from date NOT NULL,
    tier_id        smallint NOT NULL REFERENCES access_tiers (id),
    changed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, effective_from)
);

CREATE FUNCTION users_tier_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.tier_id IS NOT DISTINCT FROM OLD.tier_id THEN
        RETURN NULL;
    END IF;
    INSERT INTO user_tier_history (user_id, effective_from, tier_id)
    VALUES (NEW.id,
            CASE TG_OP WHEN 'INSERT' THEN (NEW.created_at AT TIME ZONE 'UTC')::date
                       ELSE (now() AT TIME ZONE 'UTC')::date END,
            NEW.tier_id)
    ON CONFLICT (user_id, effective_from)
    DO UPDATE SET tier_id = excluded.tier_id, changed_at = now();
    RETURN NULL;
END
$$;
CREATE TRIGGER users_tier_history AFTER INSERT OR UPDATE OF tier_id ON users
    FOR EACH ROW EXECUTE FUNCTION users_tier_history();

INSERT INTO user_tier_history (user_id, effective_from, tier_id)
SELECT id, (created_at AT TIME ZONE 'UTC')::date, tier_id FROM users;

-- One invoice per user and month. A draft is recomputed by every
-- `metering bill` run; a final one never changes (the triggers below):
-- later usage of its month becomes an adjustment line on a later invoice.
CREATE SEQUENCE invoice_numbers;
CREATE TABLE invoices (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    number         text UNIQUE,                -- given at finalization
    user_id        uuid NOT NULL REFERENCES users (id),
    month          date NOT NULL CHECK (extract(day FROM month) = 1),
    currency       text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status         text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'final')),
    subtotal       numeric(14, 2) NOT NULL,    -- the month's own lines
    adjustments    numeric(14, 2) NOT NULL DEFAULT 0,  -- corrections of earlier final invoices
    total          numeric(14, 2) NOT NULL,
    units          bigint NOT NULL,            -- the month's billable units, as billed
    requests       bigint NOT NULL,            -- the month's served requests, as billed
    content_hash   text NOT NULL,              -- of the lines and usage: a re-run that changes nothing writes nothing
    computed_at    timestamptz NOT NULL DEFAULT now(),
    finalized_at   timestamptz,
    finalized_by   text,
    CONSTRAINT invoices_one_per_month UNIQUE (user_id, month),
    CONSTRAINT invoices_total CHECK (total = subtotal + adjustments),
    CONSTRAINT invoices_final_has_number CHECK (status = 'draft' OR (number IS NOT NULL AND finalized_at IS NOT NULL))
);
CREATE INDEX invoices_month_idx ON invoices (month, status);

CREATE TABLE invoice_lines (
    invoice_id     bigint NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    line_no        smallint NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('base', 'overage', 'adjustment')),
    tier           text,
    description    text NOT NULL,
    quantity       numeric(20, 4) NOT NULL,    -- days, or units
    unit_price     numeric(24, 10),            -- per day, or per 1,000 units; NULL for adjustments
    amount         numeric(14, 2) NOT NULL,
    first_day      date NOT NULL,
    last_day       date NOT NULL,
    price_id       bigint REFERENCES tier_prices (id),
    -- adjustments: the final invoice (and month) they correct, and by how many units
    refers_to      bigint REFERENCES invoices (id),
    refers_to_month date,
    units_delta    bigint,
    PRIMARY KEY (invoice_id, line_no),
    CONSTRAINT invoice_lines_adjustment_refers CHECK ((kind = 'adjustment') = (refers_to IS NOT NULL))
);
CREATE INDEX invoice_lines_refers_idx ON invoice_lines (refers_to) WHERE refers_to IS NOT NULL;

-- The usage each invoice billed, per day: what the PDF shows, and what
-- later usage is compared with.
CREATE TABLE invoice_usage (
    invoice_id bigint NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    date       date NOT NULL,
    requests   bigint NOT NULL,
    units      bigint NOT NULL,
    PRIMARY KEY (invoice_id, date)
);

-- A month is billed (drafts), then final as a whole: months finalize in
-- order, and a final month is never billed again.
CREATE TABLE billing_months (
    month        date PRIMARY KEY CHECK (extract(day FROM month) = 1),
    status       text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'final')),
    billed_at    timestamptz NOT NULL DEFAULT now(),
    finalized_at timestamptz,
    finalized_by text,
    CONSTRAINT billing_months_final_has_time CHECK (status = 'draft' OR finalized_at IS NOT NULL)
);

-- Final means final: no statement, by any role that owns these tables or
-- not, changes a final invoice, its lines or its usage.
CREATE FUNCTION invoices_final_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'final' THEN
        RAISE EXCEPTION '% % is final and cannot change', TG_TABLE_NAME,
            to_jsonb(OLD) ->> CASE TG_TABLE_NAME WHEN 'invoices' THEN 'number' ELSE 'month' END
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER invoices_final_guard BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_final_guard();
CREATE TRIGGER billing_months_final_guard BEFORE UPDATE OR DELETE ON billing_months
    FOR EACH ROW EXECUTE FUNCTION invoices_final_guard();

-- A line or usage row of a final invoice: not added, changed, moved in or out.
CREATE FUNCTION invoice_children_final_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM invoices
               WHERE status = 'final'
                 AND id IN (CASE WHEN TG_OP <> 'DELETE' THEN NEW.invoice_id END,
                            CASE WHEN TG_OP <> 'INSERT' THEN OLD.invoice_id END)) THEN
        RAISE EXCEPTION 'invoice of % is final and cannot change', TG_TABLE_NAME
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER invoice_lines_final_guard BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION invoice_children_final_guard();
CREATE TRIGGER invoice_usage_final_guard BEFORE INSERT OR UPDATE OR DELETE ON invoice_usage
    FOR EACH ROW EXECUTE FUNCTION invoice_children_final_guard();

-- TRUNCATE skips row triggers: refused outright once anything is final.
CREATE FUNCTION invoices_truncate_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM billing_months WHERE status = 'final')
       OR EXISTS (SELECT 1 FROM invoices WHERE status = 'final') THEN
        RAISE EXCEPTION 'TRUNCATE % refused: final invoices cannot change', TG_TABLE_NAME
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER invoices_truncate_guard BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_truncate_guard();
CREATE TRIGGER invoice_lines_truncate_guard BEFORE TRUNCATE ON invoice_lines
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_truncate_guard();
CREATE TRIGGER invoice_usage_truncate_guard BEFORE TRUNCATE ON invoice_usage
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_truncate_guard();
CREATE TRIGGER billing_months_truncate_guard BEFORE TRUNCATE ON billing_months
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_truncate_guard();
