"""The local stack: Kafka (KRaft), PostgreSQL and Redis on loopback, natively.

``metering stack up`` is idempotent: a service already answering on its
configured port is reused; a missing one is installed (Debian packages for
PostgreSQL and Redis, Kafka jars resolved by Maven into ``.stack/kafka/libs``)
and started. Ports come from the ``METERING_*`` URLs (settings.py).

State lives in ``.stack/`` at the repository root (ignored by git; set
``METERING_STACK_DIR`` to move it):
``kafka/libs`` (jars), ``kafka/data`` (log dirs), ``*.log`` and ``*.pid``.
This is developer and CI tooling; production runs its own services.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from metering.dev.base import Endpoints, apt_install, log, port_open, run, stop_pidfile, wait
from metering.dev.kafka import kafka_down, kafka_up
from metering.errors import StackError
from metering.settings import Settings


def redis_up(ep: Endpoints) -> None:
    if port_open(ep.redis_host, ep.redis_port):
        log(f"redis: reusing {ep.redis_host}:{ep.redis_port}")
        return
    if shutil.which("redis-server") is None:
        apt_install("redis-server")
    ep.state.mkdir(parents=True, exist_ok=True)
    log(f"redis: starting on {ep.redis_host}:{ep.redis_port}")
    run(
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
            str(ep.state / "redis.pid"),
            "--logfile",
            str(ep.state / "redis.log"),
            "--dir",
            str(ep.state),
        ]
    )
    wait("redis", lambda: port_open(ep.redis_host, ep.redis_port), 20, ep.state / "redis.log")


def redis_down(ep: Endpoints) -> None:
    stop_pidfile("redis", ep.state / "redis.pid")


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
    out = run(["pg_lsclusters", "--no-header"]).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            rows.append(
                {"version": parts[0], "name": parts[1], "port": parts[2], "status": parts[3]}
            )
    return rows


def _as_postgres(sql: str, ep: Endpoints, db: str = "postgres") -> str:
    return run(
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
        log(f"postgres: server on {ep.pg_host}:{ep.pg_port} is up")
    else:
        if shutil.which("pg_lsclusters") is None or not _pg_server_installed():
            apt_install("postgresql")
        version, _ = _pg_bin()
        cluster = next((c for c in _clusters() if int(c["port"]) == ep.pg_port), None)
        if cluster is None:
            log(f"postgres: creating cluster {version}/metering on port {ep.pg_port}")
            run(["pg_createcluster", version, "metering", "-p", str(ep.pg_port)])
            cluster = {"version": version, "name": "metering", "port": str(ep.pg_port)}
        log(f"postgres: starting cluster {cluster['version']}/{cluster['name']}")
        run(["pg_ctlcluster", cluster["version"], cluster["name"], "start"], check=False)
        pg_log = Path(f"/var/log/postgresql/postgresql-{cluster['version']}-{cluster['name']}.log")
        wait("postgres", lambda: port_open(ep.pg_host, ep.pg_port), 60, pg_log)
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
    log(f"postgres: creating role {ep.pg_user} and database {ep.pg_database}")
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
            log(f"postgres: stopping cluster {c['version']}/{c['name']}")
            run(["pg_ctlcluster", c["version"], c["name"], "stop"], check=False)


# -- Kafka -------------------------------------------------------------------

# -- entry points ------------------------------------------------------------


def up(settings: Settings) -> None:
    ep = Endpoints.from_settings(settings)
    redis_up(ep)
    postgres_up(ep)
    kafka_up(ep)
    log("stack is up: " + status_line(settings))


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
