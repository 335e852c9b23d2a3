"""Cache: `PagedCache`, the `transformers.Cache` generate() drives, and its per-forward steps.

A forward places its new tokens in the page tables, builds the metadata once, and each layer writes
its K/V by slot and runs the executor (`steps`, `forward`, `inflight`); `runtime` is what a wrapped
model carries (its pool, executor and settings).

May import: `attention`, `distributed`, `memory` and the root modules; never `integration`.
"""
