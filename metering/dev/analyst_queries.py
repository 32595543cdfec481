"""The ten analyst queries of docs/analysts.md, read from the document itself
(one source for the reader, the plan test and the benchmark), with psql's
variables turned into parameters. Runs from a checkout only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).parents[2] / "docs" / "analysts.md"


def ten_queries() -> list[tuple[str, str]]:
    text = DOC.read_text()
    section = text.split("## Ten queries", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^### (\d+\. .+?)\n.*?```sql\n(.*?)```", section, flags=re.S | re.M)
    return [(title, sql.strip().rstrip(";")) for title, sql in found]


def bound(sql: str) -> str:
    """psql's variables as parameters: $1 the user, $2 the month."""
    return sql.replace(":'user_id'", "$1::uuid").replace(":'month'", "$2::date")


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += nodes(child)
    return out
