"""A usage batch's scopes (account, region, API) as statement parameters.

The statements that match a batch's scopes (the package lock, the alert rules) are built once
per number of scopes with the scopes as numbered parameters, so SQLAlchemy builds and compiles
each once; built anew for every batch with the scopes as literals, they cost more than the
batch's other work (docs/design/scale.md, "The hot path's costs").
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam
from sqlalchemy.sql.elements import BindParameter

Scope = tuple[str, str, str]  # account, region, API


def scope_bindparams(prefix: str, i: int) -> tuple[BindParameter, BindParameter, BindParameter]:
    """The parameters of the batch's `i`-th scope: account, region, API."""
    return (
        bindparam(f"{prefix}account_{i}"),
        bindparam(f"{prefix}region_{i}"),
        bindparam(f"{prefix}api_{i}"),
    )


def scope_parameters(prefix: str, scopes: Sequence[Scope]) -> dict[str, str]:
    """The values of `scope_bindparams` for each of `scopes`, in order."""
    params: dict[str, str] = {}
    for i, (account_id, region, api) in enumerate(scopes):
        params[f"{prefix}account_{i}"] = account_id
        params[f"{prefix}region_{i}"] = region
        params[f"{prefix}api_{i}"] = api
    return params
