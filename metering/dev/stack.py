"""The local stack: Kafka (KRaft), PostgreSQL and Redis on loopback, natively.

``metering stack up`` is idempotent: a service already answering on its
configured port is reused; a missing one is installed (Debian packages for
PostgreSQL and Redis, Kafka jars resolved by Maven into ``.stack/kafka/libs``)
and started. Ports come from the ``METERING_*`` URLs (settings.py).

State lives in ``.stack/`` at the repository root (ignored by git):
``kafka/libs`` (jars), ``kafka/data`` (log dirs), ``*.log`` and ``*.pid``.
This is developer and CI tooling; production runs its own services.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from metering.errors import StackError
from metering.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
STACK_FILES = ROOT / "stack"
STATE = Path(os.environ.get("METERING_STACK_DIR", ROOT / ".stack"))
KAFKA_HEAP = os.environ.get("METERING_KAFKA_HEAP", "-Xms256m -Xmx512m")


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
            controller_port=int(os.environ.get("METERING_KAFKA_CONTROLLER_PORT", kafka_port + 1)),
            pg_host=pg.hostname or "127.0.0.1",
            pg_port=pg.port or 5432,
            pg_user=pg.username or "metering",
            pg_password=pg.password or "metering",
            pg_database=(pg.path or "/metering").lstrip("/") or "metering",
            redis_host=rd.hostname or "127.0.0.1",
            redis_port=rd.port or 6379,
        )


def _log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _run(cmd: list[str], *, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as exc:
        raise StackError(
            f"{' '.join(cmd)} failed ({exc.returncode}): {(exc.stderr or exc.stdout).strip()[-2000:]}"
        ) from None
    except FileNotFoundError:
        raise StackError(f"{cmd[0]} not found") from None


def _wait(what: str, check: object, timeout: float, log_file: Path | None = None) -> None:
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


def _apt_install(*packages: str) -> None:
    global _apt_updated
    if os.geteuid() != 0:
        raise StackError(f"{', '.join(packages)} missing and not root: install them with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        _log("apt-get update")
        _run(["apt-get", "update", "-qq"], env=env)
        _apt_updated = True
    _log(f"apt-get install {' '.join(packages)}")
    _run(["apt-get", "install", "-y", "-qq", *packages], env=env)


# -- Redis -------------------------------------------------------------------


def redis_up(ep: Endpoints) -> None:
    if port_open(ep.redis_host, ep.redis_port):
        _log(f"redis: reusing {ep.redis_host}:{ep.redis_port}")
        return
    if shutil.which("redis-server") is None:
        _apt_install("redis-server")
    STATE.mkdir(parents=True, exist_ok=True)
    _log(f"redis: starting on {ep.redis_host}:{ep.redis_port}")
    _run(
        [
            "redis-server",
            "--bind",
            ep.redis_host,
            "--port",
            str(ep.redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--pidfile",
            str(STATE / "redis.pid"),
            "--logfile",
            str(STATE / "redis.log"),
            "--dir",
            str(STATE),
        ]
    )
    _wait("redis", lambda: port_open(ep.redis_host, ep.redis_port), 20, STATE / "redis.log")


def redis_down(ep: Endpoints) -> None:
    _stop_pidfile("redis", STATE / "redis.pid")


# -- PostgreSQL --------------------------------------------------------------


def _pg_bin() -> tuple[str, Path]:
    base = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in base.glob("*") if (p / "bin" / "postgres").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    if not versions:
        raise StackError("PostgreSQL binaries not found under /usr/lib/postgresql")
    return versions[-1].name, versions[-1] / "bin"


def _pg_server_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/postgres"))


def _clusters() -> list[dict[str, str]]:
    out = _run(["pg_lsclusters", "--no-header"]).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            rows.append(
                {"version": parts[0], "name": parts[1], "port": parts[2], "status": parts[3]}
            )
    return rows


def _as_postgres(sql: str, ep: Endpoints, db: str = "postgres") -> str:
    return _run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-X",
            "-q",
            "-At",
            "-p",
            str(ep.pg_port),
            "-h",
            "/var/run/postgresql",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]
    ).stdout.strip()


def postgres_up(ep: Endpoints) -> None:
    if port_open(ep.pg_host, ep.pg_port):
        _log(f"postgres: server on {ep.pg_host}:{ep.pg_port} is up")
    else:
        if shutil.which("pg_lsclusters") is None or not _pg_server_installed():
            _apt_install("postgresql")
        version, _ = _pg_bin()
        cluster = next((c for c in _clusters() if int(c["port"]) == ep.pg_port), None)
        if cluster is None:
            _log(f"postgres: creating cluster {version}/metering on port {ep.pg_port}")
            _run(["pg_createcluster", version, "metering", "-p", str(ep.pg_port)])
            cluster = {"version": version, "name": "metering", "port": str(ep.pg_port)}
        _log(f"postgres: starting cluster {cluster['version']}/{cluster['name']}")
        _run(["pg_ctlcluster", cluster["version"], cluster["name"], "start"], check=False)
        log = Path(f"/var/log/postgresql/postgresql-{cluster['version']}-{cluster['name']}.log")
        _wait("postgres", lambda: port_open(ep.pg_host, ep.pg_port), 60, log)
    if not _can_login(ep):
        _provision_role(ep)


def _can_login(ep: Endpoints) -> bool:
    env = {**os.environ, "PGPASSWORD": ep.pg_password, "PGCONNECT_TIMEOUT": "5"}
    r = subprocess.run(
        [
            "psql",
            "-X",
            "-At",
            "-h",
            ep.pg_host,
            "-p",
            str(ep.pg_port),
            "-U",
            ep.pg_user,
            "-d",
            ep.pg_database,
            "-c",
            "SELECT 1",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return r.returncode == 0


def _provision_role(ep: Endpoints) -> None:
    if os.geteuid() != 0:
        raise StackError(
            f"cannot log in to PostgreSQL as {ep.pg_user}@{ep.pg_database}; create the role "
            "and database, or set METERING_DATABASE_URL"
        )
    _log(f"postgres: creating role {ep.pg_user} and database {ep.pg_database}")
    ident = ep.pg_user.replace('"', '""')
    pw = ep.pg_password.replace("'", "''")
    exists = _as_postgres(f"SELECT 1 FROM pg_roles WHERE rolname = '{ep.pg_user}'", ep)
    verb = "ALTER" if exists else "CREATE"
    # CREATEDB: the test suite clones a migrated template database per test.
    _as_postgres(f"{verb} ROLE \"{ident}\" LOGIN CREATEDB PASSWORD '{pw}'", ep)
    if not _as_postgres(f"SELECT 1 FROM pg_database WHERE datname = '{ep.pg_database}'", ep):
        _as_postgres(f'CREATE DATABASE "{ep.pg_database}" OWNER "{ident}"', ep)
    if not _can_login(ep):
        raise StackError(
            f"role {ep.pg_user} exists but password login over TCP fails; check pg_hba.conf"
        )


def postgres_down(ep: Endpoints) -> None:
    for c in _clusters():
        if int(c["port"]) == ep.pg_port and c["status"] == "online":
            _log(f"postgres: stopping cluster {c['version']}/{c['name']}")
            _run(["pg_ctlcluster", c["version"], c["name"], "stop"], check=False)


# -- Kafka -------------------------------------------------------------------

KAFKA_DIR = STATE / "kafka"
LIBS = KAFKA_DIR / "libs"


def _kafka_jars() -> None:
    marker = LIBS / ".complete"
    pom = STACK_FILES / "kafka-pom.xml"
    if marker.exists() and marker.read_text() == pom.read_text():
        return
    if shutil.which("mvn") is None:
        raise StackError("mvn not found: Maven is needed to fetch the Kafka jars")
    _log("kafka: resolving broker jars from Maven Central (first run only)")
    if LIBS.exists():
        shutil.rmtree(LIBS)
    LIBS.mkdir(parents=True)
    _run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={LIBS}",
            "-DincludeScope=runtime",
        ]
    )
    marker.write_text(pom.read_text())


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError("java not found: Java 17 is needed to run the Kafka broker")
    return java


def _kafka_config(ep: Endpoints) -> Path:
    data = KAFKA_DIR / "data"
    template = (STACK_FILES / "server.properties").read_text()
    text = template.format(
        host=ep.kafka_host, port=ep.kafka_port, controller_port=ep.controller_port, data=data
    )
    path = KAFKA_DIR / "server.properties"
    path.write_text(text)
    return path


def kafka_up(ep: Endpoints) -> None:
    if port_open(ep.kafka_host, ep.kafka_port):
        _log(f"kafka: reusing {ep.kafka_host}:{ep.kafka_port}")
    else:
        _kafka_jars()
        java = _java()
        config = _kafka_config(ep)
        cp = str(LIBS / "*")
        data = KAFKA_DIR / "data"
        if not (data / "meta.properties").exists():
            cluster_id = _run(
                [java, "-cp", cp, "kafka.tools.StorageTool", "random-uuid"]
            ).stdout.strip()
            _log(f"kafka: formatting storage (cluster {cluster_id})")
            _run(
                [
                    java,
                    "-cp",
                    cp,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    cluster_id,
                    "-c",
                    str(config),
                ]
            )
        log_file = KAFKA_DIR / "kafka.log"
        _log(f"kafka: starting broker on {ep.kafka_host}:{ep.kafka_port}")
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                [
                    java,
                    *KAFKA_HEAP.split(),
                    "-XX:+UseG1GC",
                    "-XX:MaxGCPauseMillis=20",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={STACK_FILES / 'log4j2.properties'}",
                    f"-Dkafka.logs.dir={KAFKA_DIR}",
                    "-cp",
                    cp,
                    "kafka.Kafka",
                    str(config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (KAFKA_DIR / "kafka.pid").write_text(str(proc.pid))

        def alive_and_listening() -> bool:
            if proc.poll() is not None:
                raise StackError(
                    f"kafka exited with {proc.returncode}; see {log_file}:\n"
                    + "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
                )
            return port_open(ep.kafka_host, ep.kafka_port)

        _wait("kafka", alive_and_listening, 90, log_file)
    _kafka_client_ready(ep)


def _kafka_client_ready(ep: Endpoints, timeout: float = 60) -> None:
    """Ready means a client can create (and see) a topic."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    async def probe() -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"{ep.kafka_host}:{ep.kafka_port}", request_timeout_ms=5000
        )
        await admin.start()
        try:
            try:
                await admin.create_topics([NewTopic("metering.dev.stack.probe", 1, 1)])
            except TopicAlreadyExistsError:
                pass
            if "metering.dev.stack.probe" not in await admin.list_topics():
                raise StackError("probe topic not visible yet")
        finally:
            await admin.close()

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            asyncio.run(probe())
            _log("kafka: ready (a client created a topic)")
            return
        except (KafkaError, StackError, OSError) as exc:
            last = exc
            time.sleep(1)
    raise StackError(f"kafka is listening but not serving clients: {last}")


def kafka_down(ep: Endpoints) -> None:
    _stop_pidfile("kafka", KAFKA_DIR / "kafka.pid", timeout=30)


def _stop_pidfile(name: str, pidfile: Path, timeout: float = 10) -> None:
    if not pidfile.exists():
        _log(f"{name}: not started by this stack")
        return
    pid = int(pidfile.read_text().strip() or 0)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        _log(f"{name}: not running")
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
    _log(f"{name}: stopped")


# -- entry points ------------------------------------------------------------


def up(settings: Settings) -> None:
    ep = Endpoints.from_settings(settings)
    redis_up(ep)
    postgres_up(ep)
    kafka_up(ep)
    _log("stack is up: " + status_line(settings))


def down(settings: Settings) -> None:
    ep = Endpoints.from_settings(settings)
    kafka_down(ep)
    redis_down(ep)
    postgres_down(ep)


def status(settings: Settings) -> dict[str, bool]:
    ep = Endpoints.from_settings(settings)
    return {
        f"kafka {ep.kafka_host}:{ep.kafka_port}": port_open(ep.kafka_host, ep.kafka_port),
        f"postgres {ep.pg_host}:{ep.pg_port}": port_open(ep.pg_host, ep.pg_port),
        f"redis {ep.redis_host}:{ep.redis_port}": port_open(ep.redis_host, ep.redis_port),
    }


def status_line(settings: Settings) -> str:
    return ", ".join(f"{k} {'up' if v else 'down'}" for k, v in status(settings).items())
