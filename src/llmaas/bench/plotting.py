"""matplotlib for the benchmarks' PNGs, headless, and optional: the product and CI do not need it.

Owns the one place that says how to get plots (the `bench` extra); callers write their JSON either way.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

BENCH_EXTRA_HINT = ("plots need matplotlib, the bench extra: LLMAAS_EXTRAS=bench bash scripts/setup.sh "
                    "(or pip install -e '.[bench]')")


@functools.cache  # one import attempt, so a run that draws many plots says it at most once
def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (callers skip the plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plots: {BENCH_EXTRA_HINT}", file=sys.stderr)
        return None
    return plt
