"""What every benchmark shares: the machine it ran on, and its results saved as JSON.

Each ``bench/bench_*.py`` takes ``--quick`` (a short run for CI: it checks correctness and
exits 1 when a check fails, but asserts nothing about time) and ``--json PATH`` (the results,
with ``machine()``, written by ``save()``). ``python bench/run_all.py`` runs them all.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["machine", "save", "time_pairs"]


def time_pairs(
    first: Callable[[], Any], second: Callable[[], Any], calls: int, *, max_s: float | None = None
) -> tuple[list[float], list[float]]:
    """Seconds each of ``calls`` pairs took, ``first`` and ``second`` in turn, the order flipped
    every pair so drift (CPU frequency, GC, a noisy neighbour) hits both alike. ``max_s`` ends
    the loop early, after at least 20 pairs, for slow calls."""
    gc.collect()
    t_first: list[float] = []
    t_second: list[float] = []
    clock = time.perf_counter
    began = clock()
    for i in range(calls):
        pair = ((first, t_first), (second, t_second))
        for fn, out in pair if i % 2 == 0 else reversed(pair):
            start = clock()
            fn()
            out.append(clock() - start)
        if max_s is not None and i >= 20 and clock() - began > max_s:
            break
    return t_first, t_second


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine and the software a result was measured with."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    memory_gb = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in ("tokenguard", "openai", "anthropic", "httpx2", "redis", "litellm")},
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def save(path: str | os.PathLike[str] | None, name: str, results: Any, **settings: Any) -> None:
    """Write ``{"benchmark": name, "machine": ..., "settings": ..., "results": ...}`` to ``path``
    (nothing when ``path`` is ``None``); Decimals are written as exact strings."""
    if path is None:
        return
    payload = {"benchmark": name, "machine": machine(), "settings": settings, "results": results}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
