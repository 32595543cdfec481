"""Health and Prometheus metrics on the worker's web port (default 6066)."""

from __future__ import annotations

import time

from faust.web import Request, Response, View

from streams.agents.usage import pipeline
from streams.app import app


@app.page("/metering/health")
class Health(View):
    async def get(self, request: Request) -> Response:
        s = pipeline.stats
        body = {"status": "ok", "batches": s.batches, "last_batch_at": s.last_batch_at}
        return self.json(body)


@app.page("/metrics")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        s = pipeline.stats
        lines = [
            "# TYPE metering_batches_total counter",
            f"metering_batches_total {s.batches}",
            "# TYPE metering_records_total counter",
            f"metering_records_total {s.records}",
            "# TYPE metering_events_inserted_total counter",
            f"metering_events_inserted_total {s.inserted}",
            "# TYPE metering_events_duplicate_total counter",
            f"metering_events_duplicate_total {s.duplicates}",
            "# TYPE metering_dead_letters_total counter",
            *(
                f'metering_dead_letters_total{{reason="{r}"}} {n}'
                for r, n in s.dead_letters.items()
            ),
            "# TYPE metering_db_retries_total counter",
            f"metering_db_retries_total {s.db_retries}",
            "# TYPE metering_redis_failures_total counter",
            f"metering_redis_failures_total {s.redis_failures}",
            "# TYPE metering_last_batch_seconds gauge",
            f"metering_last_batch_seconds {s.last_batch_seconds:.6f}",
            "# TYPE metering_first_batch_timestamp_seconds gauge",
            f"metering_first_batch_timestamp_seconds {s.first_batch_at or 0:.6f}",
            "# TYPE metering_last_batch_timestamp_seconds gauge",
            f"metering_last_batch_timestamp_seconds {s.last_batch_at or 0:.6f}",
            "# TYPE metering_seconds_since_last_batch gauge",
            f"metering_seconds_since_last_batch "
            f"{(time.time() - s.last_batch_at) if s.last_batch_at else -1:.3f}",
        ]
        return self.text("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")
