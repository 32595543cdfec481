from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from metering import metrics
from metering.db import admin as db_admin
from metering.db.migrate import migrate
from metering.dev import stack
from metering.kafka import delete_topics, ensure_topics
from metering.settings import Settings

BASE = Settings.from_env()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the stack: `-m "not integration"`
    runs the unit suite alone."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


# One template per test session: two sessions on one server must not drop
# each other's template.
TEMPLATE_DB = f"metering_test_template_{uuid.uuid4().hex[:10]}"


def db_url(name: str) -> str:
    return db_admin.database_url(BASE.database_url, name)


async def drop_database(name: str) -> None:
    await db_admin.drop_database(BASE.database_url, name)


@pytest.fixture(scope="session")
def services() -> Settings:
    state = stack.status(BASE)
    down = [name for name, up in state.items() if not up]
    if down:
        pytest.fail(
            f"integration tests need the real stack, but {', '.join(down)} is down: "
            "run `metering stack up` (scripts/test does it for you)",
            pytrace=False,
        )
    return BASE


@pytest.fixture(scope="session")
async def template_db(services: Settings) -> AsyncIterator[str]:
    """A database with every migration applied, cloned for each test."""
    admin = await asyncpg.connect(BASE.database_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(db_url(TEMPLATE_DB), timeout=10)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield TEMPLATE_DB
    await drop_database(TEMPLATE_DB)


@pytest.fixture
async def database_url(template_db: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(BASE.database_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield db_url(name)
    await drop_database(name)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url, timeout=10, server_settings={"timezone": "UTC"})
    yield conn
    await conn.close()


@pytest.fixture
async def redis_client(services: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(BASE.redis_url, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture
async def kafka_settings(
    services: Settings, database_url: str, redis_prefix: str
) -> AsyncIterator[Settings]:
    """Settings for an isolated pipeline: fresh topics, group, database, key prefix."""
    tag = uuid.uuid4().hex[:10]
    s = Settings.from_env(
        events_topic=f"test.{tag}.usage.events",
        dlq_topic=f"test.{tag}.usage.events.dlq",
        alerts_topic=f"test.{tag}.keys.alerts",
        detection_state_topic=f"test.{tag}.detection.state",
        detection_checkpoint_s=1.0,
        events_partitions=3,
        worker_id=f"test-{tag}",
        database_url=database_url,
        redis_key_prefix=redis_prefix,
        session_timeout_s=6.0,  # the broker's group.min.session.timeout.ms
    )
    await ensure_topics(s)
    yield s
    # Its topics and the worker's internal ones (Faust names them after the app id).
    await delete_topics(s, lambda name: tag in name)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, what: str, interval: float = 0.25
) -> None:
    """Poll ``check`` until it is true; every check is bounded by the deadline too."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            if await asyncio.wait_for(check(), max(left, 0.1)):
                return
        except TimeoutError:
            if time.monotonic() >= deadline:
                break  # the deadline cut the check short; a check's own timeout is a "no"
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), so no outgoing
    connection can take it between this check and the server's bind."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-32000")


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def listening_socket() -> socket.socket:
    """A bound, listening socket for a server we start in-process (no race at all)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class WorkerProcess:
    """A real ``metering worker`` subprocess with its own settings."""

    def __init__(self, settings: Settings, log_path: Path, **extra_env: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.web_port = free_port()
        env = dict(os.environ)
        for field in settings.__dataclass_fields__:
            env[f"METERING_{field.upper()}"] = str(getattr(settings, field))
        env["METERING_WEB_ENABLED"] = "true"
        env["METERING_WEB_PORT"] = str(self.web_port)
        env.update(extra_env)
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "metering.cli", "worker", "-l", "info"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.log_path.parent,  # faust's data dir goes there
            )
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to commit offsets."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """The worker's /metrics (raises TimeoutError when it does not answer in time)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.web_port), timeout
        )
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            await asyncio.wait_for(writer.drain(), timeout)
            body = (await asyncio.wait_for(reader.read(), timeout)).decode()
        finally:
            writer.close()
        return metrics.parse(body.split("\r\n\r\n", 1)[-1])


@pytest.fixture
def private_redis(services: Settings, tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test's own (real, throwaway), for tests that change
    server-wide state (SCRIPT FLUSH, ACL users) the shared one must not see."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not stack.port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"private redis-server did not start on {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def make(settings: Settings, **env: str) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(started) + 1}.log", **env)
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.stop()
