"""Token signing keys on disk (`allot keys new`) and private files (docs/security.md).

A key pair is an Ed25519 (EdDSA) or P-256 (ES256) private key in PEM, named `<kid>.pem`, and
the JWKS `jwks.json` beside it with the public half. A second `allot keys new` into the same
folder adds its public key to the JWKS, so services trust old and new keys while tokens
signed with the old one run out (rotation without downtime).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import secrets

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

JWKS_NAME = "jwks.json"


def write_private(path: pathlib.Path | str, data: bytes) -> None:
    """Write `data` readable by this user only, from the first byte on (never world-readable,
    even for a moment)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)


def new_key_pair(
    directory: pathlib.Path | str, algorithm: str = "EdDSA", kid: str | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a private key and add its public key to the folder's JWKS; returns both paths."""
    directory = pathlib.Path(directory)
    kid = kid or f"allot-{datetime.date.today():%Y%m%d}-{secrets.token_hex(3)}"
    if algorithm == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
        public_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    elif algorithm == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
        public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}: EdDSA or ES256")
    public_jwk.update(kid=kid, alg=algorithm, use="sig")
    private_path = directory / f"{kid}.pem"
    if private_path.exists():
        raise ValueError(f"{private_path} exists already")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(private_path, pem)
    jwks_path = directory / JWKS_NAME
    document = json.loads(jwks_path.read_text()) if jwks_path.exists() else {"keys": []}
    document["keys"].append(public_jwk)
    jwks_path.write_text(json.dumps(document, indent=2) + "\n")
    return private_path, jwks_path
