"""Months finalize by themselves: each worker checks every few minutes for a
month past its grace period and finalizes it (metering.billing.service; one
advisory lock makes two workers, or a worker and an operator, take turns).
A failure (PostgreSQL down, a price missing) is logged and tried again at
the next check; the consumer never waits for it."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import faust

from metering.settings import Settings

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 300.0
FIRST_CHECK_DELAY_S = 5.0
BY = "worker (grace period over)"


async def finalize_due(settings: Settings) -> int:
    """Finalize every month past its grace period; how many invoices became final."""
    from metering.billing.service import Billing
    from metering.db import connect

    conn = await connect(settings.database_url)
    try:
        runs = await Billing(conn).finalize_due(
            grace=timedelta(days=settings.billing_grace_days), by=BY
        )
    finally:
        await conn.close()
    for run in runs:
        log.warning(
            "finalized %s: %d invoices (%d adjustments)",
            f"{run.month:%Y-%m}",
            run.finalized,
            run.adjustments,
        )
    return sum(run.finalized for run in runs)


def add_billing(app: faust.App, settings: Settings) -> None:
    if not settings.billing_auto_finalize:
        return

    async def check() -> None:
        try:
            await finalize_due(settings)
        except Exception as exc:  # retried at the next check; never stops the worker
            log.warning(
                "finalizing due months failed (retried in %.0f s): %s", CHECK_INTERVAL_S, exc
            )

    @app.task
    async def finalize_on_start() -> None:
        await asyncio.sleep(FIRST_CHECK_DELAY_S)
        await check()

    @app.timer(interval=CHECK_INTERVAL_S)
    async def finalize_timer() -> None:
        await check()
