"""BlockLayout: which key blocks each (head, query block) attends to.

The one data structure between selection (policy: `budget.py`) and attention (mechanism: `kernels/`).
Compressed rows, like `torch.nn.attention.flex_attention.BlockMask`:

    counts  int32 [B, H, n_q_blocks]            how many key blocks row (b, h, i) keeps
    indices int32 [B, H, n_q_blocks, max_count] those key blocks, ascending; entries past `counts`
                                                are -1 padding and are never read

Query block i is rows [i*bs, (i+1)*bs) of q; key block j is keys [j*bs, (j+1)*bs). When the query is
shorter than the keys (chunked prefill), queries are the last positions: query row r sits at absolute
position `q_offset + r` with `q_offset = Lk - Lq`.

Example, one head, 3 query and key blocks, keeping the sink and the diagonal:

    counts  = [[[1, 2, 2]]]
    indices = [[[[0, -1], [0, 1], [0, 2]]]]
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class BlockLayout:
    """Compressed block-sparse layout; see the module docstring for the format."""

    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    num_key_blocks: int

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

        `max_count` fixes the width of `indices`; left as None it is the widest row, which costs one
        host synchronisation.
        """
        if mask.dim() != 4 or mask.dtype != torch.bool:
            raise ValueError(f"from_mask wants a bool mask [B, H, n_q_blocks, n_k_blocks], got {mask.dtype} "
                             f"{tuple(mask.shape)}.")
        n_k = mask.shape[-1]
        counts = mask.sum(-1, dtype=torch.int32)
        if max_count is None:
            max_count = int(counts.max()) if counts.numel() else 0
        positions = torch.arange(n_k, device=mask.device, dtype=torch.int32)
        # Kept blocks sort to the front in ascending order; dropped ones carry the key n_k.
        keyed = torch.where(mask, positions, torch.full_like(positions, n_k))
        indices = keyed.sort(dim=-1).values[..., :max_count]
        indices = torch.where(indices == n_k, torch.full_like(indices, -1), indices)
        if indices.shape[-1] < max_count:
            indices = torch.nn.functional.pad(indices, (0, max_count - indices.shape[-1]), value=-1)
        return cls(counts, indices.contiguous(), block_size, n_k)

    def to_mask(self) -> torch.Tensor:
        """The bool mask [B, H, n_q_blocks, num_key_blocks] this layout encodes."""
        b, h, nq, nk = self.shape
        mask = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool, device=self.device)
        slot = torch.arange(self.indices.shape[-1], device=self.device)
        valid = slot < self.counts.unsqueeze(-1)
        target = torch.where(valid, self.indices.long(), torch.full_like(self.indices, nk, dtype=torch.long))
        mask.scatter_(-1, target, True)
        return mask[..., :nk]

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
        return BlockLayout(self.counts.to(device), self.indices.to(device), self.block_size, self.num_key_blocks)

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
