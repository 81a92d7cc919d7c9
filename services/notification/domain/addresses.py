"""Contact addresses per channel, and the HMAC signature that webhook receivers verify.

An address is checked once, when a contact is created or edited, and stored in its normalized
form: an email address with its domain lower-cased, an E.164 number without separators, a
webhook URL with scheme and host lower-cased. Webhooks must use https; plain http is accepted
only for loopback hosts, so a developer can point a contact at a local receiver while
notifications never leave the machine unencrypted. Webhooks go to port 443 or 8443 only
(WEBHOOK_PORTS), so a contact cannot be aimed at other services' ports; any port is accepted
where private webhooks are allowed (`any_port`, a local run; docs/security.md).

Where a webhook may be sent is decided again at send time, on the addresses its host resolves
to: `address_class` names why an address is not a public receiver's (loopback, private,
link-local, ...), and the sender refuses a host with any such address unless the operator
allows internal receivers (see the service README, "Webhook addresses").

A webhook request carries `Allot-Signature: t=<unix seconds>,v1=<hex>`, where the hex is the
HMAC-SHA256, keyed with the UTF-8 bytes of the contact's whole secret (`whsec_…`), of
`<t>.` followed by the exact request body. A receiver recomputes it, compares in constant
time and rejects a timestamp too far from its own clock, so a captured request cannot be
replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import urllib.parse

from services.notification.domain.messages import Channel
from shared.errors import InvalidArgument

FIELD = "contact.address"

MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit less the angle brackets
MAX_LOCAL_PART_LENGTH = 64
MAX_URL_LENGTH = 2048
SIGNATURE_TOLERANCE_SECONDS = 300
WEBHOOK_SECRET_PREFIX = "whsec_"
# The ports a webhook may be sent to unless private webhooks are allowed.
WEBHOOK_PORTS = (443, 8443)

# The dot-atom of RFC 5322 (no quoted local parts: no mail provider hands those out, and they
# are a classic way to smuggle spaces and `@` past naive parsers).
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Hostnames of internal services sometimes contain `_`; URLs tolerate it, mail domains do not.
_HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")
# People write numbers as "+1 (415) 555-0100"; these characters carry no digits.
_PHONE_SEPARATORS = re.compile(r"[\s().-]")
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def validate_address(channel: int, address: str, *, any_port: bool = False) -> str:
    """The normalized address, or InvalidArgument naming `contact.address` with the reason.
    `any_port`: a webhook may use any port (private webhooks allowed), not only 443/8443."""
    address = address.strip()
    if not address:
        raise InvalidArgument(FIELD, "contact.address is required")
    if channel == Channel.EMAIL:
        return _email(address)
    if channel == Channel.SMS:
        return _phone(address)
    if channel == Channel.WEBHOOK:
        return _webhook_url(address, any_port)
    # The channel itself is validated (and named) by the caller; this guards misuse.
    raise InvalidArgument("contact.channel", f"unknown channel {channel}")


def _invalid(address: str, what: str, why: str) -> InvalidArgument:
    shown = address if len(address) <= 80 else address[:77] + "..."
    return InvalidArgument(FIELD, f"contact.address {shown!r} is not {what}: {why}")


def _email(address: str) -> str:
    what = "a valid email address"
    if len(address) > MAX_EMAIL_LENGTH:
        raise _invalid(address, what, f"longer than {MAX_EMAIL_LENGTH} characters")
    if _UNSAFE.search(address):
        raise _invalid(address, what, "it contains spaces or control characters")
    if address.count("@") != 1:
        raise _invalid(address, what, "it needs exactly one @")
    local, domain = address.split("@")
    if not local:
        raise _invalid(address, what, "nothing before the @")
    if not domain:
        raise _invalid(address, what, "nothing after the @")
    if len(local) > MAX_LOCAL_PART_LENGTH:
        raise _invalid(address, what, f"the part before @ exceeds {MAX_LOCAL_PART_LENGTH} chars")
    if not _LOCAL_PART.fullmatch(local):
        raise _invalid(address, what, "the part before @ has characters mail does not allow")
    domain = _mail_domain(address, domain)
    return f"{local}@{domain}"


def _mail_domain(address: str, domain: str) -> str:
    what = "a valid email address"
    try:
        # IDNA turns "bücher.example" into its ASCII form, the one SMTP servers route on.
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise _invalid(address, what, "the domain is not a valid host name") from None
    if ascii_domain == "localhost":
        return ascii_domain
    labels = ascii_domain.split(".")
    if len(labels) < 2:
        raise _invalid(address, what, "the domain needs a dot (or be localhost)")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels) or len(ascii_domain) > 253:
        raise _invalid(address, what, "the domain is not a valid host name")
    if labels[-1].isdigit():
        raise _invalid(address, what, "the domain is an IP address, not a host name")
    return ascii_domain


def _phone(address: str) -> str:
    number = _PHONE_SEPARATORS.sub("", address)
    if not _E164.fullmatch(number):
        raise _invalid(
            address,
            "an E.164 phone number",
            "expected + and 8 to 15 digits with the country code first, e.g. +14155550100",
        )
    return number


def _webhook_url(address: str, any_port: bool = False) -> str:
    what = "a valid webhook URL"
    if len(address) > MAX_URL_LENGTH:
        raise _invalid(address, what, f"longer than {MAX_URL_LENGTH} characters")
    if _UNSAFE.search(address):
        raise _invalid(address, what, "it contains spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(address)
        port = parts.port
    except ValueError as exc:
        raise _invalid(address, what, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise _invalid(address, what, "it must be an absolute https:// URL")
    if "@" in parts.netloc:
        raise _invalid(address, what, "credentials in the URL are not allowed")
    if parts.fragment or address.endswith("#"):
        raise _invalid(address, what, "a #fragment is never sent; remove it")
    host = parts.hostname  # lower-cased, IPv6 brackets removed
    if not host:
        raise _invalid(address, what, "it has no host")
    host = _url_host(address, host)
    if scheme == "http" and not is_loopback_host(host):
        raise _invalid(address, what, "it must use https (http is allowed only for loopback)")
    effective_port = port if port is not None else (443 if scheme == "https" else 80)
    if not any_port and effective_port not in WEBHOOK_PORTS:
        raise _invalid(address, what, f"webhooks go to port 443 or 8443 only, not {effective_port}")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urllib.parse.urlunsplit((scheme, netloc, parts.path, parts.query, ""))


def _url_host(address: str, host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise _invalid(address, "a valid webhook URL", "the host is not a valid name") from None
    labels = ascii_host.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels) or len(ascii_host) > 253:
        raise _invalid(address, "a valid webhook URL", "the host is not a valid name")
    return ascii_host


def is_loopback_host(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1 (the host as `urlsplit(...).hostname` gives it)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Shared address space (RFC 6598): carrier-grade NAT and some clouds' internal services (one
# cloud's metadata endpoint is 100.100.100.200). `ipaddress` calls it neither private nor global.
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
# The well-known NAT64 prefix (RFC 6052): on an IPv6-only network with DNS64, 64:ff9b::a9fe:a9fe
# is translated to 169.254.169.254, so such an address is what its last 32 bits are.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_class(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook must not be sent to `address` — "loopback", "private", "link-local",
    "CGNAT", "unspecified", "multicast", "site-local", "reserved" or "non-global" — or None for
    a globally routable unicast address. An IPv6 address that carries an IPv4 one (IPv4-mapped
    `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged by that IPv4 address:
    it is where the packets end up. ValueError if `address` is not an IP address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_class(embedded)
    # Most specific first: 127.0.0.1 is also "private" to `ipaddress`, 169.254/16 too.
    if ip.is_unspecified:
        return "unspecified"  # connecting to 0.0.0.0 or :: reaches this host
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"  # 169.254.169.254: the cloud metadata endpoint
    if ip.is_multicast:
        return "multicast"
    if ip in _SHARED_ADDRESS_SPACE:
        return "CGNAT"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"  # fec0::/10: deprecated, still routed internally on some networks
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"  # RFC 1918, unique-local fc00::/7, documentation and benchmark ranges
    if not ip.is_global:
        return "non-global"
    return None


def new_webhook_secret() -> str:
    """A fresh signing secret for a webhook contact (shown to its owner once)."""
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign_webhook(secret: str, timestamp: int, body: bytes) -> str:
    """The `Allot-Signature` header value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify_webhook(
    secret: str,
    header: str,
    body: bytes,
    now: float,
    tolerance: int = SIGNATURE_TOLERANCE_SECONDS,
) -> bool:
    """Whether `header` signs `body` with `secret` and its timestamp is within `tolerance`
    seconds of `now`. Several `v1=` entries are accepted (one matching is enough), so a sender
    rotating its secret may sign with both."""
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if not (value.isascii() and value.isdigit()):
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance:
        return False
    expected = _digest(secret, timestamp, body)
    # compare_digest on every candidate, no early exit on the first match: constant time.
    matches = [hmac.compare_digest(expected.encode(), c.encode()) for c in candidates]
    return any(matches)
