"""Dense attention in float64, the reference every executor test compares against, and the builders
of pools and metadata those tests run the executors on."""

import torch

from hf_paged.attention import LayerParams, ops
from hf_paged.memory.blocks import BlockManager
from hf_paged.attention.metadata import build_metadata
from hf_paged.memory.tables import PageTables

HEAD_DIM = 8


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, window_left: int = -1, soft_cap: float = 0.0,
    alibi_slopes: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """One row: q [Q, H_q, D] on k/v [L, H_kv, D] -> [Q, H_q, D] float32.

    Bottom-right causal (the queries are the row's last Q tokens), keys within `window_left` of
    the query when >= 0, `slope_h * (key - query)` added to the scaled scores with ALiBi slopes
    [H_q], scores soft-capped (`cap * tanh(s / cap)`) before masking when > 0.
    """
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * sm_scale
    num_q, num_k = q.shape[0], k.shape[0]
    query_pos = torch.arange(num_k - num_q, num_k)[:, None]
    keys = torch.arange(num_k)[None]
    if alibi_slopes is not None:
        scores = scores + torch.tensor(alibi_slopes, dtype=torch.float64)[:, None, None] * (keys - query_pos)
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    allowed = keys <= query_pos
    if window_left >= 0:
        allowed &= keys >= query_pos - window_left
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


def dense_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: LayerParams) -> torch.Tensor:
    """dense_attention with a layer's settings (scale, window, soft-cap, ALiBi)."""
    return dense_attention(q, k, v, params.sm_scale, params.window_left, params.logits_soft_cap, params.alibi_slopes)


def dense_rows(q, dense, qo_lens, sm_scale, window_left=-1, soft_cap=0.0):
    """Row by row: dense_attention of each row's new tokens (q [sum(qo_lens), H_q, D]) on its (k, v)."""
    starts = [0, *torch.tensor(qo_lens).cumsum(0).tolist()]
    return torch.cat([
        dense_attention(q[start:end], k, v, sm_scale, window_left, soft_cap)
        for (k, v), start, end in zip(dense, starts, starts[1:])
    ])


# -- pools and metadata ------------------------------------------------------------------------


def paged_case(page_size, past_lens, new_lens, shared_prefix, num_kv_heads, seed=0):
    """A pool and metadata for rows that share `shared_prefix` tokens, then hold private tokens.

    Returns (pool, meta, per-row dense K/V, zero page id).
    """
    generator = torch.Generator().manual_seed(seed)
    num_pages = 256
    pool = torch.randn(2, num_pages + 1, page_size, num_kv_heads, HEAD_DIM, generator=generator)
    pool[:, num_pages].zero_()
    flat = pool.view(2, -1, num_kv_heads, HEAD_DIM)
    tables = PageTables(BlockManager(num_pages), page_size)
    num_rows = len(past_lens)
    prefix_k = torch.randn(shared_prefix, num_kv_heads, HEAD_DIM, generator=generator)
    prefix_v = torch.randn(shared_prefix, num_kv_heads, HEAD_DIM, generator=generator)
    dense = [[prefix_k, prefix_v] for _ in range(num_rows)]

    def write(slots, copies, k, v):
        for src, dst in copies:
            pool[:, dst] = pool[:, src]
        slots = torch.tensor(slots, dtype=torch.long)
        flat[0, slots] = k
        flat[1, slots] = v

    tables.add_rows(1)
    slots, copies = tables.append([shared_prefix])
    write(slots, copies, prefix_k, prefix_v)
    tables.select_rows([0] * num_rows)
    for step_lens in ([p - shared_prefix for p in past_lens], new_lens):
        slots, copies = tables.append(step_lens)
        k = torch.randn(len(slots), num_kv_heads, HEAD_DIM, generator=generator)
        v = torch.randn(len(slots), num_kv_heads, HEAD_DIM, generator=generator)
        write(slots, copies, k, v)
        start = 0
        for row, n in enumerate(step_lens):
            dense[row][0] = torch.cat([dense[row][0], k[start : start + n]])
            dense[row][1] = torch.cat([dense[row][1], v[start : start + n]])
            start += n
    meta = build_metadata(tables, new_lens, max(new_lens), slots, [], None, torch.device("cpu"))
    return pool, meta, dense, num_pages


PAGED_CASES = [
    # page_size, past lens (incl. shared prefix), new lens, shared prefix
    (1, [5, 9, 7], [1, 1, 1], 3),
    (8, [13, 20, 8, 31], [1, 1, 1, 1], 8),
    (16, [17, 40, 16], [1, 1, 1], 16),
    (16, [0, 5, 33], [7, 1, 3], 0),
    (8, [11, 11, 11], [5, 5, 5], 11),
    (1, [3, 0], [4, 2], 0),
]


def reserved_case(page_size, steps, num_rows, num_kv_heads, reserve_tokens, seed=0):
    """Rows that reserved runs of pages, each appending `steps[i][row]` tokens of random K/V at step i.

    Returns (pool, meta of the last step, per-row dense K/V, zero page id).
    """
    generator = torch.Generator().manual_seed(seed)
    num_pages = 128
    pool = torch.full((2, num_pages + 1, page_size, num_kv_heads, HEAD_DIM), float("nan"))
    pool[:, num_pages].zero_()
    tables = PageTables(BlockManager(num_pages), page_size)
    tables.add_rows(num_rows)
    assert tables.reserve(reserve_tokens)
    dense = [[torch.empty(0, num_kv_heads, HEAD_DIM)] * 2 for _ in range(num_rows)]
    for step in steps:
        slots, copies = tables.append(step)
        assert not copies
        k, v = (torch.randn(len(slots), num_kv_heads, HEAD_DIM, generator=generator) for _ in range(2))
        ops.write_kv_auto(pool, k, v, torch.tensor(slots))
        start = 0
        for row, n in enumerate(step):
            dense[row] = [torch.cat([dense[row][i], t[start : start + n]]) for i, t in enumerate((k, v))]
            start += n
    meta = build_metadata(tables, steps[-1], max(steps[-1]), slots, [], None, torch.device("cpu"))
    return pool, meta, dense, num_pages


def paged_inputs(page_size: int, kv_lens: list[int], qo_lens: list[int], num_kv_heads=2, group=2, head_dim=8, seed=0):
    """A NaN-filled pool holding rows of random K/V in shuffled pages, FlashInfer-format indices with a
    garbage tail, queries, and the dense K/V of each row for the reference."""
    generator = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 3
    pool = torch.full((2, num_pages + 1, page_size, num_kv_heads, head_dim), float("nan"))
    pool[:, num_pages].zero_()  # the zero page
    page_ids = torch.randperm(num_pages, generator=generator).tolist()
    kv_indices, kv_indptr, dense = [], [0], []
    for kv_len in kv_lens:
        k = torch.randn(kv_len, num_kv_heads, head_dim, generator=generator)
        v = torch.randn(kv_len, num_kv_heads, head_dim, generator=generator)
        table = [page_ids.pop() for _ in range(-(-kv_len // page_size))]
        for t in range(kv_len):
            pool[0, table[t // page_size], t % page_size] = k[t]
            pool[1, table[t // page_size], t % page_size] = v[t]
        kv_indices += table
        kv_indptr.append(len(kv_indices))
        dense.append((k, v))
    kv_indices += page_ids  # never read: pages of NaNs past kv_indptr[-1]
    q = torch.randn(sum(qo_lens), num_kv_heads * group, head_dim, generator=generator)
    qo_indptr = torch.tensor([0] + qo_lens).cumsum(0).to(torch.int32)
    last = [(n - 1) % page_size + 1 for n in kv_lens]
    tensors = (
        q, pool, qo_indptr, torch.tensor(kv_indptr, dtype=torch.int32),
        torch.tensor(kv_indices, dtype=torch.int32), torch.tensor(last, dtype=torch.int32),
    )
    return tensors, dense


def grouped_case(page_size, prefix_lens, fork, private_lens, new_lens, num_kv_heads, seed=0):
    """Rows forked from `len(prefix_lens)` parents (parent i holds `prefix_lens[i]` tokens).

    `fork[r]` is row r's parent; then row r appends `private_lens[r]` and finally `new_lens[r]`
    tokens. Pool contents are random (both paths read the same pool). Returns (pool, meta, zero page).
    """
    generator = torch.Generator().manual_seed(seed)
    num_pages = 512
    pool = torch.randn(2, num_pages + 1, page_size, num_kv_heads, HEAD_DIM, generator=generator)
    pool[:, num_pages].zero_()
    tables = PageTables(BlockManager(num_pages), page_size)
    tables.add_rows(len(prefix_lens))
    tables.append(list(prefix_lens))
    tables.select_rows(list(fork))
    tables.append(list(private_lens))
    slots, copies = tables.append(list(new_lens))
    meta = build_metadata(tables, list(new_lens), max(new_lens), slots, copies, None, torch.device("cpu"), cascade=True)
    return pool, meta, num_pages


def dense_from_pool(q: torch.Tensor, pool: torch.Tensor, meta, params: LayerParams) -> torch.Tensor:
    """dense_layer of every row's new tokens (q [nnz, H_q, D]) on the K/V its pages hold: the pool
    [2, pages, page_size, H_kv, D] read page by page from the metadata's host lists (no executor code)."""
    out, start = [], 0
    for row, (num_new, num_keys) in enumerate(zip(meta.qo_lens, meta.kv_lens)):
        pages = meta.kv_indices_host[meta.kv_indptr_host[row] : meta.kv_indptr_host[row + 1]]
        k, v = (pool[plane, pages].flatten(0, 1)[:num_keys] for plane in (0, 1))
        out.append(dense_layer(q[start : start + num_new], k, v, params))
        start += num_new
    return torch.cat(out)
