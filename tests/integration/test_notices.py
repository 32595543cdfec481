"""Usage threshold notifications through the real stack: events through Kafka
and a worker, notices at 80 % and 100 % of a daily quota and of a monthly
spend limit, each once, as signed webhooks to the customer's own endpoint
(verified by a real HTTP receiver) and to the operators' endpoint that asks
for them, and to nobody else."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from metering.accounts.service import AccountsService
from metering.billing.pricing import Band, Price
from metering.billing.service import Billing
from metering.dev.receiver import Receiver
from tests.integration.conftest import eventually
from tests.integration.test_alerts_cli import run_cli_async
from tests.integration.test_anomalies import publish
from tests.integration.test_billing import user_on
from tests.integration.test_pipeline_db import event


async def endpoint(s, receiver: Receiver, *args: str) -> int:
    url = await receiver.start()
    rc, out, err = await run_cli_async(s, "webhooks", "add", url, *args)
    assert rc == 0, err
    receiver.secret = out.strip().splitlines()[-1]
    return int(out.split()[1])


async def test_quota_and_spend_thresholds_are_told_once_each_to_whom_they_concern(
    kafka_settings, db, worker_factory
):
    s = kafka_settings
    accounts = AccountsService(db, cache=None, pepper=None)
    await accounts.create_tier(name="tiny", daily_quota=10, rate_limit_per_minute=600)
    # 10.00 a month, nothing included, 1.00 a unit
    await Billing(db).set_price(
        "tiny", Price("EUR", Decimal(10), 0, (Band(0, Decimal(1000)),)), since=date(2020, 1, 1)
    )
    user = await user_on(db, (date(2020, 1, 1), "tiny"))
    bystander = await user_on(db, (date(2020, 1, 1), "tiny"))
    customer, operators, on_call, other = Receiver(), Receiver(), Receiver(), Receiver()
    try:
        await endpoint(s, customer, "--user", str(user))
        await endpoint(s, operators, "--event", "usage.threshold")
        await endpoint(s, on_call, "--event", "alert.opened")  # not interested
        await endpoint(s, other, "--user", str(bystander))
        rc, _, err = await run_cli_async(s, "users", "set-spend-limit", str(user), "20")
        assert rc == 0, err
        rc, _, err = await run_cli_async(s, "webhooks", "add", "http://x.test/", "--user",
                                         str(user), "--event", "alert.opened")  # fmt: skip
        assert rc == 2 and "only usage.threshold" in err

        worker = worker_factory(s, METERING_USAGE_NOTICES_CHECK_S="0.5")
        now = datetime.now(UTC)

        def served(n: int, start: int) -> list:
            return [event(user, now - timedelta(seconds=60 - start - i)) for i in range(n)]

        # refused requests are nobody's usage: 5 of them first, then 8 served
        refused = [event(user, now - timedelta(seconds=59), rejected="quota_exceeded", status_code=429)
                   for _ in range(5)]  # fmt: skip
        await publish(s, refused + served(8, 0))

        def told(kind: str, pct: int) -> list[dict]:
            return [m for m in customer.of_type("usage.threshold")
                    if m["data"]["kind"] == kind and m["data"]["threshold_percent"] == pct]  # fmt: skip

        async def at(n: int) -> bool:
            worker.assert_running()
            return len(customer.of_type("usage.threshold")) >= n

        # 8 of 10 requests: the quota's 80 %; 10.00 + 8 x 1.00 = 18.00 of 20.00: the spend's 80 %
        await eventually(lambda: at(2), timeout=60, what="the 80 % notices")
        quota80 = told("daily_quota", 80)[0]["data"]
        assert (quota80["used"], quota80["limit"], quota80["unit"]) == ("8", "10", "requests")
        assert quota80["period"] == now.date().isoformat() and quota80["user_id"] == str(user)
        spend80 = told("monthly_spend", 80)[0]["data"]
        assert (Decimal(spend80["used"]), spend80["limit"], spend80["unit"]) == (
            Decimal("18.00"), "20.00", "EUR",
        )  # fmt: skip

        await publish(s, served(2, 10))
        await eventually(lambda: at(4), timeout=60, what="the 100 % notices")
        assert told("daily_quota", 100)[0]["data"]["used"] == "10"
        assert Decimal(told("monthly_spend", 100)[0]["data"]["used"]) == Decimal("20.00")

        await publish(s, served(3, 20))  # beyond both: nothing more to tell

        async def landed() -> bool:
            n = await db.fetchval(
                "SELECT request_count - rejected_count FROM daily_usage WHERE user_id = $1", user
            )
            return n == 13

        await eventually(landed, timeout=60, what="the last events")
        rows = await db.fetch("SELECT kind, threshold FROM usage_notices ORDER BY 1, 2")
        assert [tuple(r) for r in rows] == [
            ("daily_quota", 80), ("daily_quota", 100), ("monthly_spend", 80), ("monthly_spend", 100),
        ]  # fmt: skip
        await eventually(lambda: _settled(operators, 4), timeout=30, what="the operators' copies")
        await _quiet(4)  # several more checks: still once each
        assert len(customer.of_type("usage.threshold")) == 4
        assert len(operators.of_type("usage.threshold")) == 4
        assert on_call.received == [] and other.received == []
        assert customer.rejected == operators.rejected == 0
        ids = {r["headers"]["webhook-id"] for r in customer.received}
        assert len(ids) == 4
        rc, out, _ = await run_cli_async(s, "notices", "--user", str(user))
        assert rc == 0 and out.count("%") >= 4
    finally:
        for r in (customer, operators, on_call, other):
            await r.stop()


async def _settled(receiver: Receiver, n: int) -> bool:
    return len(receiver.of_type("usage.threshold")) >= n


async def _quiet(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_notice_ids_are_stable_per_threshold_and_period():
    from metering.billing.notices import message_id

    u = uuid.uuid4()
    assert message_id(u, "daily_quota", date(2026, 12, 6), 80) == message_id(
        u, "daily_quota", date(2026, 12, 6), 80
    )
    assert message_id(u, "daily_quota", date(2026, 12, 6), 80) != message_id(
        u, "daily_quota", date(2026, 12, 7), 80
    )
