"""The raw log's month partitions, from creation to archive and drop.

* **Ahead**: the partitions from last month to ``months_ahead`` months on
  exist, so no event waits for one and none can land anywhere else
  (``usage_logs`` has no default partition; the writer also creates a
  missing month before it writes).
* **Retention**: a month whose end is more than ``retention_days`` ago is
  expired. With an archive folder, each expired month is first written with
  ``COPY ... TO STDOUT`` as gzip-compressed CSV (``usage_logs_y2026m06.csv.gz``)
  beside a manifest (rows, SHA-256, columns); the rows are counted in the
  same snapshot, under a lock that keeps writers out, and the file is read
  back and counted again. Only then is the partition detached and dropped,
  in the same transaction. ``daily_usage``, ``daily_endpoint_usage`` (with
  the latency histograms) and invoices are separate tables and stay.

``metering db maintain`` runs all of it; the workers' housekeeping creates
months ahead, and drops expired ones only when no archive is configured (an
archive belongs on the operator's storage, not on whichever worker runs).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from metering.db.partitions import month_partition
from metering.db.queries import get as q
from metering.errors import MeteringError

log = logging.getLogger(__name__)
_NAME = re.compile(r"^usage_logs_y(\d{4})m(\d{2})$")


class ArchiveError(MeteringError):
    """An archive did not hold every row: the partition is kept."""


@dataclass(frozen=True, slots=True)
class Archive:
    partition: str
    rows: int
    path: Path
    sha256: str


@dataclass(slots=True)
class Maintenance:
    created: list[str] = field(default_factory=list)  # partitions that exist ahead (new or not)
    archived: list[Archive] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    default_partition: str | None = None  # there should never be one


def add_months(ts: datetime, months: int) -> datetime:
    index = ts.year * 12 + ts.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


async def maintain(
    conn: asyncpg.Connection,
    *,
    months_ahead: int,
    retention_days: int,
    archive_dir: str | Path | None = None,
    drop: bool = True,
    now: datetime | None = None,
) -> Maintenance:
    now = (now or datetime.now(UTC)).astimezone(UTC)
    out = Maintenance()
    this_month = month_partition(now).start
    cutoff = now - timedelta(days=retention_days)
    for m in range(-1, months_ahead + 1):
        start = add_months(this_month, m)
        if month_partition(start).end > cutoff:  # never a month that is already expired
            out.created.append(await conn.fetchval(q("ensure_month_partition"), start))
    parts = await conn.fetch(q("usage_partitions"))
    out.default_partition = next((r["name"] for r in parts if r["is_default"]), None)
    if out.default_partition:
        log.error("usage_logs has a DEFAULT partition %s: rows belong in their month",
                  out.default_partition)  # fmt: skip
    if not drop:
        return out
    for r in parts:
        match = _NAME.match(r["name"])
        if not match:
            continue
        start = datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)
        if month_partition(start).end > cutoff:
            continue
        async with conn.transaction():
            await conn.execute(q("partitions_lock"))
            if archive_dir is not None:
                out.archived.append(await archive(conn, r["name"], Path(archive_dir)))
            await conn.execute(f'ALTER TABLE usage_logs DETACH PARTITION "{r["name"]}"')
            await conn.execute(f'DROP TABLE "{r["name"]}"')
        out.dropped.append(r["name"])
    return out


async def archive(conn: asyncpg.Connection, partition: str, folder: Path) -> Archive:
    """Write ``partition`` to ``folder`` (inside the caller's transaction) and check it."""
    if not _NAME.match(partition):
        raise ValueError(f"not a usage_logs partition: {partition!r}")
    # blocking file I/O: archives are written by `metering db maintain`, never in a worker
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    await conn.execute(f'LOCK TABLE "{partition}" IN SHARE MODE')  # writers wait; readers do not
    expected = await conn.fetchval(f'SELECT count(*) FROM "{partition}"')
    final = folder / f"{partition}.csv.gz"
    manifest_path = folder / f"{partition}.json"
    if final.exists():  # an earlier run wrote it and stopped before the drop committed
        done = _earlier(final, manifest_path, expected)
        if done is None:
            raise ArchiveError(
                f"{final} exists and does not hold the partition's {expected} rows; "
                "move it away, then run again (the partition is kept)"
            )
        return Archive(partition, expected, final, done)
    part = final.with_suffix(".gz.part")
    with gzip.open(part, "wb", compresslevel=6) as out:

        async def write(chunk: bytes) -> None:
            out.write(chunk)

        status = await conn.copy_from_table(partition, output=write, format="csv", header=True)
    copied = int(status.split()[-1])
    read_back = _count_rows(part)
    if not expected == copied == read_back:
        part.unlink(missing_ok=True)
        raise ArchiveError(
            f"{partition}: {expected} rows, COPY wrote {copied}, the file holds {read_back}; kept"
        )
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    columns = [r["attname"] for r in await conn.fetch(q("table_columns"), partition)]
    manifest = {
        "partition": partition,
        "rows": expected,
        "file": final.name,
        "sha256": digest,
        "format": "csv, header, gzip",
        "columns": columns,
        "archived_at": datetime.now(UTC).isoformat(),
    }
    _durable(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    _fsync(part)
    os.replace(part, final)
    _fsync(folder)  # the rename and the manifest survive a crash before the DROP commits
    return Archive(partition, expected, final, digest)


def _earlier(final: Path, manifest: Path, rows: int) -> str | None:
    """The digest of an archive already written for these ``rows``, if it is whole."""
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    if meta.get("rows") != rows or meta.get("sha256") != digest or _count_rows(final) != rows:
        return None
    return digest


def _durable(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_rows(path: Path) -> int:
    with gzip.open(path, "rb") as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        next(reader, None)  # the header
        return sum(1 for _ in reader)
