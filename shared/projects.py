"""Enterprise project ids: which project a call is counted under.

Quota counts usage and scopes packages by project; billing records the project of what it
sells. Both read a caller's project id with the same rule.
"""

from __future__ import annotations

import re

from shared.errors import InvalidArgument

# The project a call belongs to when it names none (or names one malformed).
DEFAULT_PROJECT = "0"

_PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def normalize_project_id(raw: str | None) -> str:
    """Return the enterprise project id a call is counted under.

    1–64 characters of ASCII letters, digits, ``-`` and ``_`` are kept exactly as given (Allot
    keeps no registry of projects, so it cannot correct them); anything else, including an
    absent or empty id, is the default project ``"0"``.
    """
    if isinstance(raw, str) and _PROJECT_ID.fullmatch(raw):
        return raw
    return DEFAULT_PROJECT


def check_project_filter(raw: str, field: str = "enterprise_project_id") -> str:
    """A read's project filter: ``""`` (no filter) or a well-formed project id, kept as
    given; anything else is INVALID_ARGUMENT naming ``field`` (a filter is not normalized
    to the default project: a typo would silently show project "0")."""
    if raw == "" or _PROJECT_ID.fullmatch(raw):
        return raw
    raise InvalidArgument(field, "enterprise_project_id must be 1-64 letters, digits, - or _")
