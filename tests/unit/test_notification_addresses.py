"""Contact addresses per channel (valid ones normalized, invalid ones naming the field), which
IP addresses a webhook may not go to, and the webhook signature: a known answer, round trips,
and what a receiver must reject."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

import pytest

from services.notification.domain.addresses import (
    address_class,
    is_loopback_host,
    new_webhook_secret,
    sign_webhook,
    validate_address,
    verify_webhook,
)
from services.notification.domain.messages import Channel
from shared.errors import InvalidArgument

EMAIL, SMS, WEBHOOK = Channel.EMAIL, Channel.SMS, Channel.WEBHOOK

VALID = [
    (EMAIL, "ops@example.com", "ops@example.com"),
    (EMAIL, "  Ops.Team+alerts@Example.COM ", "Ops.Team+alerts@example.com"),
    (EMAIL, "a@b.co", "a@b.co"),
    (EMAIL, "allot@localhost", "allot@localhost"),
    (EMAIL, "o'brien@mail.example.org", "o'brien@mail.example.org"),
    (EMAIL, "x@sub-domain.example.io", "x@sub-domain.example.io"),
    (EMAIL, "info@bücher.example", "info@xn--bcher-kva.example"),
    (SMS, "+14155550100", "+14155550100"),
    (SMS, "+1 (415) 555-0100", "+14155550100"),
    (SMS, "+86 138 0013 8000", "+8613800138000"),
    (SMS, "+12345678", "+12345678"),
    (SMS, "+123456789012345", "+123456789012345"),
    (WEBHOOK, "https://hooks.example.com/allot", "https://hooks.example.com/allot"),
    (WEBHOOK, "HTTPS://Hooks.Example.com:8443/a?b=1", "https://hooks.example.com:8443/a?b=1"),
    (WEBHOOK, "https://example.com", "https://example.com"),
    (WEBHOOK, "https://receiver.ns.svc.cluster.local/x", "https://receiver.ns.svc.cluster.local/x"),
    (WEBHOOK, "https://[2001:db8::1]/hook", "https://[2001:db8::1]/hook"),
    (WEBHOOK, "http://127.0.0.1:8080/hook", "http://127.0.0.1:8080/hook"),
    (WEBHOOK, "http://127.9.9.9/hook", "http://127.9.9.9/hook"),
    (WEBHOOK, "http://localhost:9000/", "http://localhost:9000/"),
    (WEBHOOK, "http://LOCALHOST/x", "http://localhost/x"),
    (WEBHOOK, "http://[::1]:9000/hook", "http://[::1]:9000/hook"),
]

INVALID = [
    (EMAIL, "", "required"),
    (EMAIL, "   ", "required"),
    (EMAIL, "ops.example.com", "exactly one @"),
    (EMAIL, "a@b@example.com", "exactly one @"),
    (EMAIL, "@example.com", "nothing before the @"),
    (EMAIL, "ops@", "nothing after the @"),
    (EMAIL, "ops@example", "needs a dot"),
    (EMAIL, "o ps@example.com", "spaces"),
    (EMAIL, "ops@exa mple.com", "spaces"),
    (EMAIL, "ops@example.com\r\nBcc: x@evil.example", "spaces or control"),
    (EMAIL, "ops\x00@example.com", "control"),
    (EMAIL, ".ops@example.com", "characters mail does not allow"),
    (EMAIL, "o..ps@example.com", "characters mail does not allow"),
    (EMAIL, '"o ps"@example.com', "spaces"),
    (EMAIL, "ops(comment)@example.com", "characters mail does not allow"),
    (EMAIL, "Ops <ops@example.com>", "spaces"),
    (EMAIL, "ops@-example.com", "not a valid host name"),
    (EMAIL, "ops@example..com", "not a valid host name"),
    (EMAIL, "ops@example.com.", "not a valid host name"),
    (EMAIL, "ops@exa_mple.com", "not a valid host name"),
    (EMAIL, "ops@[127.0.0.1]", "not a valid host name"),
    (EMAIL, "ops@127.0.0.1", "IP address"),
    (EMAIL, "x" * 65 + "@example.com", "exceeds 64"),
    (EMAIL, "x@" + "a" * 250 + ".com", "longer than 254"),
    (SMS, "14155550100", "E.164"),
    (SMS, "+04155550100", "E.164"),
    (SMS, "+1415555", "E.164"),
    (SMS, "+1234567890123456", "E.164"),
    (SMS, "+1415555010a", "E.164"),
    (SMS, "++14155550100", "E.164"),
    (SMS, "+1 415 555 0100 ext 2", "E.164"),
    (SMS, "tel:+14155550100", "E.164"),
    (WEBHOOK, "http://hooks.example.com/allot", "must use https"),
    (WEBHOOK, "http://10.0.0.5/hook", "must use https"),
    (WEBHOOK, "http://localhost.example.com/hook", "must use https"),
    (WEBHOOK, "http://[::ffff:127.0.0.1]/hook", "must use https"),
    (WEBHOOK, "ftp://example.com/x", "absolute https://"),
    (WEBHOOK, "hooks.example.com/allot", "absolute https://"),
    (WEBHOOK, "/relative/path", "absolute https://"),
    (WEBHOOK, "https:///path-only", "no host"),
    (WEBHOOK, "https://user:pass@example.com/x", "credentials"),
    (WEBHOOK, "https://token@example.com/x", "credentials"),
    (WEBHOOK, "https://example.com/a b", "spaces"),
    (WEBHOOK, "https://example.com/x#frag", "fragment"),
    (WEBHOOK, "https://example.com:99999/x", "Port out of range"),
    (WEBHOOK, "https://exa$mple.com/x", "not a valid name"),
    (WEBHOOK, "https://example.com/" + "a" * 2048, "longer than 2048"),
]


@pytest.mark.parametrize(("channel", "address", "normalized"), VALID)
def test_valid_addresses_are_normalized(channel, address, normalized):
    # Any port: the loopback receivers of a local run (private webhooks allowed).
    assert validate_address(channel, address, any_port=True) == normalized
    # Normalizing is idempotent: a stored address validates to itself.
    assert validate_address(channel, normalized, any_port=True) == normalized


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("https://hooks.example.com/x", True),
        ("https://hooks.example.com:443/x", True),
        ("https://hooks.example.com:8443/x", True),
        ("https://hooks.example.com:22/x", False),
        ("https://hooks.example.com:6379/x", False),
        ("https://hooks.example.com:80/x", False),
        ("http://127.0.0.1:8080/hook", False),
        ("http://localhost/hook", False),  # http's port 80
    ],
)
def test_webhooks_go_to_443_or_8443_unless_any_port(address, allowed):
    assert validate_address(WEBHOOK, address, any_port=True)
    if allowed:
        assert validate_address(WEBHOOK, address)
        return
    with pytest.raises(InvalidArgument) as caught:
        validate_address(WEBHOOK, address)
    assert caught.value.field == "contact.address"
    assert "port 443 or 8443 only" in caught.value.message


@pytest.mark.parametrize(("channel", "address", "why"), INVALID)
def test_invalid_addresses_name_the_field(channel, address, why):
    with pytest.raises(InvalidArgument) as caught:
        validate_address(channel, address)
    error = caught.value
    assert error.field == "contact.address"
    assert error.reason == "INVALID_FIELD"
    assert error.metadata["field"] == "contact.address"
    assert why in error.message
    assert error.message.startswith("contact.address")


def test_channel_mismatch_is_rejected():
    with pytest.raises(InvalidArgument, match="E.164"):
        validate_address(SMS, "ops@example.com")
    with pytest.raises(InvalidArgument, match="https"):
        validate_address(WEBHOOK, "ops@example.com")
    with pytest.raises(InvalidArgument, match="@"):
        validate_address(EMAIL, "+14155550100")


def test_unknown_channel_names_the_channel_field():
    with pytest.raises(InvalidArgument) as caught:
        validate_address(0, "ops@example.com")
    assert caught.value.field == "contact.channel"


def test_a_long_address_is_shortened_in_the_message():
    with pytest.raises(InvalidArgument) as caught:
        validate_address(WEBHOOK, "https://example.com/" + "a" * 3000)
    assert len(caught.value.message) < 300


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.255.0.1", True),
        ("::1", True),
        ("128.0.0.1", False),
        ("0.0.0.0", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


# --- where a webhook may go --------------------------------------------------------------

ADDRESS_CLASSES = [
    # IPv4
    ("8.8.8.8", None),
    ("93.184.216.34", None),
    ("1.1.1.1", None),
    ("0.0.0.0", "unspecified"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "CGNAT"),
    ("100.100.100.200", "CGNAT"),
    ("100.127.255.255", "CGNAT"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "private"),  # documentation (TEST-NET-1)
    ("198.18.0.1", "private"),  # benchmarking
    ("172.32.0.1", None),  # just past 172.16.0.0/12
    ("100.128.0.1", None),  # just past 100.64.0.0/10
    # IPv6
    ("2606:4700:4700::1111", None),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"),
    ("fd00:ec2::254", "private"),  # unique-local: one cloud's IPv6 metadata endpoint
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "private"),  # documentation
    ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
    # IPv6 carrying IPv4: judged by the IPv4 address
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:100.64.0.1", "CGNAT"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:808:808::1", None),  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize(("address", "why"), ADDRESS_CLASSES)
def test_address_class(address, why):
    assert address_class(address) == why
    assert address_class(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ["localhost", "example.com", "", "1.2.3", "[::1]"])
def test_address_class_takes_ip_addresses_only(address):
    with pytest.raises(ValueError):
        address_class(address)


# --- signatures --------------------------------------------------------------------------

SECRET = "whsec_test"
BODY = b'{"notification_id":"n1","data":{}}'
T = 1_700_000_000


def test_signature_known_answer():
    # Computed outside Python: printf '1700000000.<BODY>' | openssl dgst -sha256 -hmac whsec_test
    assert sign_webhook(SECRET, T, BODY) == (
        "t=1700000000,v1=f5981321c0bd53a41cfb67e2386a4d4e192600e9bc0e0cae9854b4f72729b9b6"
    )
    assert sign_webhook("secret", 1, b"{}") == (
        "t=1,v1=1122767b193110cfec322b6f199b599edbf608ed087f2d27afb0b97d99523908"
    )


def test_signature_is_hmac_of_timestamp_dot_body():
    digest = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign_webhook(SECRET, T, BODY) == f"t={T},v1={digest}"


def test_verify_round_trip():
    header = sign_webhook(SECRET, T, BODY)
    assert verify_webhook(SECRET, header, BODY, now=T)
    assert verify_webhook(SECRET, header, BODY, now=T + 300)
    assert verify_webhook(SECRET, header, BODY, now=T - 300)
    # Spaces after commas, as some header folding produces, are tolerated.
    assert verify_webhook(SECRET, header.replace(",", ", "), BODY, now=T)


def test_verify_rejects_tampering_and_age():
    header = sign_webhook(SECRET, T, BODY)
    assert not verify_webhook(SECRET, header, BODY + b" ", now=T)
    assert not verify_webhook(SECRET, header, BODY.replace(b"n1", b"n2"), now=T)
    assert not verify_webhook("whsec_other", header, BODY, now=T)
    assert not verify_webhook(SECRET, header, BODY, now=T + 301)
    assert not verify_webhook(SECRET, header, BODY, now=T - 301)
    assert not verify_webhook(SECRET, header, BODY, now=T + 60, tolerance=30)
    # The timestamp is part of what is signed: moving it breaks the signature.
    moved = header.replace(f"t={T}", f"t={T + 1}")
    assert not verify_webhook(SECRET, moved, BODY, now=T)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "v1=abc",
        f"t={T}",
        f"t={T},v1=",
        f"t=abc,v1={'0' * 64}",
        f"t=-{T},v1={'0' * 64}",
        f"t=１７,v1={'0' * 64}",
        f"t={T},v0={'0' * 64}",
    ],
)
def test_verify_rejects_malformed_headers(header):
    assert not verify_webhook(SECRET, header, BODY, now=T)


def test_verify_accepts_any_matching_v1_during_rotation():
    good = sign_webhook(SECRET, T, BODY).split(",")[1]
    header = f"t={T},v1={'0' * 64},{good}"
    assert verify_webhook(SECRET, header, BODY, now=T)


def test_new_secrets_are_prefixed_long_and_distinct():
    secrets = {new_webhook_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(secret) >= 6 + 43
        assert secret.isascii() and " " not in secret
