"""Process-wide settings for the long-running commands (sidecar, control plane).

CPython's cyclic garbage collector, left at its defaults (a young-generation
collection every 700 net allocations), runs hundreds of times a second under
proxy load, promotes every in-flight request's objects to older generations,
and so triggers full collections of the whole heap (tens of thousands of
objects: grpc, protobuf, the snapshot) every second or so, each a
pause of 20-30 ms on the request path. Measured on the sidecar at
concurrency 32 (docs/benchmarks.md): about 10% of its CPU, and the p99 tail.

Objects on the request path die by reference counting, not by the collector,
so collecting less often loses nothing but a little memory for the rare
cycle. ``tune_gc`` freezes what start-up built (it is never garbage) and
raises the young-generation threshold.
"""

from __future__ import annotations

import gc

__all__ = ["GC_GEN0_THRESHOLD", "tune_gc"]

# Net container allocations between young collections (CPython's default: 700).
GC_GEN0_THRESHOLD = 10_000


def tune_gc(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Call once start-up is done: collect, freeze the survivors, collect young objects less often."""
    if gen0_threshold < 1:
        raise ValueError("gen0_threshold must be >= 1")
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
