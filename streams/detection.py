"""Detection in the worker: the detector, its changelog, its alerts and webhooks.

The usage consumer hands every decoded batch to :meth:`Detection.observe`
(synchronously, in fetch order) and asks :meth:`Detection.cap` how far it may
commit. The rest runs beside the stream, never in its path:

* findings go through a queue to :class:`~metering.alerts.service.AlertsService`
  (``key_alerts``, the key's actions, webhooks queued) and to ``keys.alerts``;
  an outage of PostgreSQL or Kafka is retried, never dropped;
* every ``detection_checkpoint_s`` the state of each partition's changed
  buckets goes to the changelog, after the findings raised before it are
  recorded; only then may the consumer commit past those events, so a crash
  replays what the changelog lacks and the replay is skipped where it holds it;
* a partition assigned is restored from the changelog before its first
  batch; one revoked is saved first;
* every few seconds: the keys in rotation grace, and the tiers' overrides;
* the worker's webhook sender (:mod:`streams.notify`) delivers the queued messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from metering.accounts.security import KeySecurity
from metering.accounts.service import for_settings
from metering.alerts.service import AlertsService
from metering.alerts.webhooks import WebhookSender
from metering.db.connect import is_row_fault
from metering.db.queries import get
from metering.detect.changelog import Changelog
from metering.detect.detector import Detector, Finding
from metering.detect.rules import Rules, parse_overrides
from metering.errors import ServiceUnavailable
from metering.events import UsageEvent
from metering.settings import Settings
from metering.usage.deadletters import RawRecord

log = logging.getLogger(__name__)

Q_ROTATING_KEYS = get("rotating_keys")
Q_TIER_OVERRIDES = get("tier_detection_overrides")
WATCH_EVERY_S = 5.0
RECORD_WAIT_S = 30.0  # a checkpoint waits this long for the findings before it, then skips


class Detection:
    def __init__(self, settings: Settings, sender: WebhookSender) -> None:
        self.settings = settings
        self.rules = Rules().with_overrides(parse_overrides(settings.detection_rules))
        self.detector = Detector(self.rules)
        self.changelog = Changelog(
            settings.kafka_bootstrap,
            settings.state_topic,
            client_id=f"{settings.worker_id}-detect",
        )
        self.after_checkpoint: Callable[[], Awaitable[None]] | None = None
        self._queue: asyncio.Queue[Finding] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()  # cleared while assigned partitions are restored
        self._ready.set()
        self.owned: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: asyncpg.Pool | None = None
        self._redis: aioredis.Redis | None = None
        self.alerts: AlertsService | None = None
        self.sender = sender  # the worker's (streams.notify): woken when an alert is queued
        self.recorded = 0
        self.record_failures = 0
        self.dropped = 0  # findings whose data PostgreSQL refused
        self.checkpoints = 0
        self.observe_seconds = 0.0  # time the rules took in the stream's path
        self.last_restore_s = 0.0

    async def start(self) -> None:
        s = self.settings
        self._pool = await asyncpg.create_pool(
            s.database_url, min_size=0, max_size=3, command_timeout=s.db_command_timeout_s
        )
        self._redis = aioredis.from_url(s.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.alerts = AlertsService(
            self._pool,
            KeySecurity(for_settings(s, self._pool, self._redis)),
            revoke_enabled=s.detection_revoke,
            forced_rotation=timedelta(hours=s.forced_rotation_hours),
            rotation_url=s.rotation_url,
        )
        await self.changelog.start()
        for work in (self._record_loop(), self._checkpoint_loop(), self._watch_loop()):
            self._tasks.append(asyncio.create_task(work))

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), 10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.changelog.stop()
        if self._redis is not None:
            await self._redis.aclose()
        if self._pool is not None:
            await self._pool.close()

    # -- the consumer's hooks ---------------------------------------------------

    def observe(self, events: list[UsageEvent], sources: dict[int, RawRecord]) -> None:
        started = time.perf_counter()
        for finding in self.detector.observe(events, sources):
            self._queue.put_nowait(finding)
        self.observe_seconds += time.perf_counter() - started

    def cap(self, partition: int, offset: int) -> int:
        return self.detector.committable(partition, offset)

    async def ready(self) -> None:
        """Wait for a restore under way: no batch is observed before its state is back."""
        await self._ready.wait()

    async def assigned(self, partitions: Iterable[int]) -> None:
        started = time.perf_counter()
        numbers = sorted(partitions)
        self._ready.clear()
        try:
            async with self._lock:
                self.owned = set(numbers)  # eager rebalancing: these are all it owns now
                for p, records in (await self._read(numbers)).items():
                    try:
                        self.detector.restore(p, records)
                    except Exception:  # a record this release cannot read
                        log.exception(
                            "detection state of partition %d unreadable; starting empty", p
                        )
                        self.detector.restore(p, [])
        finally:
            self._ready.set()
        self.last_restore_s = time.perf_counter() - started
        keys, nets = self.detector.size()
        log.info(
            "detection state restored in %.2fs: %d keys, %d addresses",
            self.last_restore_s, keys, nets,
        )  # fmt: skip

    async def _read(self, partitions: list[int]) -> dict[int, list[tuple[int, bytes]]]:
        """The partitions' changelog; Kafka trouble is retried for a minute, then
        they start with empty state (metering goes on; logged)."""
        delay = 0.5
        deadline = time.monotonic() + 60
        while True:
            try:
                return await self.changelog.read(partitions)
            except ServiceUnavailable as exc:
                if time.monotonic() > deadline:
                    log.error("detection state of partitions %s lost: %s", partitions, exc)
                    return {p: [] for p in partitions}
                log.warning("detection state of partitions %s not read yet: %s", partitions, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def revoked(self, partitions: Iterable[int]) -> None:
        partitions = list(partitions)
        try:
            await self.checkpoint(partitions)
        except Exception as exc:  # their commits stay where the state was saved
            log.warning("detection state of %s not saved before the hand-over: %r", partitions, exc)
        finally:
            for p in partitions:
                self.detector.drop(p)
            self.owned.difference_update(partitions)

    async def checkpoint(
        self, partitions: Iterable[int] | None = None, *, wait_s: float = RECORD_WAIT_S
    ) -> None:
        """Save the changed state: the findings raised before it first (waited for
        ``wait_s`` at most; then nothing is saved and commits stay where they are)."""
        async with self._lock:
            # only partitions this worker owns: state of one handed over (a
            # late batch of it) must never overwrite its new owner's changelog
            for stray in set(self.detector.parts) - self.owned:
                self.detector.drop(stray)
            numbers = sorted(self.owned if partitions is None else set(partitions) & self.owned)
            snaps = [(p, *self.detector.snapshot(p)) for p in numbers]
            done = 0
            try:
                try:
                    await asyncio.wait_for(self._queue.join(), wait_s)
                except TimeoutError:
                    raise ServiceUnavailable("findings not recorded yet (PostgreSQL?)") from None
                for p, offset, records in snaps:
                    if records:
                        await self.changelog.write(p, records)
                    if offset >= 0:
                        self.detector.saved(p, offset)
                    done += 1
            finally:  # what was not written is dirty again: nothing is committed past it
                for p, _, records in snaps[done:]:
                    self.detector.unsaved(p, (b for b, _ in records))
            self.checkpoints += 1

    # -- beside the stream --------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.detection_checkpoint_s)
            try:
                await self.checkpoint()
                if self.after_checkpoint is not None:
                    await self.after_checkpoint()
            except ServiceUnavailable as exc:
                log.warning("detection checkpoint skipped (%s); commits wait for the next", exc)
            except Exception:
                log.exception("detection checkpoint failed; commits wait for the next")

    async def _record_loop(self) -> None:
        assert self.alerts is not None
        while True:
            finding = await self._queue.get()
            try:
                await self._record(finding)
            finally:
                self._queue.task_done()

    async def _record(self, finding: Finding) -> None:
        """Record one finding, retrying outages for as long as they last."""
        assert self.alerts is not None
        delay = 0.5
        while True:
            try:
                alert, event = await self.alerts.record(finding)
                await self._publish(alert.id, finding, alert.action, alert.status)
                self.recorded += 1
                if event is not None:
                    self.sender.wake()
                    log.warning(
                        "alert %d %s: %s on %s (%s), action %s",
                        alert.id, event, finding.rule, alert.key_prefix or finding.subject,
                        alert.severity, alert.action,
                    )  # fmt: skip
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.record_failures += 1
                if is_row_fault(exc):  # its data is refused: retrying never helps
                    self.dropped += 1
                    log.error("a %s finding cannot be recorded (%r); dropped", finding.rule, exc)
                    return
                log.warning("could not record a %s finding (%r); retrying", finding.rule, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _publish(self, alert_id: int, finding: Finding, action: str, status: str) -> None:
        producer = self.changelog.producer
        assert producer is not None
        record: dict[str, Any] = {
            "alert_id": alert_id, **finding.to_dict(), "action": action, "status": status,
        }  # fmt: skip
        ack = await producer.send(
            self.settings.alerts_topic,
            key=finding.subject.encode(),
            value=json.dumps(record, separators=(",", ":")).encode(),
        )
        await ack

    async def _watch_loop(self) -> None:
        assert self._pool is not None
        while True:
            try:
                async with self._pool.acquire() as conn:
                    rotating = await conn.fetch(Q_ROTATING_KEYS)
                    overrides = await conn.fetch(Q_TIER_OVERRIDES)
                self.detector.rotating = {str(r["id"]): r["since"] for r in rotating}
                by_tier: dict[str, Rules] = {}
                users: dict[Any, Rules] = {}
                for r in overrides:
                    tier_rules = by_tier.get(r["tier"])
                    if tier_rules is None:
                        tier_rules = by_tier[r["tier"]] = self._tier_rules(
                            r["tier"], r["overrides"]
                        )
                    users[r["user_id"]] = users[str(r["user_id"])] = tier_rules
                self.detector.user_rules = users
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("detection watch list not refreshed: %r", exc)
            await asyncio.sleep(WATCH_EVERY_S)

    def _tier_rules(self, tier: str, overrides: str) -> Rules:
        try:
            return self.rules.with_overrides(json.loads(overrides))
        except Exception as exc:
            log.error("tier %s: detection overrides ignored (%s)", tier, exc)
            return self.rules
