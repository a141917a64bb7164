"""Proxy heads -> block scores: a cheap look at where each query block's attention goes.

After ProxyAttn (arXiv 2509.24745): the query heads that share a KV head attend alike, so their
average (a *proxy head*) ranks key blocks almost as well as each head would, at a fraction of the
cost. On top of that only every `stride`-th query and key token is scored.

This module is the plain-PyTorch specification; it works in chunks of query blocks so memory stays
O(N * chunk), never N x N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SparsePrefillConfig

_CHUNK_ELEMENTS = 1 << 25  # sampled scores per chunk (x4 bytes): bounds working memory


@dataclass(frozen=True)
class BlockScores:
    """What the estimate saw, per proxy head and (query block, key block).

    score: fp32 [B, P, n_q_blocks, n_k_blocks], the largest sampled softmax probability in the
        block (max-pooling keeps a lone needle visible).
    mass: fp32 same shape, the block's share of its query block's sampled softmax mass (rows sum to
        1 over the causal key blocks, or 0 for a row that may see no key).
    heads_per_proxy: how many consecutive query heads each proxy stands for.
    """

    score: torch.Tensor
    mass: torch.Tensor
    heads_per_proxy: int


def num_proxies(num_q_heads: int, num_kv_heads: int, proxy_heads: str | int) -> int:
    """Resolve `config.proxy_heads` for a layer, or raise a ValueError saying what would fit."""
    p = num_kv_heads if proxy_heads == "kv" else proxy_heads
    fits = (num_kv_heads % p == 0) or (p % num_kv_heads == 0 and num_q_heads % p == 0)
    if not fits:
        raise ValueError(
            f"proxy_heads={proxy_heads} does not fit {num_q_heads} query heads over {num_kv_heads} KV heads: "
            f"use \"kv\", a divisor of {num_kv_heads}, or a multiple of {num_kv_heads} that divides {num_q_heads}."
        )
    return p


def pool_proxy_heads(q: torch.Tensor, k: torch.Tensor, proxies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average q [B, Hq, L, D] and k [B, Hkv, L, D] into `proxies` proxy heads each.

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


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparsePrefillConfig,
    scale: float | None = None,
    key_range: torch.Tensor | None = None,
) -> BlockScores:
    """Strided proxy-head attention, pooled to blocks. q [B, Hq, Lq, D], k [B, Hkv, Lk, D]."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    bs, stride = config.block_size, config.stride
    per_block = bs // stride
    proxies = num_proxies(hq, k.shape[1], config.proxy_heads)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n_qb, n_kb = -(-lq // bs), -(-lk // bs)

    # Sample the last query of each stride group and the first key: a sampled key is causal for a
    # sampled query whenever any key of its group is.
    group_start = torch.arange(0, n_qb * bs, stride, device=q.device)
    q_rows = torch.clamp(group_start + stride - 1, max=lq - 1)
    real_row = (group_start < lq).float()  # padding rows past the end repeat row lq-1
    k_cols = torch.arange(0, lk, stride, device=k.device)
    q_p, k_p = pool_proxy_heads(q[:, :, q_rows], k[:, :, k_cols], proxies)
    q_p = q_p * scale
    q_pos = q_rows + (lk - lq)
    n_cols = k_cols.numel()
    col_pad = n_kb * per_block - n_cols
    valid_col = None
    if key_range is not None:
        kr = key_range.to(k.device)
        valid_col = (k_cols[None] >= kr[:, :1]) & (k_cols[None] < kr[:, 1:])  # [B, C]
    # The last query block may hold fewer real rows; count them for the mean.
    rows_in_block = torch.clamp(lq - torch.arange(n_qb, device=q.device) * bs, max=bs)
    rows_in_block = torch.clamp((rows_in_block + stride - 1) // stride, min=1)

    score = torch.empty(b, proxies, n_qb, n_kb, device=q.device)
    mass = torch.empty_like(score)
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * proxies * per_block * n_cols))
    for qb0 in range(0, n_qb, blocks_per_chunk):
        qb1 = min(qb0 + blocks_per_chunk, n_qb)
        rows = slice(qb0 * per_block, qb1 * per_block)
        s = q_p[:, :, rows] @ k_p.transpose(-1, -2)  # [B, P, R, C]
        allowed = k_cols[None, :] <= q_pos[rows, None]  # [R, C]
        allowed = allowed[None, None] if valid_col is None else allowed[None, None] & valid_col[:, None, None]
        s = s.masked_fill(~allowed, -math.inf)
        probs = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see no key -> all zero
        probs = probs * real_row[rows, None]
        probs = torch.nn.functional.pad(probs, (0, col_pad)).reshape(b, proxies, qb1 - qb0, per_block, n_kb, per_block)
        score[:, :, qb0:qb1] = probs.amax(dim=(3, 5))
        mass[:, :, qb0:qb1] = probs.sum(dim=5).sum(dim=3) / rows_in_block[qb0:qb1, None]
    return BlockScores(score=score, mass=mass, heads_per_proxy=hq // proxies)
