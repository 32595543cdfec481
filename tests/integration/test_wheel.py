"""The package installs: a wheel built from this tree, installed into fresh
virtualenvs outside the repository, runs ``metering --help`` and migrates an
empty database (the migrations travel inside the wheel), and the ``edge``
extra imports the middleware without the dev tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.integration.conftest import BASE, db_url, drop_database

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "metering", "streams", "sql")


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: a build in the work tree leaves build/ behind.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)], src)
    (built,) = out.glob("metering-*.whl")
    return built


def venv(where: Path, requirement: str) -> Path:
    run([sys.executable, "-m", "venv", str(where)], where.parent)
    run([str(where / "bin" / "pip"), "install", "-q", requirement], where.parent)
    return where / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, no METERING_* from the test run: only what is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "PYTHON"))}
    return {**env, **extra}


async def test_the_wheel_installs_and_migrates_an_empty_database(
    wheel: Path, tmp_path: Path, services: object
):
    bin_dir = venv(tmp_path / "venv", str(wheel))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert "usage: metering" in run([str(bin_dir / "metering"), "--help"], outside, clean_env())

    name = f"w_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(BASE.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        env = clean_env(METERING_DATABASE_URL=db_url(name))
        out = run([str(bin_dir / "metering"), "db", "migrate"], outside, env)
        shipped = sorted(p.stem for p in (ROOT / "sql").glob("*.sql"))
        assert [line.split()[-1] for line in out.splitlines() if line.startswith("applied")] == (
            shipped
        )
        conn = await asyncpg.connect(db_url(name))
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(shipped)
            assert await conn.fetchval("SELECT to_regclass('api_keys')") == "api_keys"
        finally:
            await conn.close()
        # the installed code, not this work tree
        where = run(
            [str(bin_dir / "python"), "-c", "import metering; print(metering.__file__)"],
            outside,
            clean_env(),
        )
        assert str(ROOT) not in where and "site-packages" in where
    finally:
        await drop_database(name)


def test_the_edge_extra_imports_the_middleware_without_dev_tools(wheel: Path, tmp_path: Path):
    bin_dir = venv(tmp_path / "venv", f"{wheel}[edge]")
    probe = (
        "from metering.edge import MeteringEdge, MeteringMiddleware, require_scopes\n"
        "import fastapi, uvicorn\n"
        "import importlib.util as u\n"
        "print([m for m in ('pytest', 'hypothesis', 'mypy', 'ruff') if u.find_spec(m)])\n"
    )
    assert run([str(bin_dir / "python"), "-c", probe], tmp_path, clean_env()).strip() == "[]"
