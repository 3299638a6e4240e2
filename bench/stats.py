"""Summaries: median of repetitions with min and max; percentiles of samples."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def summary(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, min and max of repetitions (and the values themselves)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
        "values": [round(v, digits) for v in values],
    }


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    data = sorted(samples)
    if not data:
        raise ValueError("no samples")
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def ratio(value: float | None, baseline: float | None, digits: int = 2) -> float | None:
    if value is None or baseline in (None, 0):
        return None
    return round(value / baseline, digits)


def print_paired(
    results: dict[str, list[dict[str, float]]], a: str, b: str, metrics: Sequence[str]
) -> None:
    """An A/B's figures: per metric, each side's median over its rounds and the median of
    the paired b/a ratios (rounds alternate, so a round's pair shared the machine)."""
    for metric in metrics:
        median_a = statistics.median(r[metric] for r in results[a])
        median_b = statistics.median(r[metric] for r in results[b])
        paired = statistics.median(
            y[metric] / x[metric] for x, y in zip(results[a], results[b], strict=True)
        )
        print(
            f"{metric:13s} {a} {median_a:8.1f}  {b} {median_b:8.1f}  "
            f"{b}/{a} (paired median) {paired:.3f}"
        )
