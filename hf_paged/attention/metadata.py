"""Per-forward metadata in FlashInfer's paged format, built once and shared by every layer."""

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate

import torch

from ..memory.tables import PageTables


@dataclass(slots=True)
class ForwardMetadata:
    """What every executor reads for one forward. Index tensors live on `device`.

    Rows are the batch rows; `nnz` is the number of new (non-pad) tokens over all rows.
    qo_indptr:        [rows + 1] int32, new tokens of row i are `qo_indptr[i]:qo_indptr[i+1]`.
    kv_indptr:        [rows + 1] int32, pages of row i are `kv_indices[kv_indptr[i]:kv_indptr[i+1]]`.
    kv_indices:       [num_table_pages] int32, page ids, rows concatenated in token order.
    kv_last_page_len: [rows] int32, used slots of each row's last page, in [1, page_size]; 0 for
                      a row that holds no token yet.
    slot_mapping:     [nnz] int64, `page_id * page_size + offset` where each new token's K/V goes.
    token_index:      [nnz] int64, position of each new token in the `rows * q_len` flattening of
                      the layer inputs; None when every input token is new (no padding).
    copy_src, copy_dst: [num_copies] int64 pages to copy (copy-on-write) before K/V are written;
                      None when there is nothing to copy.
    The four index tensors are made from the host lists the first time they are read (the torch
    executor's decode step reads none of them: one host-to-device copy per forward, not five);
    metadata without host lists (cascade's suffix) is given them.
    Host-side: qo_lens, kv_lens (per row, new tokens and the tokens its pages hold after this
    forward: a sliding-window group's rows start at their first held page), q_len (the
    padded number of input tokens per row), page_size, and kv_indptr_host / kv_indices_host, the
    same lists as the tensors, which an executor reads without a device sync (to find rows that
    share a prefix, or rows in consecutive pages). `cascade`: shared-prefix attention allowed.
    The lists are None only in metadata derived for a part of the rows' pages (cascade's suffix).
    `group`: the index of the group of layers (groups.py) whose page tables these are; an executor
    that keeps planned state across layers keeps it per group (two groups may have the same layer
    settings but never the same pages).
    write_index: [stored] int64 positions, in the `rows * q_len` flattening, of the new tokens that
    are written to pages when a sliding group stores only what later queries see (inflight.py;
    its layers then attend from the forward's own K/V); None: every new token (`token_index`).
    """

    slot_mapping: torch.Tensor
    token_index: torch.Tensor | None
    copy_src: torch.Tensor | None
    copy_dst: torch.Tensor | None
    qo_lens: list[int]
    kv_lens: list[int]
    q_len: int
    page_size: int
    device: torch.device
    cascade: bool = False
    kv_indptr_host: list[int] | None = None
    kv_indices_host: list[int] | None = None
    group: int = 0
    write_index: torch.Tensor | None = None
    # The index tensors once made (or given): see the properties below.
    made_qo_indptr: torch.Tensor | None = None
    made_kv_indptr: torch.Tensor | None = None
    made_kv_indices: torch.Tensor | None = None
    made_kv_last_page_len: torch.Tensor | None = None

    @property
    def qo_indptr(self) -> torch.Tensor:
        if self.made_qo_indptr is None:
            self.made_qo_indptr = to_device(cumsum(self.qo_lens), torch.int32, self.device)
        return self.made_qo_indptr

    @property
    def kv_indptr(self) -> torch.Tensor:
        if self.made_kv_indptr is None:
            self.made_kv_indptr = to_device(self.kv_indptr_host, torch.int32, self.device)
        return self.made_kv_indptr

    @property
    def kv_indices(self) -> torch.Tensor:
        if self.made_kv_indices is None:
            self.made_kv_indices = to_device(self.kv_indices_host, torch.int32, self.device)
        return self.made_kv_indices

    @property
    def kv_last_page_len(self) -> torch.Tensor:
        if self.made_kv_last_page_len is None:
            self.made_kv_last_page_len = to_device(last_page_lens(self.kv_lens, self.page_size), torch.int32, self.device)
        return self.made_kv_last_page_len

    @property
    def num_rows(self) -> int:
        return len(self.qo_lens)

    @property
    def max_qo_len(self) -> int:
        return max(self.qo_lens, default=0)

    @property
    def max_kv_len(self) -> int:
        return max(self.kv_lens, default=0)

    @property
    def is_decode(self) -> bool:
        """One new token in every row and no padding: the decode wrappers' case."""
        return self.q_len == 1 and self.token_index is None

    def to(self, device: torch.device) -> "ForwardMetadata":
        """The same metadata with its tensors on `device` (layers placed on another device)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        if self.kv_indptr_host is not None:  # the index tensors are made there from the lists, when read
            made = (None,) * 4
        else:
            made = tuple(move(t) for t in (self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_last_page_len))
        return ForwardMetadata(
            move(self.slot_mapping), move(self.token_index), move(self.copy_src), move(self.copy_dst),
            self.qo_lens, self.kv_lens, self.q_len, self.page_size, device,
            self.cascade, self.kv_indptr_host, self.kv_indices_host, self.group, move(self.write_index), *made,
        )


def cumsum(values: Iterable[int]) -> list[int]:
    """`[0, v0, v0 + v1, ...]`: the indptr of a list of lengths."""
    return [0, *accumulate(values)]


def last_page_lens(kv_lens: list[int], page_size: int) -> list[int]:
    """Used slots of each row's last page, in [1, page_size]; 0 for a row with no token."""
    return [(n - 1) % page_size + 1 if n else 0 for n in kv_lens]


# array typecodes of the index dtypes (where this platform's array items have their size):
# `torch.frombuffer` over an array.array builds a tensor from a list of ints several times faster
# than `torch.tensor(list)` (this runs a few times per forward).
_TYPECODES = {
    dtype: code for dtype, code in ((torch.int32, "i"), (torch.int64, "q")) if array(code).itemsize == dtype.itemsize
}


def host_tensor(values: list[int], dtype: torch.dtype = torch.int32, pin_memory: bool = False) -> torch.Tensor:
    """A CPU tensor of `values`, pinned when asked (a source for asynchronous copies to a GPU)."""
    code = _TYPECODES.get(dtype)
    if code is not None and values and type(values[0]) is int:  # flat lists
        host = torch.frombuffer(array(code, values), dtype=dtype)  # keeps the array alive; a fresh one per call
    else:
        host = torch.tensor(values, dtype=dtype)
    return host.pin_memory() if pin_memory else host


def to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One host-to-device copy; pinned and asynchronous on CUDA."""
    if device.type == "cuda":
        return host_tensor(values, dtype, pin_memory=True).to(device, non_blocking=True)
    host = host_tensor(values, dtype)
    return host if device.type == "cpu" else host.to(device)


def build_metadata(
    tables: PageTables,
    qo_lens: list[int],
    q_len: int,
    slots: list[int],
    copies: list[tuple[int, int]],
    token_index: torch.Tensor | None,
    device: torch.device,
    cascade: bool = False,
    group: int = 0,
) -> ForwardMetadata:
    """Metadata for a forward whose new tokens `tables.append` has just placed at `slots`.

    cascade: allow the executor to attend prefixes shared by several rows once per group of rows.
    group: the index of `tables`' group of layers.
    """
    page_size = tables.page_size
    # A sliding-window group's rows start after the pages their window has released: each row's
    # keys are its tokens from its first held page on (attention depends on positions only
    # relative to the query's, so the window mask, causality and ALiBi are unchanged).
    holes = tables.num_leading_holes
    kv_lens = [n - lead * page_size for n, lead in zip(tables.num_tokens, holes)]
    kv_indices: list[int] = []
    for table, lead in zip(tables.page_tables, holes):
        kv_indices.extend(table[lead:] if lead else table)
    copy_src = to_device([c[0] for c in copies], torch.int64, device) if copies else None
    copy_dst = to_device([c[1] for c in copies], torch.int64, device) if copies else None
    kv_indptr = cumsum([len(t) - lead for t, lead in zip(tables.page_tables, holes)])
    return ForwardMetadata(
        slot_mapping=to_device(slots, torch.int64, device),
        token_index=token_index,
        copy_src=copy_src,
        copy_dst=copy_dst,
        qo_lens=list(qo_lens),
        kv_lens=kv_lens,
        q_len=q_len,
        page_size=page_size,
        device=device,
        cascade=cascade,
        kv_indptr_host=kv_indptr,
        kv_indices_host=kv_indices,
        group=group,
    )


def advance_metadata(previous: ForwardMetadata, qo_lens: list[int], q_len: int, slots: list[int]) -> ForwardMetadata:
    """The metadata of a forward whose rows hold the pages they held in `previous`'s forward, its
    new tokens (no pads) stored in them (PageTables.in_place_slots): the page lists, and their
    tensors once made, carry over; the lengths grow by the new tokens."""
    device = previous.device
    return ForwardMetadata(  # (positionally: per decode step, keywords cost as much as the rest)
        to_device(slots, torch.int64, device), None, None, None, qo_lens,
        [n + new for n, new in zip(previous.kv_lens, qo_lens)], q_len, previous.page_size, device,
        previous.cascade, previous.kv_indptr_host, previous.kv_indices_host, previous.group, None,
        None, previous.made_kv_indptr, previous.made_kv_indices,
    )
