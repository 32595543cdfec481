import subprocess
import sys

import pytest

from metering.cli import main
from metering.errors import ConfigurationError
from metering.settings import Settings


def test_settings_from_env_and_overrides():
    s = Settings.from_env({"METERING_BATCH_SIZE": "100", "METERING_WEB_ENABLED": "no"})
    assert s.batch_size == 100 and s.web_enabled is False
    assert Settings.from_env({}, batch_size=7).batch_size == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"METERING_BATCH_SIZE": "many"}, "METERING_BATCH_SIZE='many' is not a valid int"),
        ({"METERING_BATCH_SIZE": "0"}, "METERING_BATCH_SIZE must be >= 1"),
        ({"METERING_DATABASE_URL": "mysql://x"}, "METERING_DATABASE_URL"),
        ({"METERING_WEB_ENABLED": "maybe"}, "METERING_WEB_ENABLED"),
        ({"METERING_PRODUCER_LINGER_MS": "-1"}, "METERING_PRODUCER_LINGER_MS must be between"),
        ({"METERING_PRODUCER_BUFFER": "0"}, "METERING_PRODUCER_BUFFER must be >= 1"),
    ],
)
def test_bad_settings_name_themselves(env, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--events", "-5"],
        ["simulate", "--rate", "fast"],
        ["simulate", "--duplicates", "2"],
        ["usage", "--user", "bob"],
        ["usage", "--days", "0"],
        ["db", "explode"],
        ["nonsense"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metering")
    assert "Traceback" not in err


def test_bad_environment_is_one_line_exit_1():
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "usage"],
        env={"METERING_REDIS_URL": "http://nope", "PATH": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "METERING_REDIS_URL" in proc.stderr


def test_the_pepper_never_shows_in_repr():
    s = Settings.from_env({"METERING_KEY_PEPPER": "pepper-value"})
    assert s.key_pepper == "pepper-value"
    assert "pepper-value" not in repr(s)
