-- Billing: prices, tier histories, invoices (metering.billing).

-- name: billing_lock
-- One billing run at a time (bill, finalize, a price change), taken for the
-- session before the run's snapshot; billing_unlock releases it.
SELECT pg_advisory_lock(hashtext('metering:billing'));

-- name: billing_unlock
SELECT pg_advisory_unlock(hashtext('metering:billing'));

-- name: billing_latest_final
SELECT max(month) FROM billing_months WHERE status = 'final';

-- name: billing_month_status
SELECT status FROM billing_months WHERE month = $1;

-- name: billing_month_draft_before
-- The earliest billed month before $1 that is not final yet (months finalize in order).
SELECT month FROM billing_months WHERE status = 'draft' AND month < $1 ORDER BY month LIMIT 1;

-- name: billing_month_billed
INSERT INTO billing_months (month) VALUES ($1)
ON CONFLICT (month) DO UPDATE SET billed_at = now();

-- name: billing_month_finalize
INSERT INTO billing_months (month, status, finalized_at, finalized_by) VALUES ($1, 'final', now(), $2)
ON CONFLICT (month) DO UPDATE SET status = 'final', finalized_at = now(), finalized_by = $2;

-- name: billing_users
-- Users billed for the month from $1 to $2: on a tier by its last day, and
-- not deleted, or deleted with billable usage in the month; $3 only these (NULL: all).
SELECT u.id, u.email
FROM users u
WHERE EXISTS (SELECT 1 FROM user_tier_history h WHERE h.user_id = u.id AND h.effective_from <= $2)
  AND (u.status <> 'deleted'
       OR EXISTS (SELECT 1 FROM daily_usage d
                  WHERE d.user_id = u.id AND d.date BETWEEN $1 AND $2 AND d.units > 0))
  AND ($3::uuid[] IS NULL OR u.id = ANY ($3))
ORDER BY u.id;

-- name: billing_history
-- The tier entries that shape the month from $1 to $2: the one in effect on
-- its first day and those made during it, oldest first ($3: users or NULL).
SELECT h.user_id, h.effective_from, h.tier_id, t.name AS tier
FROM user_tier_history h
JOIN access_tiers t ON t.id = h.tier_id
WHERE h.effective_from <= $2
  AND ($3::uuid[] IS NULL OR h.user_id = ANY ($3))
  AND h.effective_from >= coalesce(
        (SELECT max(p.effective_from) FROM user_tier_history p
         WHERE p.user_id = h.user_id AND p.effective_from <= $1), '-infinity')
ORDER BY h.user_id, h.effective_from;

-- name: billing_prices
-- Every price version with its bands (from_units and per_1000 in step).
SELECT p.id, p.tier_id, p.effective_from, p.currency, p.base_monthly, p.included_units,
       coalesce(array_agg(b.from_units ORDER BY b.from_units) FILTER (WHERE b.price_id IS NOT NULL),
                '{}') AS band_from,
       coalesce(array_agg(b.per_1000 ORDER BY b.from_units) FILTER (WHERE b.price_id IS NOT NULL),
                '{}') AS band_price
FROM tier_prices p
LEFT JOIN tier_price_bands b ON b.price_id = p.id
GROUP BY p.id
ORDER BY p.tier_id, p.effective_from;

-- name: billing_usage
-- Billable usage per user and day from $1 to $2 ($3: users or NULL): what the edge served.
SELECT user_id, date, request_count - rejected_count AS requests, units
FROM daily_usage
WHERE date BETWEEN $1 AND $2
  AND ($3::uuid[] IS NULL OR user_id = ANY ($3))
  AND (request_count - rejected_count > 0 OR units > 0);

-- name: billing_existing
SELECT id, user_id, status, content_hash FROM invoices WHERE month = $1;

-- name: billing_late
-- Final invoices of months before $1 whose billable units changed after
-- they were final (late events, a rebuild), net of the adjustments already
-- on final invoices. A draft month in between carries them, not $1.
SELECT i.id, i.number, i.user_id, i.month, i.currency, i.subtotal, i.units,
       coalesce(adj.units, 0)::bigint AS adjusted_units,
       coalesce(adj.amount, 0) AS adjusted_amount,
       cur.units AS current_units
FROM invoices i
CROSS JOIN LATERAL (
    SELECT coalesce(sum(d.units), 0)::bigint AS units
    FROM daily_usage d
    WHERE d.user_id = i.user_id
      AND d.date >= i.month AND d.date < (i.month + interval '1 month')::date
) cur
LEFT JOIN LATERAL (
    SELECT sum(l.units_delta) AS units, sum(l.amount) AS amount
    FROM invoice_lines l
    JOIN invoices o ON o.id = l.invoice_id
    WHERE l.refers_to = i.id AND o.status = 'final'
) adj ON true
WHERE i.status = 'final'
  AND i.month < $1
  AND ($2::uuid[] IS NULL OR i.user_id = ANY ($2))
  AND cur.units <> i.units + coalesce(adj.units, 0)
  AND NOT EXISTS (SELECT 1 FROM billing_months m
                  WHERE m.status = 'draft' AND m.month > i.month AND m.month < $1)
ORDER BY i.user_id, i.month;

-- name: billing_periods_of
-- The base lines of invoices $1: their periods, tiers and price versions.
SELECT invoice_id, tier, price_id, first_day, last_day
FROM invoice_lines
WHERE invoice_id = ANY ($1) AND kind = 'base'
ORDER BY invoice_id, first_day;

-- name: billing_usage_of
-- Billable units per day of the (user, month) pairs $1, $2.
SELECT d.user_id, f.month, d.date, d.units
FROM unnest($1::uuid[], $2::date[]) AS f (user_id, month)
JOIN daily_usage d
  ON d.user_id = f.user_id
 AND d.date >= f.month AND d.date < (f.month + interval '1 month')::date;

-- name: billing_upsert_invoices
-- Drafts for month $1, one per user; a final invoice is never touched.
INSERT INTO invoices (user_id, month, currency, subtotal, adjustments, total, units, requests,
                      content_hash)
SELECT f.user_id, $1, f.currency, f.subtotal, f.adjustments, f.subtotal + f.adjustments,
       f.units, f.requests, f.content_hash
FROM unnest($2::uuid[], $3::text[], $4::numeric[], $5::numeric[], $6::bigint[], $7::bigint[],
            $8::text[]) AS f (user_id, currency, subtotal, adjustments, units, requests, content_hash)
ON CONFLICT (user_id, month) DO UPDATE
SET currency = excluded.currency, subtotal = excluded.subtotal,
    adjustments = excluded.adjustments, total = excluded.total, units = excluded.units,
    requests = excluded.requests, content_hash = excluded.content_hash, computed_at = now()
WHERE invoices.status = 'draft'
RETURNING id, user_id;

-- name: billing_clear_lines
DELETE FROM invoice_lines WHERE invoice_id = ANY ($1);

-- name: billing_clear_usage
DELETE FROM invoice_usage WHERE invoice_id = ANY ($1);

-- name: billing_drop_drafts
-- Drafts of month $1 for users no longer billed (not in $2).
DELETE FROM invoices WHERE month = $1 AND status = 'draft' AND NOT (user_id = ANY ($2));

-- name: billing_finalize_invoices
-- Every draft of month $1 becomes final, numbered in the order of its users.
WITH drafts AS (
    SELECT id FROM invoices WHERE month = $1 AND status = 'draft' ORDER BY user_id FOR UPDATE
), numbered AS (
    SELECT id, nextval('invoice_numbers') AS n FROM drafts
)
UPDATE invoices i
SET status = 'final',
    number = 'INV-' || to_char($1::date, 'YYYYMM') || '-' || lpad(numbered.n::text, 6, '0'),
    finalized_at = now(),
    finalized_by = $2
FROM numbered
WHERE i.id = numbered.id;

-- name: list_invoices
-- Newest month first; $1 month or NULL, $2 user or NULL, $3 status or NULL, $4 the most.
SELECT i.id, i.number, i.user_id, u.email, i.month, i.currency, i.status, i.subtotal,
       i.adjustments, i.total, i.units, i.requests, i.computed_at, i.finalized_at, i.finalized_by
FROM invoices i
JOIN users u ON u.id = i.user_id
WHERE ($1::date IS NULL OR i.month = $1)
  AND ($2::uuid IS NULL OR i.user_id = $2)
  AND ($3::text IS NULL OR i.status = $3)
ORDER BY i.month DESC, i.total DESC, i.id
LIMIT $4;

-- name: invoice_by_ref
-- One invoice by id ($1) or number ($2).
SELECT i.id, i.number, i.user_id, u.email, u.name AS user_name, i.month, i.currency, i.status, i.subtotal,
       i.adjustments, i.total, i.units, i.requests, i.computed_at, i.finalized_at, i.finalized_by
FROM invoices i
JOIN users u ON u.id = i.user_id
WHERE i.id = $1 OR i.number = $2;

-- name: invoice_lines_of
SELECT line_no, kind, tier, description, quantity, unit_price, amount, first_day, last_day,
       price_id, refers_to, refers_to_month, units_delta
FROM invoice_lines WHERE invoice_id = $1 ORDER BY line_no;

-- name: invoice_usage_of
SELECT date, requests, units FROM invoice_usage WHERE invoice_id = $1 ORDER BY date;

-- name: tier_prices_of
-- A tier's price versions, newest first, with the invoices that used each.
SELECT p.id, p.effective_from, p.currency, p.base_monthly, p.included_units, p.created_at,
       p.created_by,
       coalesce(array_agg(b.from_units ORDER BY b.from_units) FILTER (WHERE b.price_id IS NOT NULL),
                '{}') AS band_from,
       coalesce(array_agg(b.per_1000 ORDER BY b.from_units) FILTER (WHERE b.price_id IS NOT NULL),
                '{}') AS band_price,
       (SELECT count(DISTINCT l.invoice_id) FROM invoice_lines l WHERE l.price_id = p.id) AS invoices
FROM tier_prices p
JOIN access_tiers t ON t.id = p.tier_id
LEFT JOIN tier_price_bands b ON b.price_id = p.id
WHERE t.name = $1
GROUP BY p.id
ORDER BY p.effective_from DESC;

-- name: tier_price_at
-- The version of tier $1 that takes effect on day $2 exactly, and whether an invoice used it.
SELECT p.id, EXISTS (SELECT 1 FROM invoice_lines l WHERE l.price_id = p.id) AS used
FROM tier_prices p
WHERE p.tier_id = $1 AND p.effective_from = $2;

-- name: tier_price_delete
DELETE FROM tier_prices WHERE id = $1;

-- name: tier_price_insert
INSERT INTO tier_prices (tier_id, effective_from, currency, base_monthly, included_units)
VALUES ($1, $2, $3, $4, $5)
RETURNING id;

-- name: tier_price_bands_insert
INSERT INTO tier_price_bands (price_id, from_units, per_1000)
SELECT $1, f.from_units, f.per_1000
FROM unnest($2::bigint[], $3::numeric[]) AS f (from_units, per_1000);

-- name: tier_price_sync
-- access_tiers.price_monthly follows the newest version's base price.
UPDATE access_tiers t
SET price_monthly = (SELECT p.base_monthly FROM tier_prices p WHERE p.tier_id = t.id
                     ORDER BY p.effective_from DESC LIMIT 1)
WHERE t.id = $1;

-- name: billing_final_month_from
-- The latest final month on or after $1, if any (a price cannot change there).
SELECT max(month) FROM billing_months WHERE status = 'final' AND month >= $1;
