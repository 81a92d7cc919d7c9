"""Checks of identifiers every service receives."""

import re

from shared.errors import InvalidArgument

ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")


def check_account_id(account_id: str, field: str = "account_id") -> str:
    if not account_id:
        raise InvalidArgument(field, f"{field} is required")
    if not ACCOUNT_ID.match(account_id):
        raise InvalidArgument(
            field, f"{field} must be 1-64 letters, digits or _.:@- starting with a letter or digit"
        )
    return account_id
