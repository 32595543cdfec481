"""MetricSet mirrors plain counters into prometheus-client, and multiprocess
mode sums several processes (real prometheus-client, real processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from metering.metrics import MetricSet, parse


def test_counters_follow_their_source_and_gauges_are_set():
    plain = {"n": 0}
    reasons: Counter[str] = Counter()
    level = [0.0]
    m = MetricSet()
    m.counter("a_total", "As.", lambda: plain["n"])
    m.counter("b_total", "Bs by reason.", lambda: reasons, label="reason")
    m.gauge("c", "C.", lambda: level[0])
    plain["n"], reasons['say "hi"'], level[0] = 3, 2, -1.25
    first = parse(m.exposition().decode())
    assert first["a_total"] == 3 and first["c"] == -1.25
    assert first['b_total{reason="say "hi""}'] == 2  # the value comes back unescaped
    plain["n"], reasons["z"], level[0] = 5, 1, 4
    second = parse(m.exposition().decode())
    assert (second["a_total"], second['b_total{reason="z"}'], second["c"]) == (5, 1, 4)
    m.sync()  # syncing twice adds nothing
    assert parse(m.exposition().decode())["a_total"] == 5
    plain["n"] = 2  # the source was reset (a restarted component): 2 more happened
    assert parse(m.exposition().decode())["a_total"] == 7


def test_histograms_expose_buckets_count_and_sum():
    m = MetricSet()
    h = m.histogram("d_seconds", "Ds.", (0.001, 0.01))
    for s in (0.0005, 0.005, 0.05):
        h.observe(s)
    got = parse(m.exposition().decode())
    assert got['d_seconds_bucket{le="0.001"}'] == 1
    assert got['d_seconds_bucket{le="0.01"}'] == 2
    assert got['d_seconds_bucket{le="+Inf"}'] == 3 and got["d_seconds_count"] == 3


def test_multiprocess_mode_sums_the_workers(tmp_path: Path):
    """Two 'uvicorn workers' count on their own; a third answers the scrape."""
    worker = textwrap.dedent(
        """
        import sys
        from metering.metrics import MetricSet
        n = int(sys.argv[1])
        m = MetricSet()
        m.counter("edge_checks_total", "Checks.", lambda: n)
        m.gauge("edge_buffered", "Buffered.", lambda: n * 10)
        m.histogram("edge_overhead_seconds", "Overhead.", (0.001,)).observe(0.0005)
        m.sync()
        print(m.exposition().decode())
        if n == 3:
            m.close()
        """
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", worker, str(n)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for n in (3, 4)
    ]
    combined = parse(outputs[-1])  # the second worker's scrape sees both
    assert combined["edge_checks_total"] == 7
    assert combined["edge_overhead_seconds_count"] == 2
    # the first worker marked itself dead: its gauge left the sum, its counts stayed
    assert combined["edge_buffered"] == 40
    assert parse(outputs[0])["edge_checks_total"] == 3
