"""Schemathesis fuzzes the metered example app over real HTTP, through its
OpenAPI schema (which documents the edge's own 401/403/429/503): headers,
paths, query strings and bodies, with no key, a bogus key and a valid one.
No 5xx but the documented 503, every response as the schema says."""

from __future__ import annotations

import asyncio
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.test_edge_http import (  # noqa: F401 (fixtures)
    ISSUED,
    edge_settings,
    make_key,
    make_user,
    next_ip,
    servers,
)

ST = Path(sys.executable).with_name("st")


@pytest.mark.parametrize("who", ["no key", "bogus key", "valid key"])
async def test_schemathesis_finds_nothing(servers, edge_settings, db, who):  # noqa: F811
    assert ST.exists() or shutil.which("st"), "schemathesis (a dev dependency) is not installed"
    # The fuzzer sends many invalid keys from one address and expects 401 for
    # each; the failed-auth throttle (tested elsewhere) would answer 429.
    srv = await servers(replace(edge_settings, auth_failures_per_minute=100_000))
    headers = ["-H", f"X-Forwarded-For: {next_ip()}"]
    if who == "bogus key":
        headers += ["-H", "X-API-Key: mk_live_AAAAAAAA_not-a-real-key"]
    elif who == "valid key":
        user = await make_user(db, "enterprise")
        key, _ = await make_key(db, user, scopes=["items:read", "items:write"])
        headers += ["-H", f"X-API-Key: {key}"]
    proc = await asyncio.create_subprocess_exec(
        str(ST),
        "run",
        f"{srv.url}/openapi.json",
        "--checks",
        "all",
        # The edge authenticates before the app routes: an undeclared method
        # with a missing or bad key is 401, not the app's 405 (a client that
        # cannot authenticate learns nothing about the routes).
        "--exclude-checks",
        "unsupported_method,allow_header_conformance",
        "--max-examples",
        "25",
        "--seed",
        "20261206",
        "--request-timeout",
        "5",
        *headers,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    report = out.decode(errors="replace")
    for issued in ISSUED:  # the report prints headers: never a key
        report = report.replace(issued, "<key>")
    assert proc.returncode == 0, report[-6000:]
    assert "generated" in report and " passed" in report
