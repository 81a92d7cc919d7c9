"""Typed settings read from `ALLOT_*` environment variables, each with a default and a meaning."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CATALOG = REPO_ROOT / "deploy" / "catalog.yaml"


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the variable."""


def _setting(env: str, default: str, description: str):
    return field(default=default, metadata={"env": env, "description": description})


@dataclass(frozen=True)
class Settings:
    """Every setting of the suite. Values are the raw strings; properties parse them."""

    data_dir: str = _setting("ALLOT_DATA_DIR", "./var", "local SQLite files, dev secret, logs")
    quota_database_url: str = _setting(
        "ALLOT_QUOTA_DATABASE_URL", "", "quota's SQLAlchemy URL (default: SQLite in data dir)"
    )
    billing_database_url: str = _setting(
        "ALLOT_BILLING_DATABASE_URL", "", "billing's SQLAlchemy URL (default: SQLite in data dir)"
    )
    notification_database_url: str = _setting(
        "ALLOT_NOTIFICATION_DATABASE_URL", "", "notification's URL (default: SQLite in data dir)"
    )
    quota_addr: str = _setting("ALLOT_QUOTA_ADDR", "127.0.0.1:50051", "quota listen address")
    billing_addr: str = _setting("ALLOT_BILLING_ADDR", "127.0.0.1:50052", "billing address")
    notification_addr: str = _setting(
        "ALLOT_NOTIFICATION_ADDR", "127.0.0.1:50053", "notification listen address"
    )
    quota_regions: str = _setting(
        "ALLOT_QUOTA_REGIONS", "", "regions this quota process serves (comma list; empty = all)"
    )
    quota_endpoints: str = _setting(
        "ALLOT_QUOTA_ENDPOINTS", "", "region=host:port,... (empty: every region -> quota addr)"
    )
    catalog: str = _setting("ALLOT_CATALOG", str(DEFAULT_CATALOG), "catalog file (YAML)")
    timezone: str = _setting("ALLOT_TIMEZONE", "Asia/Shanghai", "billing time zone")
    deduction_policy: str = _setting(
        "ALLOT_DEDUCTION_POLICY", "standard", "`standard` or `expiring_first`"
    )
    clock: str = _setting("ALLOT_CLOCK", "system", "`system` or `manual` (serves ClockService)")
    clock_start: str = _setting(
        "ALLOT_CLOCK_START", "", "start instant of the manual clock (RFC 3339; empty = now)"
    )
    auth_secret: str = _setting("ALLOT_AUTH_SECRET", "", "HS256 token signing secret")
    auth_secret_file: str = _setting(
        "ALLOT_AUTH_SECRET_FILE", "", "file holding the token signing secret"
    )
    smtp_url: str = _setting("ALLOT_SMTP_URL", "", "email transport (unset: outbox folder)")
    smtp_from: str = _setting("ALLOT_SMTP_FROM", "allot@localhost", "sender address")
    sms_gateway_url: str = _setting("ALLOT_SMS_GATEWAY_URL", "", "HTTP SMS gateway endpoint")
    webhook_allow_private: str = _setting(
        "ALLOT_WEBHOOK_ALLOW_PRIVATE",
        "false",
        "`true`: webhooks may go to loopback/private/link-local addresses (development, tests)",
    )
    delivery_max_attempts: str = _setting(
        "ALLOT_DELIVERY_MAX_ATTEMPTS", "8", "delivery attempts before FAILED"
    )
    delivery_backoff: str = _setting(
        "ALLOT_DELIVERY_BACKOFF_SECONDS", "60", "delay before the first delivery retry"
    )
    delivery_backoff_factor: str = _setting(
        "ALLOT_DELIVERY_BACKOFF_FACTOR", "3", "each retry waits this many times longer"
    )
    consumer_lease_seconds: str = _setting(
        "ALLOT_CONSUMER_LEASE_SECONDS", "15", "how long a stream consumer's lease lasts"
    )
    expiring_notice_days: str = _setting(
        "ALLOT_EXPIRING_NOTICE_DAYS", "7", "days before expiry that package_expiring is sent"
    )
    log_level: str = _setting("ALLOT_LOG_LEVEL", "INFO", "logging level")
    shutdown_grace: str = _setting(
        "ALLOT_SHUTDOWN_GRACE_SECONDS", "10", "seconds in-flight calls get on SIGTERM"
    )
    due_work_interval: str = _setting(
        "ALLOT_DUE_WORK_INTERVAL_SECONDS", "5", "system clock: how often due work is looked for"
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: str) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            if f.metadata["env"] in environ:
                values[f.name] = environ[f.metadata["env"]]
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, for docs and `allot settings`."""
        return [
            (f.metadata["env"], f.default, f.metadata["description"])
            for f in dataclasses.fields(cls)
        ]

    def validate(self) -> None:
        self.tz  # noqa: B018 - parse now so a bad value stops the service at start
        if self.deduction_policy not in ("standard", "expiring_first"):
            raise SettingsError("ALLOT_DEDUCTION_POLICY must be `standard` or `expiring_first`")
        if self.clock not in ("system", "manual"):
            raise SettingsError("ALLOT_CLOCK must be `system` or `manual`")
        self.manual_clock_start  # noqa: B018
        self.private_webhooks_allowed  # noqa: B018
        for name in (
            "delivery_max_attempts",
            "shutdown_grace",
            "due_work_interval",
            "expiring_notice_days",
            "delivery_backoff",
            "delivery_backoff_factor",
            "consumer_lease_seconds",
        ):
            value = getattr(self, name)
            if not value.isdigit():
                env = self.__dataclass_fields__[name].metadata["env"]
                raise SettingsError(f"{env} must be a whole number, got {value!r}")

    @property
    def data_path(self) -> pathlib.Path:
        return pathlib.Path(self.data_dir)

    @property
    def tz(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise SettingsError(f"ALLOT_TIMEZONE: unknown time zone {self.timezone!r}") from exc

    @property
    def manual_clock_start(self) -> datetime | None:
        if not self.clock_start:
            return None
        try:
            value = datetime.fromisoformat(self.clock_start.replace("Z", "+00:00"))
        except ValueError as exc:
            raise SettingsError(f"ALLOT_CLOCK_START is not RFC 3339: {self.clock_start!r}") from exc
        if value.tzinfo is None:
            raise SettingsError("ALLOT_CLOCK_START needs a UTC offset")
        return value

    @property
    def private_webhooks_allowed(self) -> bool:
        value = self.webhook_allow_private.strip().lower()
        if value in ("true", "1", "yes", "on"):
            return True
        if value in ("false", "0", "no", "off", ""):
            return False
        raise SettingsError(
            "ALLOT_WEBHOOK_ALLOW_PRIVATE must be `true` or `false`, "
            f"got {self.webhook_allow_private!r}"
        )

    @property
    def served_regions(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.quota_regions.split(",") if r.strip())

    def quota_endpoint_map(self, regions: list[str]) -> dict[str, str]:
        """region -> quota address; every region defaults to ALLOT_QUOTA_ADDR."""
        endpoints = {region: self.quota_addr for region in regions}
        for item in filter(None, (p.strip() for p in self.quota_endpoints.split(","))):
            region, sep, addr = item.partition("=")
            if not sep or not region or not addr:
                raise SettingsError(
                    f"ALLOT_QUOTA_ENDPOINTS: expected region=host:port, got {item!r}"
                )
            endpoints[region.strip()] = addr.strip()
        return endpoints

    def quota_addresses(self, regions: list[str]) -> list[str]:
        """The distinct quota deployments: regions served by one endpoint share its stream."""
        return sorted(set(self.quota_endpoint_map(regions).values()))

    def database_url(self, service: str) -> str:
        url = getattr(self, f"{service}_database_url")
        if url:
            return url
        return f"sqlite+aiosqlite:///{(self.data_path / f'{service}.db').resolve()}"

    def signing_secret(self) -> str:
        """The token secret: ALLOT_AUTH_SECRET, else the file of ALLOT_AUTH_SECRET_FILE, else the
        dev secret generated into the data dir by `allot run`."""
        if self.auth_secret:
            return self.auth_secret
        path = pathlib.Path(self.auth_secret_file) if self.auth_secret_file else None
        if path is None:
            path = self.data_path / "auth-secret"
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise SettingsError(
                "no token secret: set ALLOT_AUTH_SECRET or ALLOT_AUTH_SECRET_FILE "
                f"(could not read {path}: {exc.strerror})"
            ) from exc
        if not secret:
            raise SettingsError(f"token secret file {path} is empty")
        return secret
