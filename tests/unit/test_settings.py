"""Settings: typed values parsed once from ALLOT_* variables, refusals that name the variable,
`allot settings` listing the effective values with secrets masked, and a service that stops at
start with the message alone."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from shared.settings import REPO_ROOT, Settings, SettingsError


def test_every_value_is_typed_and_defaults_keep_their_meaning():
    settings = Settings.from_env({})
    assert settings.delivery_max_attempts == 8 and settings.delivery_probe == 30
    assert settings.consumer_lease_seconds == 15 and settings.max_concurrent_rpcs == 1000
    assert settings.auth_max_ttl == 30 * 86400
    assert settings.webhook_allow_private is False
    assert settings.clock == "system" and settings.clock_start is None
    assert settings.quota_regions == () and settings.quota_endpoints == {}
    assert settings.log_level == "INFO" and settings.timezone == "Asia/Shanghai"


def test_values_are_parsed_from_the_environment():
    settings = Settings.from_env(
        {
            "ALLOT_DELIVERY_MAX_ATTEMPTS": "3",
            "ALLOT_AUTH_MAX_TTL": "24h",
            "ALLOT_WEBHOOK_ALLOW_PRIVATE": "yes",
            "ALLOT_CLOCK": "manual",
            "ALLOT_CLOCK_START": "2024-01-01T00:00:00Z",
            "ALLOT_QUOTA_REGIONS": " ap-southeast-1, cn-hangzhou ,",
            "ALLOT_QUOTA_ENDPOINTS": "cn-hangzhou=q2:50051",
            "ALLOT_BILLING_ADDR": " billing:50052 ",
            "ALLOT_LOG_LEVEL": "debug",
        }
    )
    assert settings.delivery_max_attempts == 3 and settings.auth_max_ttl == 86400
    assert settings.webhook_allow_private is True
    assert settings.clock_start == datetime(2024, 1, 1, tzinfo=UTC)
    assert settings.quota_regions == ("ap-southeast-1", "cn-hangzhou")
    assert settings.quota_endpoint_map(["ap-southeast-1", "cn-hangzhou"]) == {
        "ap-southeast-1": "127.0.0.1:50051",
        "cn-hangzhou": "q2:50051",
    }
    assert settings.billing_addr == "billing:50052" and settings.log_level == "DEBUG"


def test_keyword_overrides_win_over_the_environment_and_are_parsed_too():
    settings = Settings.from_env({"ALLOT_DELIVERY_MAX_ATTEMPTS": "3"}, delivery_max_attempts="5")
    assert settings.delivery_max_attempts == 5
    with pytest.raises(SettingsError, match="no such setting: delivery_attempts"):
        Settings.from_env({}, delivery_attempts=5)


def test_the_process_environment_is_read_when_no_mapping_is_given(monkeypatch):
    monkeypatch.setenv("ALLOT_SHUTDOWN_GRACE_SECONDS", "4")
    monkeypatch.setenv("ALLOT_CLOCK", "manual")
    settings = Settings.from_env(clock="system")
    assert settings.shutdown_grace == 4 and settings.clock == "system"
    monkeypatch.setenv("ALLOT_SHUTDOWN_GRACE_SECONDS", "soon")
    with pytest.raises(SettingsError, match="ALLOT_SHUTDOWN_GRACE_SECONDS: expected"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ALLOT_DELIVERY_MAX_ATTEMPTS", "eight", "a whole number"),
        ("ALLOT_DELIVERY_BACKOFF_FACTOR", "-3", "a whole number"),
        ("ALLOT_CONSUMER_LEASE_SECONDS", "1.5", "a whole number"),
        ("ALLOT_DB_RETRY_ATTEMPTS", "0", "a whole number of at least 1"),
        ("ALLOT_AUTH_MAX_TTL", "3w", "a number and a unit"),
        ("ALLOT_CLOCK", "fast", "`system` or `manual`"),
        ("ALLOT_DEDUCTION_POLICY", "cheapest", "`standard` or `expiring_first`"),
        ("ALLOT_TLS_CLIENT_AUTH", "optional", "`none` or `require`"),
        ("ALLOT_TIMEZONE", "Mars/Olympus", "a known time zone"),
        ("ALLOT_CLOCK_START", "2024-01-01T00:00:00", "with a UTC offset"),
        ("ALLOT_CLOCK_START", "yesterday", "an RFC 3339 instant"),
        ("ALLOT_WEBHOOK_ALLOW_PRIVATE", "maybe", "`true` or `false`"),
        ("ALLOT_QUOTA_ENDPOINTS", "cn-hangzhou", "region=host:port"),
        ("ALLOT_LOG_LEVEL", "loud", "a logging level"),
    ],
)
def test_a_refused_value_names_its_variable_what_was_expected_and_what_came(
    variable, value, expected
):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: expected ")
    assert expected in message and message.endswith(f"got {value!r}")


def test_rules_over_several_settings_are_checked_when_built():
    with pytest.raises(SettingsError, match="ALLOT_TLS_CERT_FILE and ALLOT_TLS_KEY_FILE"):
        Settings.from_env({"ALLOT_TLS_CERT_FILE": "/q.pem"})
    with pytest.raises(SettingsError, match="ALLOT_TLS_CLIENT_AUTH=require needs"):
        Settings.from_env({"ALLOT_TLS_CLIENT_AUTH": "require"})


def _allot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_allot_settings_prints_effective_values_sources_and_masks_secrets(tmp_path):
    secret = "s3cret-" + "x" * 40
    run = _allot(
        "settings",
        env={
            "ALLOT_DATA_DIR": str(tmp_path),
            "ALLOT_AUTH_SECRET": secret,
            "ALLOT_BILLING_DATABASE_URL": "postgresql+asyncpg://allot:hunter2@db:5432/billing",
            "ALLOT_SMTP_URL": "smtps://mailer:pa55@mail.example.com:465",
            "ALLOT_DELIVERY_MAX_ATTEMPTS": "4",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=t0psecret",
        },
    )
    assert run.returncode == 0, run.stderr
    settings_part, traces_part = run.stdout.split("\n\n")
    rows = {line.split()[0]: line.split() for line in settings_part.splitlines()[1:]}
    assert set(rows) == set(Settings.env_names().values())
    assert rows["ALLOT_DELIVERY_MAX_ATTEMPTS"][1:3] == ["4", "env"]
    assert rows["ALLOT_SHUTDOWN_GRACE_SECONDS"][1:3] == ["10", "default"]
    assert rows["ALLOT_DATA_DIR"][1:3] == [str(tmp_path), "env"]
    assert rows["ALLOT_AUTH_SECRET"][1:3] == ["********", "env"]
    assert rows["ALLOT_BILLING_DATABASE_URL"][1] == (
        "postgresql+asyncpg://allot:********@db:5432/billing"
    )
    assert rows["ALLOT_SMTP_URL"][1] == "smtps://mailer:********@mail.example.com:465"
    # Traces follow OpenTelemetry's variables: shown, headers (credentials) masked.
    assert traces_part.splitlines()[0] == "traces: otlp (OTEL_* variables)"
    traced = {line.split()[0]: line.split()[1] for line in traces_part.splitlines()[1:]}
    assert traced == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_HEADERS": "***",
    }
    for password in (secret, "hunter2", "pa55", "t0psecret"):
        assert password not in run.stdout


def test_allot_settings_refuses_a_bad_value_with_the_message_alone():
    run = _allot("settings", env={"ALLOT_MAX_CONCURRENT_RPCS": "lots"})
    assert run.returncode == 2
    assert run.stderr == "allot: ALLOT_MAX_CONCURRENT_RPCS: expected a whole number, got 'lots'\n"


def test_a_service_with_a_bad_setting_exits_at_start_without_a_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "services.quota"],
        env={"PATH": "/usr/bin:/bin", "ALLOT_DATA_DIR": str(tmp_path), "ALLOT_CLOCK": "fast"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr == "quota: ALLOT_CLOCK: expected `system` or `manual`, got 'fast'\n"
