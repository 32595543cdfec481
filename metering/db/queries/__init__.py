"""Named SQL queries, each written whole in a ``.sql`` file beside this module.

A file holds blocks that start with ``-- name: <name>``; the comment lines
that follow say what the query does, the rest is the query. They are loaded
once, at import, and looked up by name (:func:`get`, which fails at import
time for a name that does not exist). ``tests/integration/test_queries.py``
prepares every one of them against a migrated database, so a typo fails CI.
Nothing here assembles SQL from fragments.
"""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$")


def parse(text: str, source: str = "<sql>") -> dict[str, str]:
    """``{name: query}`` from one file's text."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME.match(line)
        if match:
            if match[1] in found:
                raise ValueError(f"{source}: query {match[1]!r} is defined twice")
            current = found[match[1]] = []
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.startswith("--"):
            raise ValueError(f"{source}: SQL before the first '-- name:' line")
    queries = {}
    for name, lines in found.items():
        body = "\n".join(lines).strip().rstrip(";").strip()
        if not any(ln.strip() and not ln.lstrip().startswith("--") for ln in body.splitlines()):
            raise ValueError(f"{source}: query {name!r} is empty")
        queries[name] = body
    return queries


def load_all() -> dict[str, str]:
    """Every named query of every ``.sql`` file here; names are unique across files."""
    queries: dict[str, str] = {}
    folder = resources.files(__name__)
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, sql in parse(entry.read_text(), entry.name).items():
            if name in queries:
                raise ValueError(f"{entry.name}: query {name!r} is already defined elsewhere")
            queries[name] = sql
    return queries


QUERIES: dict[str, str] = load_all()


def get(name: str) -> str:
    """The query called ``name`` (``KeyError`` at import time for a typo)."""
    return QUERIES[name]
