"""The agent's garbage-collector settings: records die by reference counting, not by GC.

CPython's defaults (a collection of the youngest generation every 700 new containers, a full
one whenever survivors grow by a quarter) suit short scripts. The agent handles one
interval's batch at a time — 10⁴–10⁵ records, each a handful of containers (the record,
its JSON mapping's dicts, its wire form) — and every one of them is freed by reference
counting once exported. With the defaults the collector still scans them several times per
batch while they are in flight, promotes them to the oldest generation, and so triggers full
collections that walk the whole heap (enrichment caches included): measured by
``bench/throughput.py``, that was about half of the pipeline's CPU time per record
(docs/performance.md §3).

So, once start-up is done:

- ``gc.freeze()``: what start-up built (modules, protobuf descriptors, config, the loaded
  programs' tables) lives as long as the process and is never scanned again;
- a youngest-generation threshold above a batch's working set, so records in flight are
  freed before the collector ever looks at them; the older generations keep their ratios.

Cycles are still collected (reference cycles are rare in records: named tuples, dicts of
plain values); only less often, bounded by :data:`GEN0_THRESHOLD` new containers.
"""
from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000
GEN1_THRESHOLD = 20
GEN2_THRESHOLD = 10


def settle() -> None:
    """Apply the agent's GC settings; call once start-up has finished (idempotent)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
