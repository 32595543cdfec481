"""What the local stack's parts share: where services listen, commands, waits, pid files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from metering.errors import StackError
from metering.settings import Settings

ROOT = Path(__file__).resolve().parents[2]  # the repository (dev tooling runs from a checkout)
STACK_FILES = ROOT / "stack"  # Kafka's pom, server.properties and log4j2 config


@dataclass(frozen=True, slots=True)
class Endpoints:
    kafka_host: str
    kafka_port: int
    controller_port: int
    pg_host: str
    pg_port: int
    pg_user: str
    pg_password: str
    pg_database: str
    redis_host: str
    redis_port: int
    state: Path  # pid files, logs, Kafka's jars and data
    kafka_heap: str

    @classmethod
    def from_settings(cls, s: Settings) -> Endpoints:
        first = s.kafka_bootstrap.split(",")[0]
        k_host, _, k_port = first.rpartition(":")
        pg = urlsplit(s.database_url)
        rd = urlsplit(s.redis_url)
        kafka_port = int(k_port or 9092)
        return cls(
            kafka_host=k_host or "127.0.0.1",
            kafka_port=kafka_port,
            controller_port=s.kafka_controller_port or kafka_port + 1,
            pg_host=pg.hostname or "127.0.0.1",
            pg_port=pg.port or 5432,
            pg_user=pg.username or "metering",
            pg_password=pg.password or "metering",
            pg_database=(pg.path or "/metering").lstrip("/") or "metering",
            redis_host=rd.hostname or "127.0.0.1",
            redis_port=rd.port or 6379,
            state=Path(s.stack_dir) if s.stack_dir else ROOT / ".stack",
            kafka_heap=s.kafka_heap,
        )


def log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run(cmd: list[str], *, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as exc:
        raise StackError(
            f"{' '.join(cmd)} failed ({exc.returncode}): {(exc.stderr or exc.stdout).strip()[-2000:]}"
        ) from None
    except FileNotFoundError:
        raise StackError(f"{cmd[0]} not found") from None


def wait(what: str, check: object, timeout: float, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    tail = ""
    if log_file is not None and log_file.exists():
        tail = (
            "\n--- last lines of "
            + str(log_file)
            + " ---\n"
            + "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        )
    raise StackError(f"{what} did not become ready within {timeout:.0f}s{tail}")


_apt_updated = False


def apt_install(*packages: str) -> None:
    global _apt_updated
    if os.geteuid() != 0:
        raise StackError(f"{', '.join(packages)} missing and not root: install them with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        log("apt-get update")
        run(["apt-get", "update", "-qq"], env=env)
        _apt_updated = True
    log(f"apt-get install {' '.join(packages)}")
    run(["apt-get", "install", "-y", "-qq", *packages], env=env)


# -- Redis -------------------------------------------------------------------


def stop_pidfile(name: str, pidfile: Path, timeout: float = 10) -> None:
    if not pidfile.exists():
        log(f"{name}: not started by this stack")
        return
    pid = int(pidfile.read_text().strip() or 0)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        log(f"{name}: not running")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    log(f"{name}: stopped")
