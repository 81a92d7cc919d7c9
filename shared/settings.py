"""Typed settings read from `ALLOT_*` environment variables, each with a default and a meaning.

Every value is parsed and checked once, when `Settings` is built (pydantic-settings): a value the
suite cannot run with stops the process at start with `ALLOT_X: expected …, got …`, and code
reads typed values (`settings.delivery_max_attempts` is an int, durations are whole seconds).
`allot settings` lists the effective values, with the token secret and URL passwords masked.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.setting_values import (
    Address,
    ClientAuth,
    ClockKind,
    DeductionPolicy,
    Endpoints,
    EventLoop,
    Instant,
    LogFormat,
    LogLevel,
    Positive,
    Regions,
    Seconds,
    Switch,
    TimeZoneName,
    WholeNumber,
    duration,
    shown,
    whole_number,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CATALOG = REPO_ROOT / "deploy" / "catalog.yaml"


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the variable."""


def parse_duration(text: str, name: str) -> int:
    """`90s`, `30m`, `24h`, `30d` as seconds."""
    try:
        return duration(text)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}, got {text!r}") from None


# Settings whose values `allot settings` does not print whole.
SECRETS = frozenset({"auth_secret"})
URLS_WITH_PASSWORDS = frozenset(
    {
        "quota_database_url",
        "billing_database_url",
        "notification_database_url",
        "smtp_url",
        "sms_gateway_url",
    }
)


def _setting(env: str, default: Any, description: str) -> Any:
    return Field(default, validation_alias=env, description=description)


@dataclass(frozen=True)
class DatabaseBounds:
    """How long a database may keep us waiting (docs/faults.md "Database faults")."""

    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    pool_timeout: float = 5.0
    keepalive: int = 10
    retry_attempts: int = 3
    migration_timeout: float = 600.0


class Settings(BaseSettings):
    """Every setting of the suite, parsed and checked when built. Build it with `from_env()`
    (the process environment, or a mapping in tests); keyword arguments use the field names."""

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=True,
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        validate_default=True,
        enable_decoding=False,  # lists and maps are comma lists, not JSON
    )

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
    quota_addr: Address = _setting("ALLOT_QUOTA_ADDR", "127.0.0.1:50051", "quota listen address")
    billing_addr: Address = _setting("ALLOT_BILLING_ADDR", "127.0.0.1:50052", "billing address")
    notification_addr: Address = _setting(
        "ALLOT_NOTIFICATION_ADDR", "127.0.0.1:50053", "notification listen address"
    )
    quota_regions: Regions = _setting(
        "ALLOT_QUOTA_REGIONS", "", "regions this quota process serves (comma list; empty = all)"
    )
    quota_endpoints: Endpoints = _setting(
        "ALLOT_QUOTA_ENDPOINTS", "", "region=host:port,... (empty: every region -> quota addr)"
    )
    catalog: str = _setting("ALLOT_CATALOG", str(DEFAULT_CATALOG), "catalog file (YAML)")
    timezone: TimeZoneName = _setting("ALLOT_TIMEZONE", "Asia/Shanghai", "billing time zone")
    deduction_policy: DeductionPolicy = _setting(
        "ALLOT_DEDUCTION_POLICY", "standard", "`standard` or `expiring_first`"
    )
    clock: ClockKind = _setting(
        "ALLOT_CLOCK", "system", "`system` or `manual` (serves ClockService)"
    )
    clock_start: Instant = _setting(
        "ALLOT_CLOCK_START", "", "start instant of the manual clock (RFC 3339; empty = now)"
    )
    auth_secret: str = _setting(
        "ALLOT_AUTH_SECRET", "", "HS256 token secret, >= 32 bytes (local runs and tests)"
    )
    auth_secret_file: str = _setting(
        "ALLOT_AUTH_SECRET_FILE", "", "file holding the HS256 token secret"
    )
    auth_jwks_file: str = _setting(
        "ALLOT_AUTH_JWKS_FILE", "", "JWKS of public keys that verify EdDSA / ES256 tokens"
    )
    auth_audience: str = _setting(
        "ALLOT_AUTH_AUDIENCE", "", "required `aud` of tokens (empty: not checked)"
    )
    auth_max_ttl: Seconds = _setting(
        "ALLOT_AUTH_MAX_TTL", "30d", "tokens whose `exp` lies further out are refused (seconds)"
    )
    tls_cert_file: str = _setting(
        "ALLOT_TLS_CERT_FILE", "", "server certificate (PEM); set = serve TLS and present it"
    )
    tls_key_file: str = _setting("ALLOT_TLS_KEY_FILE", "", "the certificate's private key (PEM)")
    tls_ca_file: str = _setting(
        "ALLOT_TLS_CA_FILE", "", "CA that verifies the other services (and clients, with mTLS)"
    )
    tls_client_auth: ClientAuth = _setting(
        "ALLOT_TLS_CLIENT_AUTH", "none", "`none` or `require` (clients need a CA certificate)"
    )
    health_addr: Address = _setting(
        "ALLOT_HEALTH_ADDR",
        "",
        "extra plaintext port serving only gRPC health, for kubelet probes under TLS (empty: none)",
    )
    quota_metrics_addr: Address = _setting(
        "ALLOT_QUOTA_METRICS_ADDR", "127.0.0.1:9151", "quota's Prometheus /metrics (empty: off)"
    )
    billing_metrics_addr: Address = _setting(
        "ALLOT_BILLING_METRICS_ADDR", "127.0.0.1:9152", "billing's Prometheus /metrics (empty: off)"
    )
    notification_metrics_addr: Address = _setting(
        "ALLOT_NOTIFICATION_METRICS_ADDR",
        "127.0.0.1:9153",
        "notification's Prometheus /metrics (empty: off)",
    )
    max_streams_per_caller: WholeNumber = _setting(
        "ALLOT_MAX_STREAMS_PER_CALLER", 16, "concurrent streaming calls per principal"
    )
    max_concurrent_rpcs: WholeNumber = _setting(
        "ALLOT_MAX_CONCURRENT_RPCS", 1000, "calls a server runs at once; more are refused"
    )
    max_connection_age: WholeNumber = _setting(
        "ALLOT_MAX_CONNECTION_AGE_SECONDS",
        0,
        "seconds after which a server asks a client to reconnect, so dns:/// clients find new "
        "replicas (0: never)",
    )
    max_connection_age_grace: WholeNumber = _setting(
        "ALLOT_MAX_CONNECTION_AGE_GRACE_SECONDS",
        30,
        "seconds calls still open on such a connection may finish; streams then end "
        "(UNAVAILABLE) and their consumers resume from their cursor",
    )
    smtp_url: str = _setting("ALLOT_SMTP_URL", "", "email transport (unset: outbox folder)")
    smtp_from: str = _setting("ALLOT_SMTP_FROM", "allot@localhost", "sender address")
    sms_gateway_url: str = _setting("ALLOT_SMS_GATEWAY_URL", "", "HTTP SMS gateway endpoint")
    webhook_allow_private: Switch = _setting(
        "ALLOT_WEBHOOK_ALLOW_PRIVATE",
        False,
        "`true`: webhooks may go to loopback/private/link-local addresses (development, tests)",
    )
    delivery_max_attempts: WholeNumber = _setting(
        "ALLOT_DELIVERY_MAX_ATTEMPTS", 8, "delivery attempts before FAILED"
    )
    delivery_claim: WholeNumber = _setting(
        "ALLOT_DELIVERY_CLAIM_SECONDS",
        120,
        "wall-clock seconds a delivery being sent stays claimed (a crashed send is retried then)",
    )
    delivery_probe: WholeNumber = _setting(
        "ALLOT_DELIVERY_PROBE_SECONDS",
        30,
        "wall-clock seconds between probes of a channel whose deliveries are held back by "
        "failures (0: no probe)",
    )
    delivery_backoff: WholeNumber = _setting(
        "ALLOT_DELIVERY_BACKOFF_SECONDS", 60, "delay before the first delivery retry"
    )
    delivery_backoff_factor: WholeNumber = _setting(
        "ALLOT_DELIVERY_BACKOFF_FACTOR", 3, "each retry waits this many times longer"
    )
    consumer_lease_seconds: WholeNumber = _setting(
        "ALLOT_CONSUMER_LEASE_SECONDS", 15, "how long a stream consumer's lease lasts"
    )
    expiring_notice_days: WholeNumber = _setting(
        "ALLOT_EXPIRING_NOTICE_DAYS", 7, "days before expiry that package_expiring is sent"
    )
    log_level: LogLevel = _setting(
        "ALLOT_LOG_LEVEL", "INFO", "level of the suite's own loggers (libraries stay at WARNING)"
    )
    log_format: LogFormat = _setting(
        "ALLOT_LOG_FORMAT", "text", "`text` or `json` (one JSON object per line)"
    )
    event_loop: EventLoop = _setting(
        "ALLOT_EVENT_LOOP", "auto", "`auto` (uvloop where installed) or `asyncio`"
    )
    shutdown_grace: WholeNumber = _setting(
        "ALLOT_SHUTDOWN_GRACE_SECONDS", 10, "seconds in-flight calls get on SIGTERM"
    )
    due_work_interval: WholeNumber = _setting(
        "ALLOT_DUE_WORK_INTERVAL_SECONDS", 5, "system clock: how often due work is looked for"
    )
    health_database_grace: WholeNumber = _setting(
        "ALLOT_HEALTH_DATABASE_GRACE_SECONDS",
        10,
        "seconds without the database before health says NOT_SERVING (docs/faults.md)",
    )

    db_connect_timeout: Positive = _setting(
        "ALLOT_DB_CONNECT_TIMEOUT_SECONDS", 5, "PostgreSQL: bound on opening a connection"
    )
    db_command_timeout: Positive = _setting(
        "ALLOT_DB_COMMAND_TIMEOUT_SECONDS",
        10,
        "PostgreSQL: bound on one statement (server statement_timeout; the driver waits 1 s more)",
    )
    db_pool_timeout: Positive = _setting(
        "ALLOT_DB_POOL_TIMEOUT_SECONDS", 5, "PostgreSQL: bound on waiting for a pooled connection"
    )
    db_keepalive: Positive = _setting(
        "ALLOT_DB_KEEPALIVE_SECONDS",
        10,
        "PostgreSQL: idle seconds before TCP keepalive probes (3 probes, a third of this apart)",
    )
    db_retry_attempts: Positive = _setting(
        "ALLOT_DB_RETRY_ATTEMPTS",
        3,
        "attempts of a transaction whose connection dropped, before UNAVAILABLE",
    )
    db_migration_timeout: Positive = _setting(
        "ALLOT_DB_MIGRATION_TIMEOUT_SECONDS", 600, "PostgreSQL: bound on one migration statement"
    )

    @model_validator(mode="after")
    def _tls_goes_together(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("ALLOT_TLS_CERT_FILE and ALLOT_TLS_KEY_FILE go together")
        if self.tls_client_auth == "require" and not (self.tls_cert_file and self.tls_ca_file):
            raise ValueError(
                "ALLOT_TLS_CLIENT_AUTH=require needs ALLOT_TLS_CERT_FILE, _KEY_FILE and _CA_FILE"
            )
        return self

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def env_names(cls) -> dict[str, str]:
        """field name -> its environment variable."""
        return {name: info.validation_alias for name, info in cls.model_fields.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """The settings of `environ` (default: the process environment) with `overrides` (field
        names) on top; SettingsError names the first variable whose value is refused."""
        envs = cls.env_names()
        unknown = sorted(set(overrides) - set(envs))
        if unknown:
            raise SettingsError(f"no such setting: {', '.join(unknown)}")
        given = {envs[name]: value for name, value in overrides.items()}
        try:
            if environ is None:
                return cls(**given)  # pydantic-settings reads os.environ beneath them
            values = {env: environ[env] for env in envs.values() if env in environ}
            return cls.model_validate({**values, **given})
        except ValidationError as exc:
            raise _settings_error(exc) from None

    @classmethod
    def database_bounds_from_env(cls, environ: Mapping[str, str] | None = None) -> DatabaseBounds:
        """Only the database bounds, for code that opens a database outside a service."""
        environ = os.environ if environ is None else environ
        names = {name: env for name, env in cls.env_names().items() if name.startswith("db_")}
        fields = {name: cls.model_fields[name] for name in names}
        values = {}
        for name, env in names.items():
            raw = environ.get(env)
            try:
                values[name[3:]] = fields[name].default if raw is None else whole_number(1)(raw)
            except ValueError as exc:
                raise SettingsError(f"{env}: {exc}, got {raw!r}") from None
        return DatabaseBounds(**values)

    # --- listing ----------------------------------------------------------------------------
    def effective(self) -> list[tuple[str, str, str, str]]:
        """(variable, value, source, meaning) of every setting, secrets masked: what
        `allot settings` prints. Source is `env` for a value set explicitly, else `default`."""
        rows = []
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            source = "env" if name in self.model_fields_set else "default"
            value = shown(value, secret=name in SECRETS, url=name in URLS_WITH_PASSWORDS)
            rows.append((info.validation_alias, value, source, info.description))
        return rows

    # --- derived values ---------------------------------------------------------------------
    @property
    def database_bounds(self) -> DatabaseBounds:
        return DatabaseBounds(
            connect_timeout=self.db_connect_timeout,
            command_timeout=self.db_command_timeout,
            pool_timeout=self.db_pool_timeout,
            keepalive=self.db_keepalive,
            retry_attempts=self.db_retry_attempts,
            migration_timeout=self.db_migration_timeout,
        )

    @property
    def data_path(self) -> pathlib.Path:
        return pathlib.Path(self.data_dir)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def quota_endpoint_map(self, regions: list[str]) -> dict[str, str]:
        """region -> quota address; every region defaults to ALLOT_QUOTA_ADDR."""
        return {**{region: self.quota_addr for region in regions}, **self.quota_endpoints}

    def quota_addresses(self, regions: list[str]) -> list[str]:
        """The distinct quota deployments: regions served by one endpoint share its stream."""
        return sorted(set(self.quota_endpoint_map(regions).values()))

    def database_url(self, service: str) -> str:
        url = getattr(self, f"{service}_database_url")
        if url:
            return url
        return f"sqlite+aiosqlite:///{(self.data_path / f'{service}.db').resolve()}"

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)

    def optional_signing_secret(self) -> str | None:
        """The HS256 secret if one is configured; with a JWKS and no explicit secret, none
        (production: services verify tokens but cannot mint them; docs/security.md)."""
        if self.auth_secret or self.auth_secret_file or not self.auth_jwks_file:
            return self.signing_secret()
        return None

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


def _settings_error(exc: ValidationError) -> SettingsError:
    """`ALLOT_X: expected …, got …` for each refused value (the first few)."""
    envs = Settings.env_names()
    messages = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule over several settings names them itself
            messages.append(message)
            continue
        field = str(error["loc"][0])
        env = envs.get(field, field)
        messages.append(f"{env}: {message}, got {error['input']!r}")
    return SettingsError("; ".join(messages[:3]))
