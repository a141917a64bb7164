"""Two peers' block-selection policies, re-implemented to feed our BlockLayout for a fair comparison.

Both are written from the papers' descriptions in plain PyTorch, per query head, with the same
always-kept blocks as ours (sink, local, diagonal) so that only the ranking and the budget differ:

* FlexPrefill-style "vertical-slash" (Lai et al., ICLR 2025): the last `last_queries` queries of a
  head attend exactly; their attention summed per key column (vertical lines) and per diagonal
  offset (slash lines) is normalised; the fewest columns and the fewest diagonals that each cover
  `gamma` are kept, and a block is kept when any kept line crosses it.
* XAttention-style antidiagonal scoring (Xu et al., 2025): every `stride` x `stride` cell of the
  attention matrix is scored by the sum of its antidiagonal logits (so every query and every key
  is looked at once), softmaxed per strided row, summed into blocks; each query block keeps its
  highest-scoring blocks until their cumulative share reaches `gamma`.

They return bool masks [B, Hq, n_q_blocks, n_k_blocks]; `BlockLayout.from_mask` makes layouts.
"""

from __future__ import annotations

import math

import torch

from ..config import SparsePrefillConfig
from ..layout import causal_block_limits
from ..selection.budget import always_kept, blocks_to_cover


def _causal_blocks(n_qb: int, n_kb: int, bs: int, lq: int, lk: int, device) -> torch.Tensor:
    limits = causal_block_limits(n_qb, bs, lq, lk, device=device)
    return torch.arange(n_kb, device=device)[None, :] < limits[:, None]


def _top_cover(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """Bool mask of the fewest largest entries of each row of `values` (>= 0) holding `gamma` of it."""
    order = values.argsort(dim=-1, descending=True)
    count = blocks_to_cover(values.gather(-1, order), gamma)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(values.shape[-1], device=values.device)
                                            .expand_as(order))
    return rank < count[..., None]


def flexprefill_lines(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                      last_queries: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical, slash) fp32 [B, Hq, Lk]: the last `last_queries` queries' exact attention averaged per
    key column, and per diagonal offset (query position - key position); each sums to 1."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = min(last_queries, lq)
    q_pos = torch.arange(lq - rows, lq, device=q.device) + (lk - lq)
    allowed = torch.arange(lk, device=q.device)[None, :] <= q_pos[:, None]
    q_last = q[:, :, lq - rows:].float() * scale
    k_rep = k.float().repeat_interleave(hq // hkv, dim=1)
    probs = torch.softmax((q_last @ k_rep.transpose(-1, -2)).masked_fill(~allowed, -math.inf), dim=-1)
    key_of = q_pos[:, None] - torch.arange(lk, device=q.device)[None, :]  # [rows, offset]
    slash = probs.gather(-1, key_of.clamp(min=0).expand(b, hq, rows, lk)).masked_fill(key_of < 0, 0).mean(2)
    return probs.mean(2), slash


def flexprefill_select(vertical: torch.Tensor, slash: torch.Tensor, config: SparsePrefillConfig, q_len: int,
                       k_len: int) -> torch.Tensor:
    """Blocks crossed by the fewest vertical lines and the fewest slash lines that each cover gamma."""
    b, hq, lk = vertical.shape
    bs, device = config.block_size, vertical.device
    n_qb, n_kb = -(-q_len // bs), -(-k_len // bs)
    keep_cols = _top_cover(vertical, config.gamma)
    keep_offsets = _top_cover(slash, config.gamma)
    col_blocks = torch.nn.functional.pad(keep_cols, (0, n_kb * bs - lk)).reshape(b, hq, n_kb, bs).any(-1)
    # In query block i the line at offset o starts in key block i + (q_off - o) // bs and ends at most one
    # block later, so a kept line keeps the block diagonals delta = j - i it touches.
    c = (k_len - q_len) - torch.arange(lk, device=device)
    deltas = torch.zeros(b, hq, 2 * n_kb + 2, dtype=torch.bool, device=device)
    unused = torch.full_like(c, 2 * n_kb + 1)
    for end in (c, c + bs - 1):
        target = torch.where(keep_offsets, torch.div(end, bs, rounding_mode="floor") + n_kb, unused)
        deltas.scatter_(-1, target, True)
    diagonal = torch.arange(n_kb, device=device)[None, :] - torch.arange(n_qb, device=device)[:, None] + n_kb
    mask = col_blocks[:, :, None, :] | deltas[:, :, diagonal]
    forced = always_kept(n_qb, n_kb, q_len, k_len, config, device)
    return (mask | forced) & _causal_blocks(n_qb, n_kb, bs, q_len, k_len, device)


def flexprefill_mask(q: torch.Tensor, k: torch.Tensor, config: SparsePrefillConfig, scale: float | None = None,
                     last_queries: int = 128) -> torch.Tensor:
    """Vertical-slash selection from the last `last_queries` queries of each head (see module doc)."""
    vertical, slash = flexprefill_lines(q, k, scale, last_queries)
    return flexprefill_select(vertical, slash, config, q.shape[2], k.shape[2])


def xattention_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None,
                          stride: int = 8) -> torch.Tensor:
    """Antidiagonal scores softmaxed per strided row and summed into blocks: fp32 [B, Hq, Qb, Kb]."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, bs = hq // hkv, block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n_qb, n_kb = -(-lq // bs), -(-lk // bs)
    per_block = bs // stride
    # Pad both to whole blocks; padded keys are masked, padded query rows dropped from the sums.
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, n_qb * bs - lq))
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, n_kb * bs - lk))
    # q'[i] = concat_t q[i*S + S-1-t], k'[j] = concat_t k[j*S + t]: q'.k' sums one antidiagonal.
    q_anti = qf.reshape(b, hq, -1, stride, d).flip(3).reshape(b, hq, -1, stride * d)
    k_anti = kf.reshape(b, hkv, -1, stride * d).repeat_interleave(group, dim=1)
    row_pos = torch.arange(q_anti.shape[2], device=q.device) * stride + stride - 1 + (lk - lq)  # last query
    col_pos = torch.arange(k_anti.shape[2], device=q.device) * stride
    real_row = (torch.arange(q_anti.shape[2], device=q.device) * stride < lq).float()
    mass = torch.empty(b, hq, n_qb, n_kb, device=q.device)
    for qb0 in range(0, n_qb, 8):  # 8 query blocks at a time bounds memory
        qb1 = min(qb0 + 8, n_qb)
        r = slice(qb0 * per_block, qb1 * per_block)
        s = (q_anti[:, :, r] @ k_anti.transpose(-1, -2)) * (scale / stride)
        allowed = (col_pos[None, :] <= row_pos[r, None]) & (col_pos[None, :] < lk)
        p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1) * real_row[r, None]
        mass[:, :, qb0:qb1] = p.reshape(b, hq, qb1 - qb0, per_block, n_kb, per_block).sum((3, 5))
    return mass


def xattention_select(mass: torch.Tensor, config: SparsePrefillConfig, q_len: int, k_len: int) -> torch.Tensor:
    """Each query block's highest-scoring blocks until their cumulative share reaches gamma."""
    n_qb, n_kb = mass.shape[-2:]
    forced = always_kept(n_qb, n_kb, q_len, k_len, config, mass.device)
    causal = _causal_blocks(n_qb, n_kb, config.block_size, q_len, k_len, mass.device)
    return (_top_cover(mass, config.gamma) | forced) & causal


def xattention_mask(q: torch.Tensor, k: torch.Tensor, config: SparsePrefillConfig, scale: float | None = None,
                    stride: int = 8) -> torch.Tensor:
    """Antidiagonal scoring with a per-row cumulative threshold `config.gamma` (see module doc)."""
    mass = xattention_block_mass(q, k, config.block_size, scale, stride)
    return xattention_select(mass, config, q.shape[2], k.shape[2])
