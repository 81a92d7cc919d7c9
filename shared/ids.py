"""Resource ids: a prefix and 26 characters of Crockford base32 (48-bit milliseconds, then
80 random bits), so ids sort roughly by creation and page tokens can key on them."""

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return f"{prefix}-{''.join(reversed(chars))}"
