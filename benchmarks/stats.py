"""Distributions and timers shared by the benchmarks (milliseconds throughout)."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: Iterable[float]) -> dict:
    """n, mean, p50, p90, p99, min, max of `samples` (rounded to 0.1), plus the samples."""
    samples = list(samples)
    values = sorted(samples)
    out: dict = {"n": len(values)}
    if not values:
        return out
    stats = {"mean": sum(values) / len(values), "p50": percentile(values, 50),
             "p90": percentile(values, 90), "p99": percentile(values, 99),
             "min": values[0], "max": values[-1]}
    out.update({k: round(v, 1) for k, v in stats.items()})
    out["samples"] = [round(v, 2) for v in samples]  # in measurement order
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return round(a / b, 2)


def time_ms(fn: Callable[[], object]) -> tuple[float, object]:
    """(milliseconds `fn()` took, its value)."""
    t0 = time.perf_counter()
    value = fn()
    return (time.perf_counter() - t0) * 1000, value
