"""Memory: page ids and the tensors they index.

- `blocks`: ref counts and copy-on-write over integer page ids (no torch).
- `tables`: each row's page table; `reservations` (runs of consecutive pages) and `windows` (a
  sliding window's holes) are the methods it inherits.
- `groups`, `group_pages`, `layout`: layers that share a window share tables; how each group's
  pages sit in the pool.
- `pool`: the K/V tensors and their sizing. `prefix_cache`: full pages kept across calls, keyed by
  their tokens.

May import: the root modules (`config`, `errors`) only.
"""
