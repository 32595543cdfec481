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
        ({"METERING_WEB_ENABLED": "maybe"}, "METERING_WEB_ENABLED"),
        ({"METERING_EVENTS_TOPIC": "a", "METERING_DLQ_TOPIC": "a"}, "four different topics"),
    ],
)
def test_bad_settings_name_themselves(env, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


# One value each rule must refuse, and one at the edge it must accept.
BAD_AND_EDGE = {
    "kafka_bootstrap": ("localhost:99999", "kafka,b:65535"),
    "database_url": ("mysql://x", "postgres://u@h/db"),
    "redis_url": ("http://nope", "unix:///tmp/redis.sock"),
    "events_topic": ("usage events", "u" * 249),
    "dlq_topic": ("dlq/x", "usage.events.dlq-2"),
    "alerts_topic": ("", "a"),
    "events_partitions": ("0", "10000"),
    "replication_factor": ("0", "3"),
    "worker_id": ("my worker", "w-1.a_b"),
    "batch_size": ("0", "100000"),
    "batch_within_s": ("0", "60"),
    "writers": ("17", "1"),
    "session_timeout_s": ("0", "1"),
    "reconcile_interval_s": ("0", "1"),
    "db_command_timeout_s": ("0.5", "3600"),
    "web_enabled": None,  # coercion refuses anything but a boolean word
    "web_port": ("70000", "65535"),
    "web_bind": ("not a host!", "localhost"),
    "redis_key_prefix": ("my prefix", "{metering}"),
    "key_pepper": None,  # any string
    "key_cache_ttl_s": ("0", "1"),
    "negative_cache_ttl_s": ("0", "86400"),
    "rotation_grace_hours": ("-1", "0"),
    "anonymous_per_day": ("0", "1"),
    "auth_failures_per_minute": ("0", "1"),
    "ipv6_bucket_prefix": ("129", "128"),
    "edge_instances": ("0", "10000"),
    "redis_failure_mode": ("maybe", "closed"),
    "last_used_flush_s": ("0", "3600"),
    "trusted_proxies": ("garbage", "10.0.0.0/8, 192.0.2.7,2001:db8::/32"),
    "producer_linger_ms": ("-1", "5000"),
    "producer_buffer": ("0", "1"),
    "producer_unbilled_buffer": ("0", "10000000"),
    "refused_records_per_minute": ("-1", "0"),
    "worker_instance_id": ("a b", "worker-1"),
    "detection_enabled": None,  # coercion refuses anything but a boolean word
    "detection_rules": ('{"nope": 1}', '{"spike_factor": 6}'),
    "detection_state_topic": ("bad topic", ""),
    "detection_checkpoint_s": ("0", "0.1"),
    "detection_revoke": None,
    "forced_rotation_hours": ("0", "0.5"),
    "billing_grace_days": ("61", "0"),
    "billing_auto_finalize": None,
    "usage_notices_enabled": None,
    "usage_notices_check_s": ("0.05", "0.1"),
    "rotation_url": ("has space", "https://console.example/keys"),
    "webhook_max_attempts": ("0", "100"),
    "webhook_timeout_s": ("0", "300"),
    "stack_dir": ("a\0b", "/tmp/stack"),
    "archive_dir": ("a\0b", "/var/lib/metering/archive"),
    "kafka_heap": ("512m", "-Xmx1g"),
    "kafka_controller_port": ("70000", "0"),
    "max_future_skew_s": ("-1", "0"),
    "retention_days": ("0", "3650"),
    "partitions_ahead_months": ("25", "0"),
}


def test_every_setting_has_a_rule_and_a_test():
    from dataclasses import fields

    from metering.settings import _RULES

    names = {f.name for f in fields(Settings)}
    assert set(_RULES) == names
    assert set(BAD_AND_EDGE) == names


@pytest.mark.parametrize(
    ("name", "bad", "edge"),
    [(n, v[0], v[1]) for n, v in BAD_AND_EDGE.items() if v is not None],
)
def test_each_setting_refuses_nonsense_in_one_line(name, bad, edge):
    var = f"METERING_{name.upper()}"
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({var: bad})
    message = str(caught.value)
    assert message.startswith(f"{var}=") and "must be" in message and "\n" not in message
    Settings.from_env({var: edge})  # the edge of the range is allowed


def test_the_defaults_are_valid():
    Settings.from_env({})


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
        # every command group
        ["stack", "sideways"],
        ["topics", "delete"],
        ["worker", "--web-port", "0"],
        ["worker", "--web-port", "http"],
        ["simulate", "--users", "0"],
        ["tiers", "create", "gold"],  # --rate-limit is required
        ["tiers", "create", "gold", "--rate-limit", "-3"],
        ["tiers", "create", "gold", "--rate-limit", "5", "--price", "cheap"],
        ["tiers", "set-mode", "pro", "sometimes"],
        ["users", "create"],
        ["users", "promote", "ana@example.com"],
        ["keys", "create", "ana@example.com", "--expires-in", "soon"],
        ["keys", "create", "ana@example.com", "--expires-at", "tomorrow"],
        [
            "keys",
            "create",
            "ana@example.com",
            "--expires-in",
            "1d",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ],
        ["keys", "create", "ana@example.com", "--env", "prod"],
        ["keys", "rotate", "mk_live_3fK9xQ2a", "--grace", "a while"],
        ["keys", "revoke", "mk_live_3fK9xQ2a"],  # --reason is required
        ["counters", "explode"],
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


def test_a_url_password_never_shows_in_the_error():
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"METERING_DATABASE_URL": "postgresql+asyncpg://ana:s3cret@db/x"})
    assert "s3cret" not in str(caught.value) and "ana:***@db/x" in str(caught.value)


def test_a_value_of_the_wrong_type_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="METERING_TRUSTED_PROXIES"):
        Settings.from_env({}, trusted_proxies=None)


def test_the_rules_state_topic_belongs_to_the_consumer_group():
    assert Settings().state_topic == "metering-usage-detection-state"
    assert Settings(worker_id="eu-1").state_topic == "eu-1-detection-state"
    assert Settings(detection_state_topic="x.state").state_topic == "x.state"
