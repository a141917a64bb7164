"""BlockLayout: which key blocks each (head, query block) attends to.

The one data structure between selection (policy: `selection/`) and attention (mechanism: `kernels/`).
Compressed rows, like `torch.nn.attention.flex_attention.BlockMask`:

    counts  int32 [B, H, n_q_blocks]            how many key blocks row (b, h, i) keeps
    indices int32 [B, H, n_q_blocks, max_count] those key blocks, ascending; entries past `counts`
                                                are -1 padding and are never read

A row is a *set* of key blocks. The kernel relies on each row being ascending and free of repeats
(it splits a row into masked and unmasked blocks by counting), so a layout built by hand is put in
that canonical form when it is constructed: sorted, repeats dropped, entries outside
[0, num_key_blocks) ignored, on the layout's device with no host synchronisation. The library's own
constructors build canonical rows directly and skip that pass (`canonical=True`).

Query block i is rows [i*bs, (i+1)*bs) of q; key block j is keys [j*bs, (j+1)*bs). When the query is
shorter than the keys (chunked prefill), queries are the last positions: query row r sits at absolute
position `q_offset + r` with `q_offset = Lk - Lq`.

Example, one head, 3 query and key blocks, keeping the sink and the diagonal:

    counts  = [[[1, 2, 2]]]
    indices = [[[[0, -1], [0, 1], [0, 2]]]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def causal_block_limits(n_q_blocks: int, block_size: int, q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Number of key blocks each query block may see under causal masking: int64 [n_q_blocks].

    Query block i ends at absolute position `q_offset + min((i+1)*bs, q_len) - 1`; it can see key
    blocks 0 .. that position // bs.
    """
    q_offset = k_len - q_len
    last_row = torch.clamp(torch.arange(1, n_q_blocks + 1, device=device) * block_size, max=q_len) - 1
    return (q_offset + last_row) // block_size + 1


def diagonal_first_block(n_q_blocks: int, block_size: int, q_len: int, k_len: int, device=None) -> torch.Tensor:
    """The first key block that each query block's diagonal touches: int64 [n_q_blocks]."""
    q_offset = k_len - q_len
    return (q_offset + torch.arange(n_q_blocks, device=device) * block_size) // block_size


def _compact(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, indices) of a bool mask [..., n_k]: each kept block goes to the slot its running count
    gives, so rows come out ascending without a sort. Blocks past `width` in a row are dropped."""
    n_k = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32).clamp(max=width)
    slot = torch.where(mask, mask.cumsum(-1) - 1, width).clamp(max=width)  # `width`: the discard slot
    indices = torch.full((*mask.shape[:-1], width + 1), -1, dtype=torch.int32, device=mask.device)
    indices.scatter_(-1, slot, torch.arange(n_k, dtype=torch.int32, device=mask.device).expand_as(slot).contiguous())
    return counts, indices[..., :width].contiguous()


def _row_mask(counts: torch.Tensor, indices: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """The bool mask [..., num_key_blocks] of compressed rows, in any order, repeats and strays ignored."""
    slot = torch.arange(indices.shape[-1], device=indices.device)
    valid = (slot < counts.unsqueeze(-1)) & (indices >= 0) & (indices < num_key_blocks)
    target = torch.where(valid, indices.long(), num_key_blocks)
    mask = torch.zeros(*indices.shape[:-1], num_key_blocks + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_key_blocks]


@dataclass(frozen=True)
class BlockLayout:
    """Compressed block-sparse layout; see the module docstring for the format.

    `canonical=True` promises that every row is already ascending, unique and in range (the library's
    constructors say so); left False, construction puts the rows in that form.
    """

    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    num_key_blocks: int
    canonical: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.counts.dtype != torch.int32 or self.indices.dtype != torch.int32:
            raise ValueError(
                f"BlockLayout wants int32 counts and indices, got {self.counts.dtype} and {self.indices.dtype}."
            )
        if self.counts.dim() != 3 or self.indices.dim() != 4 or self.indices.shape[:3] != self.counts.shape:
            raise ValueError(
                "BlockLayout wants counts [B, H, n_q_blocks] and indices [B, H, n_q_blocks, max_count]; got "
                f"{tuple(self.counts.shape)} and {tuple(self.indices.shape)}."
            )
        if self.counts.device != self.indices.device:
            raise ValueError(f"BlockLayout counts are on {self.counts.device} but indices on {self.indices.device}.")
        if not self.canonical:
            mask = _row_mask(self.counts, self.indices, self.num_key_blocks)
            counts, indices = _compact(mask, self.indices.shape[-1])
            object.__setattr__(self, "counts", counts)
            object.__setattr__(self, "indices", indices)
            object.__setattr__(self, "canonical", True)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, n_q_blocks, num_key_blocks)."""
        b, h, nq = self.counts.shape
        return b, h, nq, self.num_key_blocks

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int, max_count: int | None = None) -> BlockLayout:
        """Compress a bool mask [B, H, n_q_blocks, n_k_blocks] (True = keep the block).

        `max_count` fixes the width of `indices` (it must be at least the widest row: blocks past it
        are dropped); left as None it is the widest row, which costs one host synchronisation.
        """
        if mask.dim() != 4 or mask.dtype != torch.bool:
            raise ValueError(f"from_mask wants a bool mask [B, H, n_q_blocks, n_k_blocks], got {mask.dtype} "
                             f"{tuple(mask.shape)}.")
        if max_count is None:
            max_count = int(mask.sum(-1).max()) if mask.numel() else 0
        counts, indices = _compact(mask, max_count)
        return cls(counts, indices, block_size, mask.shape[-1], canonical=True)

    def to_mask(self) -> torch.Tensor:
        """The bool mask [B, H, n_q_blocks, num_key_blocks] this layout encodes."""
        return _row_mask(self.counts, self.indices, self.num_key_blocks)

    def density(self, q_len: int | None = None, k_len: int | None = None) -> float:
        """Kept causal blocks / all causal blocks (1.0 = dense causal attention).

        Lengths default to whole blocks with the queries ending where the keys end.
        """
        b, h, nq, nk = self.shape
        k_len = nk * self.block_size if k_len is None else k_len
        q_len = k_len - (nk - nq) * self.block_size if q_len is None else q_len
        limits = causal_block_limits(nq, self.block_size, q_len, k_len, device=self.device)
        kept = self.to_mask()[..., : nk] & (torch.arange(nk, device=self.device) < limits[:, None])
        total = limits.sum() * b * h
        return float(kept.sum()) / max(float(total), 1.0)

    def to(self, device) -> BlockLayout:
        return BlockLayout(self.counts.to(device), self.indices.to(device), self.block_size, self.num_key_blocks,
                           canonical=True)

    def to_string(self, batch: int = 0, head: int = 0) -> str:
        """A text grid of one head: '#' kept, '.' dropped, ' ' above the causal diagonal."""
        mask = self.to_mask()[batch, head].cpu()
        nq, nk = mask.shape
        limits = causal_block_limits(nq, self.block_size, nq * self.block_size, nk * self.block_size)
        rows = []
        for i in range(nq):
            rows.append("".join("#" if mask[i, j] else ("." if j < limits[i] else " ") for j in range(nk)))
        return "\n".join(rows)

    def __repr__(self) -> str:
        b, h, nq, nk = self.shape
        return (f"BlockLayout(batch={b}, heads={h}, q_blocks={nq}, k_blocks={nk}, block_size={self.block_size}, "
                f"max_count={self.indices.shape[-1]}, device={self.device})")


def causal_layout(batch: int, heads: int, q_len: int, k_len: int, block_size: int, device=None) -> BlockLayout:
    """Every causal key block of every row (what `gamma=1` keeps): exact dense attention, block by block."""
    n_q, n_k = -(-q_len // block_size), -(-k_len // block_size)
    limits = causal_block_limits(n_q, block_size, q_len, k_len, device=device)
    blocks = torch.arange(n_k, device=device)
    indices = torch.where(blocks < limits[:, None], blocks, -1).to(torch.int32)
    counts = limits.to(torch.int32).expand(batch, heads, n_q).contiguous()
    return BlockLayout(counts, indices.expand(batch, heads, n_q, n_k).contiguous(), block_size, n_k, canonical=True)
