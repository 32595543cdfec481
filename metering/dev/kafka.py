"""The local Kafka broker (KRaft, one node) from Maven jars: dev tooling."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

from metering.dev.base import STACK_FILES, Endpoints, log, port_open, run, stop_pidfile, wait
from metering.errors import StackError


def _kafka_jars(ep: Endpoints) -> None:
    libs = ep.state / "kafka" / "libs"
    marker = libs / ".complete"
    pom = STACK_FILES / "kafka-pom.xml"
    if marker.exists() and marker.read_text() == pom.read_text():
        return
    if shutil.which("mvn") is None:
        raise StackError("mvn not found: Maven is needed to fetch the Kafka jars")
    log("kafka: resolving broker jars from Maven Central (first run only)")
    if libs.exists():
        shutil.rmtree(libs)
    libs.mkdir(parents=True)
    run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
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
    data = ep.state / "kafka" / "data"
    template = (STACK_FILES / "server.properties").read_text()
    text = template.format(
        host=ep.kafka_host, port=ep.kafka_port, controller_port=ep.controller_port, data=data
    )
    path = ep.state / "kafka" / "server.properties"
    path.write_text(text)
    return path


def kafka_up(ep: Endpoints) -> None:
    if port_open(ep.kafka_host, ep.kafka_port):
        log(f"kafka: reusing {ep.kafka_host}:{ep.kafka_port}")
    else:
        _kafka_jars(ep)
        java = _java()
        config = _kafka_config(ep)
        cp = str(ep.state / "kafka" / "libs" / "*")
        data = ep.state / "kafka" / "data"
        if not (data / "meta.properties").exists():
            cluster_id = run(
                [java, "-cp", cp, "kafka.tools.StorageTool", "random-uuid"]
            ).stdout.strip()
            log(f"kafka: formatting storage (cluster {cluster_id})")
            run(
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
        log_file = ep.state / "kafka" / "kafka.log"
        log(f"kafka: starting broker on {ep.kafka_host}:{ep.kafka_port}")
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                [
                    java,
                    *ep.kafka_heap.split(),
                    "-XX:+UseG1GC",
                    "-XX:MaxGCPauseMillis=20",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={STACK_FILES / 'log4j2.properties'}",
                    f"-Dkafka.logs.dir={ep.state / 'kafka'}",
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
        (ep.state / "kafka" / "kafka.pid").write_text(str(proc.pid))

        def alive_and_listening() -> bool:
            if proc.poll() is not None:
                raise StackError(
                    f"kafka exited with {proc.returncode}; see {log_file}:\n"
                    + "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
                )
            return port_open(ep.kafka_host, ep.kafka_port)

        wait("kafka", alive_and_listening, 90, log_file)
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
            log("kafka: ready (a client created a topic)")
            return
        except (KafkaError, StackError, OSError) as exc:
            last = exc
            time.sleep(1)
    raise StackError(f"kafka is listening but not serving clients: {last}")


def kafka_down(ep: Endpoints) -> None:
    stop_pidfile("kafka", ep.state / "kafka" / "kafka.pid", timeout=30)
