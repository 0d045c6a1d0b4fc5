"""Tiny helpers the benchmarks share: timing loops and a uniform result table."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_rate(fn: Callable[[], object], units_per_call: float, repeat: int = 5, min_time: float = 0.2) -> float:
    """Units per second of ``fn``, the best of ``repeat`` runs of at least ``min_time`` each."""
    best = 0.0
    for _ in range(repeat):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = max(best, calls * units_per_call / elapsed)
    return best


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Rows of (measure, value, note), aligned."""
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>{vwidth}}  {note}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
