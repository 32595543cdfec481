"""The layout's rules (docs/architecture.md), held by a test rather than by memory."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted([*(ROOT / "metering").rglob("*.py"), *(ROOT / "streams").rglob("*.py")])


def test_there_are_modules_to_check():
    assert len(MODULES) > 40


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}, "split these (STYLE.md: start flat, split past ~400 lines)"


def test_only_settings_read_the_environment():
    """Library code gets its configuration passed in (metering/settings.py);
    passing the environment on to a subprocess is fine, reading it is not."""
    readers = []
    for path in MODULES:
        rel = str(path.relative_to(ROOT))
        if rel in ("metering/settings.py", "metering/metrics.py"):
            continue  # metrics: prometheus-client's own PROMETHEUS_MULTIPROC_DIR
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "getenv")
                and "environ" in ast.unparse(node.func.value) + node.func.attr
            ) or (isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ"):
                readers.append(f"{rel}:{node.lineno}")
    assert readers == []


def test_the_worker_app_is_built_from_settings_without_connecting():
    """create_app builds a worker for any settings in-process: nothing is
    reached at build time (these addresses answer nothing)."""
    from metering.settings import Settings
    from streams.app import create_app

    nowhere = Settings(
        kafka_bootstrap="127.0.0.1:1",
        database_url="postgresql://x:y@127.0.0.1:1/none",
        redis_url="redis://127.0.0.1:1/0",
    )
    a = create_app(
        Settings.from_env({}, **{**_fields(nowhere), "worker_id": "a", "web_port": 7001})
    )
    b = create_app(
        Settings.from_env({}, **{**_fields(nowhere), "worker_id": "b", "web_port": 7002})
    )
    assert (a.conf.id, a.conf.web_port) == ("a", 7001)
    assert (b.conf.id, b.conf.web_port) == ("b", 7002)
    assert a.conf.broker[0].port == 1


def _fields(settings: object) -> dict[str, object]:
    return {f: getattr(settings, f) for f in settings.__dataclass_fields__}  # type: ignore[attr-defined]
