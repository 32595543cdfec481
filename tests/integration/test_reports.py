"""`metering report` against the real database: a customer's statement, its
PNG chart (whose figures are checked against daily_usage) and CSV, and the
top consumers; bad arguments get one line and exit 2."""

from __future__ import annotations

import csv
import json
from datetime import date

from PIL import Image

from metering.billing.service import Billing
from metering.dev.usage_data import fill_month, make_users
from metering.settings import Settings
from tests.integration.test_cli import run_cli

OCT = date(2026, 10, 1)


async def test_a_statement_with_its_chart_and_csv_matches_daily_usage(database_url, db, tmp_path):
    s = Settings.from_env(database_url=database_url)
    keys = await make_users(db, 6)
    await fill_month(db, keys, OCT, per_key=300)
    user = keys[0][0]
    await Billing(db).bill(OCT)
    email = await db.fetchval("SELECT email FROM users WHERE id = $1", user)
    png, sheet = tmp_path / "october.png", tmp_path / "october.csv"
    out = run_cli(s, "report", "--user", email, "--month", "2026-10", "--png", str(png),
                  "--csv", str(sheet))  # fmt: skip
    assert out.returncode == 0, out.stderr
    daily = await db.fetch(
        "SELECT date, request_count - rejected_count AS served, rejected_count, units, "
        "client_error_count, server_error_count FROM daily_usage "
        "WHERE user_id = $1 AND date >= '2026-10-01' AND date < '2026-11-01' ORDER BY date",
        user,
    )
    assert len(daily) >= 25
    served = sum(r["served"] for r in daily)
    assert f"{served:,} requests served" in out.stdout and "invoice draft" in out.stdout

    rows = list(csv.DictReader(sheet.read_text().splitlines()))
    assert [(r["date"], int(r["served"]), int(r["refused"]), int(r["units"]),
             int(r["client_errors"]), int(r["server_errors"])) for r in rows] == [
        (d["date"].isoformat(), d["served"], d["rejected_count"], d["units"],
         d["client_error_count"], d["server_error_count"]) for d in daily
    ]  # fmt: skip
    assert all(0 < float(r["p50_ms"]) <= float(r["p95_ms"]) <= float(r["p99_ms"]) for r in rows)

    image = Image.open(png)
    assert image.format == "PNG" and image.size == (1000, 650) and png.stat().st_size > 20_000
    plotted = json.loads(image.text["Description"])
    assert plotted["month"] == "2026-10" and plotted["user_id"] == str(user)
    assert [(d["date"], d["served"], d["refused"], d["client_errors"] + d["server_errors"])
            for d in plotted["days"]] == [
        (r["date"].isoformat(), r["served"], r["rejected_count"],
         r["client_error_count"] + r["server_error_count"]) for r in daily
    ]  # fmt: skip
    p95 = await db.fetchval(
        "SELECT latency_quantile(hist_concat(latency_buckets), hist_concat(latency_counts), 0.95) "
        "FROM daily_endpoint_usage WHERE user_id = $1 AND date = $2",
        user,
        daily[0]["date"],
    )
    assert plotted["days"][0]["p95_ms"] == p95

    top = run_cli(s, "report", "--top", "3", "--month", "2026-10")
    assert top.returncode == 0, top.stderr
    leaders = await db.fetch(
        "SELECT u.email, sum(d.units) AS units FROM daily_usage d JOIN users u ON u.id = d.user_id "
        "WHERE d.date >= '2026-10-01' AND d.date < '2026-11-01' GROUP BY u.email "
        "ORDER BY units DESC LIMIT 3"
    )
    lines = [ln for ln in top.stdout.splitlines() if "@example.com" in ln]
    assert len(lines) == 3
    for line, leader in zip(lines, leaders, strict=True):
        assert leader["email"] in line and f"{leader['units']:,}" in line


def test_bad_report_arguments_get_one_line_and_exit_2(services):
    s = Settings.from_env()
    for args, text in [
        (("report",), "one of the arguments"),
        (("report", "--top", "0"), "must be >= 1"),
        (("report", "--top", "3", "--png", "x.png"), "go with --user"),
        (("report", "--user", "nobody-at-all@example.invalid"), "unknown user"),
        (("report", "--user", "x@example.com", "--month", "10/2026"), "not a month"),
    ]:
        out = run_cli(s, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert text in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
