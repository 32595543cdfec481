"""Prometheus text exposition (format 0.0.4): writing it, and reading it back.

The worker serves its pipeline counters at ``/metrics``; an edge serves
:meth:`metering.edge.middleware.MeteringEdge.metrics` wherever the app mounts it.
Counters are per process (one uvicorn worker, one set), as Prometheus
expects when it scrapes each process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4"


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str  # counter | gauge
    help: str
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)

    @classmethod
    def one(cls, name: str, kind: str, help: str, value: float) -> Family:
        return cls(name, kind, help, [({}, value)])

    @classmethod
    def by(cls, name: str, kind: str, help: str, label: str, values: Mapping[str, float]) -> Family:
        return cls(name, kind, help, [({label: k}, v) for k, v in sorted(values.items())])


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for f in families:
        lines += [f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.kind}"]
        for labels, value in f.samples:
            tags = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(
                f"{f.name}{{{tags}}} {_number(value)}" if tags else f"{f.name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """``{'name' or 'name{labels}': value}`` from exposition text (tests, tools)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
