"""Reading a layer's K/V out of its pool as `[rows, H_kv, length, D]`: views of rows in consecutive
pages (`rows_view`), whole-page gathers (`gather_pages`), token gathers (`gather_kv`), and the token-row
view of a layer packed into a wider slice (`token_rows`, `packed_slots`; memory/layout.py).
"""

import torch


def token_rows(pool: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """A layer pool `[2, pages, page_size, H, D]` as token rows `[2, rows, H, D]` (a view) and the
    rows from one page to the next: `page_size` when contiguous, the slice's page stride for a
    layer packed into a wider slice (layout.py), where page p's token o is row `p * stride + o`.
    None for any other layout."""
    _, pages, page_size, heads, dim = pool.shape
    if pool.is_contiguous():
        return pool.view(2, -1, heads, dim), page_size
    page_stride = pool.stride(1)
    if page_stride % (heads * dim) or pool.stride()[2:] != (heads * dim, dim, 1):
        return None
    per_page = page_stride // (heads * dim)
    rows = (pages - 1) * per_page + page_size
    return pool.as_strided((2, rows, heads, dim), (pool.stride(0), heads * dim, dim, 1)), per_page


def packed_slots(slots: torch.Tensor, page_size: int, per_page: int) -> torch.Tensor:
    """Slots `page * page_size + offset` as rows of `token_rows` (`page * per_page + offset`)."""
    return slots if per_page == page_size else slots // page_size * per_page + slots % page_size


def gather_kv(pool: torch.Tensor, kv_slots: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, H_kv, length, D]` (views) from a layer pool."""
    num_kv_heads, head_dim = pool.shape[-2], pool.shape[-1]
    if pool.is_contiguous():
        kv = pool.view(-1, num_kv_heads, head_dim).index_select(0, kv_slots)
    else:  # a layer packed into a wider slice (layout.py): its pages sit at the slice's stride
        page_size = pool.shape[2]
        k_slots = kv_slots[: kv_slots.numel() // 2]
        found = token_rows(pool)
        if found is not None:
            tokens, per_page = found
            k_slots = packed_slots(k_slots, page_size, per_page)
            kv = torch.stack([tokens[0].index_select(0, k_slots), tokens[1].index_select(0, k_slots)])
        else:
            pages, offsets = k_slots // page_size, k_slots % page_size
            kv = torch.stack([pool[0][pages, offsets], pool[1][pages, offsets]])
    kv = kv.view(2, rows, length, num_kv_heads, head_dim).transpose(2, 3)
    return kv[0], kv[1]


def gather_pages(pool: torch.Tensor, kv_pages: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, H_kv, length, D]` (views of one gathered copy) of whole pages
    `kv_pages` (`page_gather_index`): each row's first `length` tokens."""
    page_size, num_kv_heads, head_dim = pool.shape[2], pool.shape[3], pool.shape[4]
    if pool.is_contiguous():
        pages = pool.view(-1, page_size, num_kv_heads, head_dim).index_select(0, kv_pages)
    else:  # a layer packed into a wider slice (layout.py): the same pages, plane by plane
        key_pages = kv_pages[: kv_pages.shape[0] // 2]  # plane by plane (see pool.copy_pages)
        pages = torch.stack([pool[0].index_select(0, key_pages), pool[1].index_select(0, key_pages)])  # (2, rows * pages, P, H, D)
    row_tokens = kv_pages.shape[0] // (2 * rows) * page_size
    size = (rows, num_kv_heads, length, head_dim)
    strides = (row_tokens * num_kv_heads * head_dim, head_dim, num_kv_heads * head_dim, 1)
    return pages.as_strided(size, strides, 0), pages.as_strided(size, strides, rows * strides[0])


def rows_view(pool: torch.Tensor, row_run: tuple[int, int], rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, H_kv, length, D]` of rows stored in consecutive pages: views, no copy
    (a copy for a layer packed into a wider slice, whose consecutive pages are not adjacent)."""
    first, stride = row_run
    page_size, num_kv_heads, head_dim = pool.shape[2], pool.shape[3], pool.shape[4]
    if pool.is_contiguous():  # one as_strided per plane (per layer and step: two calls, not seven)
        plane, page, slot, head, dim = pool.stride()
        size, strides = (rows, num_kv_heads, length, head_dim), (stride * page, head, slot, dim)
        offset = pool.storage_offset() + first * page
        return pool.as_strided(size, strides, offset), pool.as_strided(size, strides, offset + plane)
    tokens = pool[:, first : first + rows * stride].reshape(2, -1, num_kv_heads, head_dim)
    kv = tokens.view(2, rows, stride * page_size, num_kv_heads, head_dim)[:, :, :length].transpose(2, 3)
    return kv[0], kv[1]
