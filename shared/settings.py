"""Typed settings read from `ALLOT_*` environment variables, each with a default and a meaning."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CATALOG = REPO_ROOT / "deploy" / "catalog.yaml"


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the variable."""


def parse_duration(text: str, name: str) -> int:
    """`90s`, `30m`, `24h`, `30d` as seconds."""
    match = re.fullmatch(r"([0-9]{1,9})([smhd])", text.strip())
    if not match or int(match[1]) == 0:
        raise SettingsError(f"{name} is a number and a unit (90s, 30m, 24h, 30d), got {text!r}")
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _setting(env: str, default: str, description: str):
    return field(default=default, metadata={"env": env, "description": description})


@dataclass(frozen=True)
class DatabaseBounds:
    """How long a database may keep us waiting (docs/faults.md "Database faults")."""

    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    pool_timeout: float = 5.0
    keepalive: int = 10
    retry_attempts: int = 3
    migration_timeout: float = 600.0


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
    auth_max_ttl: str = _setting(
        "ALLOT_AUTH_MAX_TTL", "30d", "tokens whose `exp` lies further out are refused"
    )
    tls_cert_file: str = _setting(
        "ALLOT_TLS_CERT_FILE", "", "server certificate (PEM); set = serve TLS and present it"
    )
    tls_key_file: str = _setting("ALLOT_TLS_KEY_FILE", "", "the certificate's private key (PEM)")
    tls_ca_file: str = _setting(
        "ALLOT_TLS_CA_FILE", "", "CA that verifies the other services (and clients, with mTLS)"
    )
    tls_client_auth: str = _setting(
        "ALLOT_TLS_CLIENT_AUTH", "none", "`none` or `require` (clients need a CA certificate)"
    )
    health_addr: str = _setting(
        "ALLOT_HEALTH_ADDR",
        "",
        "extra plaintext port serving only gRPC health, for kubelet probes under TLS (empty: none)",
    )
    max_streams_per_caller: str = _setting(
        "ALLOT_MAX_STREAMS_PER_CALLER", "16", "concurrent streaming calls per principal"
    )
    max_concurrent_rpcs: str = _setting(
        "ALLOT_MAX_CONCURRENT_RPCS", "1000", "calls a server runs at once; more are refused"
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
    delivery_claim: str = _setting(
        "ALLOT_DELIVERY_CLAIM_SECONDS",
        "120",
        "wall-clock seconds a delivery being sent stays claimed (a crashed send is retried then)",
    )
    delivery_probe: str = _setting(
        "ALLOT_DELIVERY_PROBE_SECONDS",
        "30",
        "wall-clock seconds between probes of a channel whose deliveries are held back by "
        "failures (0: no probe)",
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
    health_database_grace: str = _setting(
        "ALLOT_HEALTH_DATABASE_GRACE_SECONDS",
        "10",
        "seconds without the database before health says NOT_SERVING (docs/faults.md)",
    )

    db_connect_timeout: str = _setting(
        "ALLOT_DB_CONNECT_TIMEOUT_SECONDS", "5", "PostgreSQL: bound on opening a connection"
    )
    db_command_timeout: str = _setting(
        "ALLOT_DB_COMMAND_TIMEOUT_SECONDS",
        "10",
        "PostgreSQL: bound on one statement (server statement_timeout; the driver waits 1 s more)",
    )
    db_pool_timeout: str = _setting(
        "ALLOT_DB_POOL_TIMEOUT_SECONDS", "5", "PostgreSQL: bound on waiting for a pooled connection"
    )
    db_keepalive: str = _setting(
        "ALLOT_DB_KEEPALIVE_SECONDS",
        "10",
        "PostgreSQL: idle seconds before TCP keepalive probes (3 probes, a third of this apart)",
    )
    db_retry_attempts: str = _setting(
        "ALLOT_DB_RETRY_ATTEMPTS",
        "3",
        "attempts of a transaction whose connection dropped, before UNAVAILABLE",
    )
    db_migration_timeout: str = _setting(
        "ALLOT_DB_MIGRATION_TIMEOUT_SECONDS", "600", "PostgreSQL: bound on one migration statement"
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
        self.auth_max_ttl_seconds  # noqa: B018
        self.database_bounds  # noqa: B018
        if self.tls_client_auth not in ("none", "require"):
            raise SettingsError("ALLOT_TLS_CLIENT_AUTH must be `none` or `require`")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError("ALLOT_TLS_CERT_FILE and ALLOT_TLS_KEY_FILE go together")
        if self.tls_client_auth == "require" and not (self.tls_cert_file and self.tls_ca_file):
            raise SettingsError(
                "ALLOT_TLS_CLIENT_AUTH=require needs ALLOT_TLS_CERT_FILE, _KEY_FILE and _CA_FILE"
            )
        for name in (
            "delivery_max_attempts",
            "shutdown_grace",
            "due_work_interval",
            "health_database_grace",
            "expiring_notice_days",
            "delivery_backoff",
            "delivery_claim",
            "delivery_probe",
            "delivery_backoff_factor",
            "consumer_lease_seconds",
            "max_streams_per_caller",
            "max_concurrent_rpcs",
        ):
            value = getattr(self, name)
            if not (value.isascii() and value.isdigit()):
                env = self.__dataclass_fields__[name].metadata["env"]
                raise SettingsError(f"{env} must be a whole number, got {value!r}")

    @property
    def database_bounds(self) -> DatabaseBounds:
        values = {}
        for name in (
            "connect_timeout",
            "command_timeout",
            "pool_timeout",
            "keepalive",
            "retry_attempts",
            "migration_timeout",
        ):
            raw = getattr(self, f"db_{name}")
            if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
                env = self.__dataclass_fields__[f"db_{name}"].metadata["env"]
                raise SettingsError(f"{env} must be a whole number of at least 1, got {raw!r}")
            values[name] = int(raw)
        return DatabaseBounds(**values)

    @classmethod
    def database_bounds_from_env(cls, environ: dict[str, str] | None = None) -> DatabaseBounds:
        """Only the database bounds, for code that opens a database outside a service."""
        environ = os.environ if environ is None else environ
        values = {
            f.name: environ[f.metadata["env"]]
            for f in dataclasses.fields(cls)
            if f.name.startswith("db_") and f.metadata["env"] in environ
        }
        return cls(**values).database_bounds

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

    @property
    def auth_max_ttl_seconds(self) -> int:
        return parse_duration(self.auth_max_ttl, "ALLOT_AUTH_MAX_TTL")

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
