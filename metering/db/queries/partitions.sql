-- usage_logs' month partitions (metering.db.lifecycle).

-- name: usage_partitions
-- Every partition of usage_logs, oldest first; is_default marks a DEFAULT
-- partition (there should never be one: rows must land in their month).
SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'usage_logs'::regclass
ORDER BY c.relname;

-- name: partitions_lock
-- The lock partition creation takes (0002, 0005): one change of the set at a time.
SELECT pg_advisory_xact_lock(hashtext('metering:usage_logs:partitions'));

-- name: table_columns
-- A table's columns in order ($1 its name).
SELECT a.attname
FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;
