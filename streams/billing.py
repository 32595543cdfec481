"""Months finalize by themselves: every few minutes each worker asks whether
a month is past its grace period (two small reads), and only then runs
``metering invoices finalize --due`` as a child process, which finalizes,
in order, every such month (metering.billing.service; one advisory lock
makes two workers, or a worker and an operator, take turns).

A child process, because pricing every customer is seconds of CPU: on the
worker's event loop it would stall the stream and its group heartbeats. It
inherits the worker's environment (its METERING_* settings). A failure
(PostgreSQL down, a price missing) is logged and tried again at the next
check; the consumer never waits for it."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import timedelta

import faust

from metering.settings import Settings

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 300.0
FIRST_CHECK_DELAY_S = 5.0
RUN_TIMEOUT_S = 1800.0
BY = "worker (grace period over)"


async def finalize_due() -> int:
    """Run ``metering invoices finalize --due``; its exit status."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "metering.cli", "invoices", "finalize", "--due", "--by", BY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("finalizing due months took over %.0f s; stopped, retried later", RUN_TIMEOUT_S)
        return -1
    text = out.decode(errors="replace").strip()
    if proc.returncode:
        log.warning("finalizing due months failed (retried in %.0f s): %s", CHECK_INTERVAL_S, text)
    elif text.startswith("finalized"):
        log.warning("%s", text)
    return proc.returncode or 0


async def anything_due(settings: Settings) -> bool:
    from metering.billing.service import Billing
    from metering.db import connect

    conn = await connect(settings.database_url)
    try:
        grace = timedelta(days=settings.billing_grace_days)
        return bool(await Billing(conn).due_months(grace=grace))
    finally:
        await conn.close()


async def check(settings: Settings) -> None:
    try:
        due = await anything_due(settings)
    except Exception as exc:  # PostgreSQL away: the next check asks again
        log.warning("checking for months to finalize failed (retried): %s", exc)
        return
    if due:
        await finalize_due()


def add_billing(app: faust.App, settings: Settings) -> None:
    if not settings.billing_auto_finalize:
        return

    @app.task
    async def finalize_on_start() -> None:
        await asyncio.sleep(FIRST_CHECK_DELAY_S)
        await check(settings)

    @app.timer(interval=CHECK_INTERVAL_S)
    async def finalize_timer() -> None:
        await check(settings)
