"""Block scores: a cheap look at where each query block's attention goes.

The estimate is the attention of *pooled* queries over *pooled* keys:

* heads: by default (`proxy_heads="q"`) every query head is scored on its own, which ranks better
  for heads unlike their KV group's average (bench/RESULTS.md, "Block selection"); `"kv"` averages
  the query heads of each KV group into one ProxyAttn-style proxy (cheaper); an int asks for that
  many proxies;
* tokens: each run of `stride` consecutive queries, and of `stride` consecutive keys, is averaged
  into one. Every token takes part, so a lone needle still moves its key group, where sampling one
  token in `stride` would miss it `stride - 1` times in `stride`.

The causal softmax of the pooled queries over the pooled keys is pooled to (query block, key block)
cells. Soft-capped attention (Gemma 2) caps the pooled logits the same way. This module is the
plain-PyTorch specification; it works in chunks of query blocks so memory stays O(N * chunk), never
N x N. `fused.py` computes the same on the GPU.

Pooled positions: query group i (rows [i*s, (i+1)*s)) sits at its last real row; key group j sits at
its first valid key; a key group is visible to a query group when that key is not after that row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import SparsePrefillConfig

_CHUNK_ELEMENTS = 1 << 25  # pooled scores per chunk (x4 bytes): bounds working memory


@dataclass(frozen=True)
class BlockScores:
    """What the estimate saw, per proxy head and (query block, key block).

    score: fp32 [B, P, n_q_blocks, n_k_blocks], the largest pooled softmax probability in the
        block (max-pooling keeps a lone strong key group visible).
    mass: fp32 same shape, the block's share of its query block's pooled softmax mass (rows sum to
        1 over the causal key blocks, or 0 for a row that may see no key).
    heads_per_proxy: how many consecutive query heads each proxy stands for.
    """

    score: torch.Tensor
    mass: torch.Tensor
    heads_per_proxy: int


def num_proxies(num_q_heads: int, num_kv_heads: int, proxy_heads: str | int) -> int:
    """Resolve `config.proxy_heads` for a layer, or raise a ValueError saying what would fit."""
    if proxy_heads == "q":
        return num_q_heads
    p = num_kv_heads if proxy_heads == "kv" else proxy_heads
    fits = (num_kv_heads % p == 0) or (p % num_kv_heads == 0 and num_q_heads % p == 0)
    if not fits:
        raise ValueError(
            f"proxy_heads={proxy_heads} does not fit {num_q_heads} query heads over {num_kv_heads} KV heads: "
            f"use \"q\", \"kv\", a divisor of {num_kv_heads}, or a multiple of {num_kv_heads} that divides "
            f"{num_q_heads}."
        )
    return p


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`softcap * tanh(logits / softcap)`, the logit cap of Gemma 2's attention (None: unchanged)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def pool_proxy_heads(q: torch.Tensor, k: torch.Tensor, proxies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average q [B, Hq, L, D] and k [B, Hkv, L, D] into `proxies` proxy heads each (fp32).

    Proxy p stands for query heads [p*Hq/P, (p+1)*Hq/P) and for the KV heads those read.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    q_p = q.reshape(b, proxies, hq // proxies, lq, d).float().mean(2)
    if hkv % proxies == 0:
        k_p = k.reshape(b, proxies, hkv // proxies, k.shape[2], d).float().mean(2)
    else:  # more proxies than KV heads: each proxy reads exactly one KV head
        k_p = k[:, torch.arange(proxies, device=k.device) * hkv // proxies].float()
    return q_p, k_p


def pool_tokens(x: torch.Tensor, stride: int, groups: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of each run of `stride` tokens of x [B, H, L, D] -> fp32 [B, H, groups, D].

    Groups past the end are zero. `weight` (bool [B, L], optional) leaves tokens out of the mean;
    a group with no token left is zero.
    """
    b, h, length, d = x.shape
    pad = groups * stride - length
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    if weight is None:
        count = torch.nn.functional.pad(torch.ones(length, device=x.device), (0, pad))
        count = count.reshape(groups, stride).sum(-1)[None, None, :, None]
        return x.reshape(b, h, groups, stride, d).sum(3) / count.clamp(min=1)
    w = torch.nn.functional.pad(weight.float(), (0, pad)).reshape(b, 1, groups, stride, 1)
    return (x.reshape(b, h, groups, stride, d) * w).sum(3) / w.sum(3).clamp(min=1)


def pooled_positions(q_len: int, k_len: int, stride: int, n_q_groups: int, n_k_groups: int,
                     key_range: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_pos [Rq], real_row bool [Rq], col_pos [B or 1, Rk]) of pooled queries and keys.

    A query group sits at its last real row; a key group at its first valid key, or at k_len (never
    visible) when it holds none.
    """
    first = torch.arange(n_q_groups, device=device) * stride
    row_pos = torch.clamp(first + stride - 1, max=q_len - 1) + (k_len - q_len)
    real_row = first < q_len
    start = torch.arange(n_k_groups, device=device)[None] * stride
    start_valid = torch.zeros(1, 1, dtype=torch.long, device=device)
    end_valid = torch.full((1, 1), k_len, dtype=torch.long, device=device)
    if key_range is not None:
        kr = key_range.to(device=device, dtype=torch.long)
        start_valid, end_valid = kr[:, :1], torch.clamp(kr[:, 1:], max=k_len)
    col_pos = torch.maximum(start, start_valid)
    col_pos = torch.where(col_pos < torch.minimum(start + stride, end_valid), col_pos, torch.full_like(col_pos, k_len))
    return row_pos, real_row, col_pos


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparsePrefillConfig,
    scale: float | None = None,
    key_range: torch.Tensor | None = None,
    softcap: float | None = None,
) -> BlockScores:
    """Pooled-query over pooled-key attention, pooled to blocks. q [B, Hq, Lq, D], k [B, Hkv, Lk, D]."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    bs, stride = config.block_size, config.stride
    per_block = bs // stride
    proxies = num_proxies(hq, k.shape[1], config.proxy_heads)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n_qb, n_kb = -(-lq // bs), -(-lk // bs)
    n_rows, n_cols = n_qb * per_block, n_kb * per_block

    row_pos, real_row, col_pos = pooled_positions(lq, lk, stride, n_rows, n_cols, key_range, q.device)
    valid_key = None
    if key_range is not None:
        tokens = torch.arange(lk, device=k.device)[None]
        kr = key_range.to(k.device)
        valid_key = (tokens >= kr[:, :1]) & (tokens < kr[:, 1:])
    q_p, k_p = pool_proxy_heads(pool_tokens(q, stride, n_rows), pool_tokens(k, stride, n_cols, valid_key), proxies)
    q_p = q_p * scale
    if k_p.shape[1] != proxies:  # one KV head per group of proxies
        k_p = k_p.repeat_interleave(proxies // k_p.shape[1], dim=1)
    # The last query block may hold fewer real rows; count them for the mean.
    rows_in_block = real_row.reshape(n_qb, per_block).sum(-1).clamp(min=1)

    score = torch.empty(b, proxies, n_qb, n_kb, device=q.device)
    mass = torch.empty_like(score)
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * proxies * per_block * n_cols))
    for qb0 in range(0, n_qb, blocks_per_chunk):
        qb1 = min(qb0 + blocks_per_chunk, n_qb)
        rows = slice(qb0 * per_block, qb1 * per_block)
        s = soft_cap(q_p[:, :, rows] @ k_p.transpose(-1, -2), softcap)  # [B, P, R, C]
        allowed = col_pos[:, None, :] <= row_pos[rows, None]  # [B or 1, R, C]
        s = s.masked_fill(~allowed[:, None], -math.inf)
        probs = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see no key -> all zero
        probs = probs * real_row[rows, None]
        probs = probs.reshape(b, proxies, qb1 - qb0, per_block, n_kb, per_block)
        score[:, :, qb0:qb1] = probs.amax(dim=(3, 5))
        mass[:, :, qb0:qb1] = probs.sum(dim=5).sum(dim=3) / rows_in_block[qb0:qb1, None]
    return BlockScores(score=score, mass=mass, heads_per_proxy=hq // proxies)
