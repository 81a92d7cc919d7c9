"""Reading a service's `/metrics` in tests: one bounded HTTP GET, parsed into samples."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT = 5.0


async def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, from http://127.0.0.1:<port>/metrics."""
    async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a labelled counter not moved yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
