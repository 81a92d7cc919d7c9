"""`allot`: the suite's command line — mint tokens, run migrations, run the whole suite.

allot token --role ROLE [--account ID] [--user ID] [--regions R1,R2] [--ttl 24h] [--key FILE]
allot keys new DIR [--alg EdDSA|ES256] [--kid ID]   # a key pair and its JWKS
allot certs new DIR [--days 90]   # a development CA, a certificate per service, a client's
allot migrate SERVICE
allot run          # every service, on SQLite under ALLOT_DATA_DIR, in the foreground
                   # (TLS: ALLOT_<SERVICE>_TLS_CERT_FILE/_KEY_FILE per service, or the shared
                   # ALLOT_TLS_CERT_FILE/_KEY_FILE, with ALLOT_TLS_CA_FILE; `make run-mtls`)
allot settings     # every ALLOT_* setting: value, source (env/default), meaning; OTEL_* traces
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import secrets
import shlex
import signal
import subprocess
import sys
from importlib import import_module

from shared import certs, keys, tracing
from shared.auth import ACCOUNT_FULL, ADMIN, GATEWAY, ROLES
from shared.cli_status import cmd_status
from shared.settings import Settings, SettingsError, parse_duration
from shared.tokens import TokenSigner, signer_for

# The services of the suite: name -> module run with `python -m`.
SERVICES = {
    "quota": "services.quota",
    "billing": "services.billing",
    "notification": "services.notification",
}
DEMO_ACCOUNT = "demo-account"
READY_TIMEOUT = 60.0


def parse_ttl(text: str) -> int:
    try:
        return parse_duration(text, "ttl")
    except SettingsError as exc:
        raise argparse.ArgumentTypeError("ttl is a number and a unit: 90s, 30m, 24h, 7d") from exc


def cmd_token(args, settings: Settings) -> int:
    regions = [r for r in (args.regions or "").split(",") if r]
    if args.key:
        signer = TokenSigner.from_key_file(args.key, audience=settings.auth_audience)
    else:
        signer = TokenSigner(settings.signing_secret(), audience=settings.auth_audience)
    print(signer.mint(args.role, args.account, args.user, regions or None, args.ttl))
    return 0


def cmd_keys(args, settings: Settings) -> int:
    private, jwks = keys.new_key_pair(args.dir, args.alg, args.kid)
    print(f"private key (keep it with whoever mints tokens): {private}")
    print(f"JWKS (give it to every service as ALLOT_AUTH_JWKS_FILE): {jwks}")
    return 0


def cmd_certs(args, settings: Settings | None) -> int:
    directory = pathlib.Path(args.dir)
    kept = certs.load_ca(directory) is not None
    # The folders it makes (the data dir of `make run-mtls`) are private, like `allot run`'s.
    previous = os.umask(0o077)
    try:
        written = certs.write_dev_certificates(directory, args.days)
    finally:
        os.umask(previous)
    print(
        f"CA ({'kept' if kept else 'new'}; every service trusts it as ALLOT_TLS_CA_FILE): "
        f"{written['ca']}"
    )
    for service in SERVICES:
        print(f"  {service:<13} {written[service]} (key {directory / f'{service}-key.pem'})")
    print(
        f"  {'client':<13} {written['client']} (key {directory / 'client-key.pem'}; "
        "for grpcurl, names no service: a token is still needed)"
    )
    print(f"Valid {args.days} days. Run `allot certs new {directory}` again to issue new ones.")
    return 0


def cmd_migrate(args, settings: Settings) -> int:
    from shared.db import Database
    from shared.migrations import upgrade

    service_module = import_module(f"{SERVICES[args.service]}.service")
    service_class = next(
        v
        for v in vars(service_module).values()
        if isinstance(v, type) and getattr(v, "name", None) == args.service
    )

    async def main() -> None:
        db = Database(settings.database_url(args.service), settings.database_bounds)
        try:
            await upgrade(db.engine, args.service, service_class.migrations_dir)
        finally:
            await db.dispose()

    asyncio.run(main())
    print(f"{args.service}: migrated {settings.database_url(args.service)}")
    return 0


def ensure_dev_secret(settings: Settings) -> None:
    """Local runs get a generated secret in the data dir unless one (or a JWKS) is configured."""
    if settings.auth_secret or settings.auth_secret_file or settings.auth_jwks_file:
        return
    path = settings.data_path / "auth-secret"
    if not path.exists():
        keys.write_private(path, (secrets.token_urlsafe(48) + "\n").encode())


def service_env(base: dict[str, str], name: str) -> dict[str, str]:
    """A child's environment: its own certificate (ALLOT_<SERVICE>_TLS_CERT_FILE / _KEY_FILE)
    as ALLOT_TLS_CERT_FILE / _KEY_FILE, else the shared ones (docs/security.md)."""
    env = dict(base)
    prefix = f"ALLOT_{name.upper()}_TLS_"
    own = {part: base.get(prefix + part, "") for part in ("CERT_FILE", "KEY_FILE")}
    if any(own.values()):
        if not all(own.values()):
            raise SettingsError(f"{prefix}CERT_FILE and {prefix}KEY_FILE go together")
        for part, path in own.items():
            env[f"ALLOT_TLS_{part}"] = path
    return env


def grpcurl_flags(settings: Settings) -> str:
    """How grpcurl reaches the suite: plaintext, or TLS verified against the CA (with the
    client certificate of `allot certs new` beside it when clients must present one)."""
    if not settings.tls_enabled:
        return "-plaintext"
    flags = []
    if settings.tls_ca_file:
        ca = pathlib.Path(settings.tls_ca_file).resolve()
        flags += ["-cacert", str(ca)]
        if settings.tls_client_auth == "require":
            flags += ["-cert", str(ca.parent / "client.pem")]
            flags += ["-key", str(ca.parent / "client-key.pem")]
    return " ".join(shlex.quote(f) for f in flags)


def cmd_run(args, _settings: Settings | None = None) -> int:
    # Everything the suite writes into the data dir (secret, tokens, databases, outbox) is
    # for this user only (docs/security.md); the children inherit the mask.
    os.umask(0o077)
    base = dict(os.environ)
    # `allot run` is the developer's whole suite on one machine: webhooks to a local receiver
    # are what a developer points contacts at. A deployment runs each service on its own and
    # keeps the default (refused). Set it to false here to try the guard.
    base.setdefault("ALLOT_WEBHOOK_ALLOW_PRIVATE", "true")
    envs: dict[str, dict[str, str]] = {}
    for name in SERVICES:  # every child's settings checked before anything starts
        env = service_env(base, name)
        try:
            child_settings = Settings.from_env(env)
        except SettingsError as exc:
            raise SettingsError(f"{name}: {exc}") from exc
        if child_settings.tls_enabled and not child_settings.tls_ca_file:
            raise SettingsError(
                f"{name} serves TLS: set ALLOT_TLS_CA_FILE too, so the services can verify "
                "each other when they call"
            )
        envs[name] = env
    settings = Settings.from_env(envs["quota"])
    settings.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    ensure_dev_secret(settings)
    for env in envs.values():
        env["ALLOT_DATA_DIR"] = str(settings.data_path.resolve())
    children: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    addresses = {}
    for name, module in SERVICES.items():
        child = subprocess.Popen(
            [sys.executable, "-m", module], env=envs[name], stdout=subprocess.PIPE, text=True
        )
        children[name] = child
        for line in child.stdout:  # the child prints one READY line, then nothing
            if line.startswith(f"READY {name} "):
                addresses[name] = line.split()[2]
                break
        else:
            stop()
            print(f"{name} did not start; see the log above", file=sys.stderr)
            return 1
    signer = signer_for(settings)
    tokens = {}
    if signer is not None:
        ttl = min(30 * 86400, settings.auth_max_ttl)
        tokens = {
            "ADMIN_TOKEN": signer.mint(ADMIN, user="operator", ttl_seconds=ttl),
            "GATEWAY_TOKEN": signer.mint(GATEWAY, user="gateway", ttl_seconds=ttl),
            "ACCOUNT_TOKEN": signer.mint(
                ACCOUNT_FULL, account=DEMO_ACCOUNT, user="demo-user", ttl_seconds=ttl
            ),
        }
    flags = grpcurl_flags(settings)
    env_file = settings.data_path / "tokens.env"
    keys.write_private(
        env_file,
        (
            "".join(f"export {k}={v}\n" for k, v in tokens.items())
            + "".join(f"export ALLOT_{n.upper()}_ADDR={a}\n" for n, a in addresses.items())
            + f"export GRPCURL_FLAGS={shlex.quote(flags)}\n"
        ).encode(),
    )
    print("\nAllot is running" + (" with TLS." if settings.tls_enabled else "."))
    for name, addr in addresses.items():
        print(f"  {name:<13} {addr}")
    if tokens:
        print(f"\nReady tokens (valid 30 days; account token is for {DEMO_ACCOUNT!r}):")
        for key, value in tokens.items():
            print(f"  {key}={value}")
    else:
        print("\nTokens are verified with ALLOT_AUTH_JWKS_FILE: mint them with `allot token --key`")
    print(f"\nThe same, for your shell:  source {env_file}")
    if settings.tls_enabled:
        print("\nCall it with grpcurl over TLS (no -plaintext; `$GRPCURL_FLAGS` in tokens.env):")
        print(f"  grpcurl {flags} {addresses['billing']} list")
        print(
            f"  grpcurl {flags} -H \"authorization: Bearer $ADMIN_TOKEN\" -d '{{}}' "
            f"{addresses['billing']} allot.billing.v1.BillingService/ListAccounts"
        )
    print("Stop with Ctrl-C.\n", flush=True)
    for child in children.values():
        child.wait()
    return 0 if stopping else 1


def cmd_settings(args, settings: Settings) -> int:
    """Every setting's effective value, whether it came from the environment or is the default,
    and its meaning; the token secret and passwords in URLs masked."""
    print(f"{'VARIABLE':<36} {'VALUE':<28} {'SOURCE':<8} MEANING")
    for env, value, source, description in settings.effective():
        print(f"{env:<36} {value or '(empty)':<28} {source:<8} {description}")
    # Traces follow OpenTelemetry's own variables (docs/operations.md, "Traces").
    try:
        exporter = tracing.wanted_exporter()
    except SettingsError as exc:
        exporter = f"refused: {exc}"
    print(f"\ntraces: {exporter or 'off'} (OTEL_* variables)")
    for name in sorted(k for k in os.environ if k.startswith("OTEL_")):
        secret = "HEADERS" in name or "KEY" in name
        print(f"{name:<36} {'***' if secret else os.environ[name]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="allot", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="print a signed token")
    token.add_argument("--role", required=True, choices=sorted(ROLES))
    token.add_argument("--account")
    token.add_argument("--user")
    token.add_argument("--regions", help="comma list of regions the token is valid in")
    token.add_argument("--ttl", type=parse_ttl, default=parse_ttl("24h"))
    token.add_argument("--key", help="sign with this private key (PEM) instead of the secret")
    keys_cmd = sub.add_parser("keys", help="make token signing keys")
    keys_sub = keys_cmd.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="write a key pair and its JWKS into DIR")
    new.add_argument("dir")
    new.add_argument("--alg", choices=["EdDSA", "ES256"], default="EdDSA")
    new.add_argument("--kid", help="key id (default: allot-<date>-<random>)")
    certs_cmd = sub.add_parser("certs", help="make development TLS certificates")
    certs_sub = certs_cmd.add_subparsers(dest="certs_command", required=True)
    new_certs = certs_sub.add_parser(
        "new", help="write a CA, a certificate per service and a client certificate into DIR"
    )
    new_certs.add_argument("dir")
    new_certs.add_argument("--days", type=int, default=certs.DEFAULT_DAYS, help="validity")
    migrate = sub.add_parser("migrate", help="apply a service's database migrations")
    migrate.add_argument("service", choices=sorted(SERVICES))
    sub.add_parser("run", help="run the whole suite in the foreground")
    sub.add_parser("settings", help="list the effective settings (secrets masked)")
    sub.add_parser("status", help="each service's health, outbox, streams and deliveries")
    args = parser.parse_args(argv)
    try:
        # `run` checks each child's settings itself; `certs` needs none.
        settings = None if args.command in ("run", "certs") else Settings.from_env()
        handler = {
            "token": cmd_token,
            "keys": cmd_keys,
            "certs": cmd_certs,
            "migrate": cmd_migrate,
            "run": cmd_run,
            "settings": cmd_settings,
            "status": cmd_status,
        }[args.command]
        return handler(args, settings)
    except (SettingsError, ValueError) as exc:
        print(f"allot: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
