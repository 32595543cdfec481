"""Prometheus metrics with ``prometheus-client``: plain counters mirrored, histograms direct.

The worker and the edge count in plain in-process objects (``PipelineStats``,
``EdgeStats``, ``ProducerStats``: the request path pays an integer add, and
the code and tests read them directly). :class:`MetricSet` mirrors them into
``prometheus-client`` metrics: at every scrape, and in the background every
second where several processes share the numbers. Latencies are observed
straight into ``prometheus-client`` histograms.

Several uvicorn workers (``uvicorn --workers N``) are one edge to Prometheus
in the library's multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory writable by every worker before they start (and empty it at
each deployment). Each worker then writes its metrics to files there and
whichever worker answers the scrape reports the sum over all of them
(gauges: over the workers not yet marked dead; :meth:`MetricSet.close` marks
a stopping process). Without it, each process reports its own numbers, as
Prometheus expects when it scrapes each process. In multiprocess mode the
metrics of one process share its files: one edge per process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4"  # aiohttp adds the charset itself

Reading = Callable[[], float]
LabelledReading = Callable[[], Mapping[str, float]]


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, when it is on.

    prometheus-client itself reads ``PROMETHEUS_MULTIPROC_DIR`` when it is
    imported; this only tells the exposition side to aggregate."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass
class _Mirrored:
    metric: Counter | Gauge
    read: Reading | LabelledReading
    label: str | None
    seen: dict[str, float] = field(default_factory=dict)


class MetricSet:
    """One component's metrics in their own registry (several edges or
    pipelines in one process, as in the tests, do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._mirrored: list[_Mirrored] = []

    def counter(
        self, name: str, help: str, read: Reading | LabelledReading, *, label: str | None = None
    ) -> None:
        """A counter that follows ``read()`` (a number, or ``{label value: number}``)."""
        metric = Counter(name, help, [label] if label else [], registry=self.registry)
        self._mirrored.append(_Mirrored(metric, read, label))

    def gauge(self, name: str, help: str, read: Reading) -> None:
        """A gauge set to ``read()``; in multiprocess mode, summed over live processes."""
        metric = Gauge(name, help, registry=self.registry, multiprocess_mode="livesum")
        self._mirrored.append(_Mirrored(metric, read, None))

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, help, buckets=buckets, registry=self.registry)

    def sync(self) -> None:
        """Bring every mirrored metric up to its source."""
        for m in self._mirrored:
            if isinstance(m.metric, Gauge):
                m.metric.set(float(m.read()))  # type: ignore[arg-type]
                continue
            values = m.read()
            current = values if isinstance(values, Mapping) else {"": float(values)}
            for key, value in current.items():
                value, before = float(value), m.seen.get(key, 0.0)
                # a source that went down was reset: everything since counts
                delta = value - before if value >= before else value
                if delta > 0:
                    (m.metric.labels(key) if m.label else m.metric).inc(delta)
                m.seen[key] = value

    def close(self) -> None:
        """A process that stops: its gauges leave the multiprocess sums."""
        if multiprocess_dir():
            mark_process_dead(os.getpid())

    def exposition(self) -> bytes:
        """Prometheus text: this process's metrics, or every process's in multiprocess mode."""
        self.sync()
        if multiprocess_dir():
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)


def parse(text: str) -> dict[str, float]:
    """``{'name' or 'name{label="value"}': value}`` from exposition text (tests, tools)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            tags = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{tags}}}" if tags else sample.name] = sample.value
    return out
