"""Summaries of repeated timings: ratios round by round, percentiles, the median of a repeated call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence


def ratios(tops: Iterable[float], bottoms: Iterable[float]) -> list[float]:
    """``top / bottom`` round by round: both were measured in the same round, so the machine's drift
    cancels out of each ratio."""
    return [top / bottom for top, bottom in zip(tops, bottoms, strict=True)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``work``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
