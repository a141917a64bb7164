"""Block scores -> BlockLayout: how many key blocks each head keeps, and which.

Policy (each row is one (head, query block)); `choose_blocks` applies it, on any device:

1. *Per-row coverage.* A row keeps, in the order of its estimated block mass, the fewest key
   blocks that hold `gamma` of its estimated mass (`estimate.py`).
2. *Per-head calibration from the last query block.* Each head's last query block is attended
   exactly. When that exact attention needs more blocks to reach `gamma` than the estimate said
   for the same row, the estimate of this head is over-confident, and every row of the head keeps
   that many blocks more. The last row itself also keeps the blocks its exact attention needs, so
   the final queries (the question, in a prompt) see what they attend to.
3. *Always kept.* Sink blocks, `local_blocks` before the diagonal, the diagonal, and at least
   `min_budget_tokens` worth of blocks (the top-ranked ones). Never a block above the causal
   diagonal. `gamma >= 1` keeps every causal block.
4. *Exact tail.* The query blocks that hold the last `exact_tail_tokens` queries keep every causal
   block. The question of a prompt sits there and the last query decides the first answer token;
   an estimate averaged over a block's rows can rank a needle the question reads below the
   coverage threshold (bench/RESULTS.md, "Selection that keeps dense's answers").
5. *Question columns.* Each head's `question_blocks` key blocks of largest exact last-block mass
   (beyond the always-kept ones) are kept in every row that can see them: the needles the question
   reads, for the rows that mention them again later.

Why these rules: fed per-head estimates (`proxy_heads="q"`), rules 1-3 cover `gamma` of real
attention at about the density of the per-row oracle, where one shared ranking per KV group needs
more blocks and starves the heads unlike their group (bench/RESULTS.md, "Block selection"). Covered
mass is not enough for retrieval, though: rules 4 and 5 are what kept dense's answers, for few
blocks ("Selection that keeps dense's answers").

This module is the plain-PyTorch specification of the policy and of `last_block_mass` (the exact
attention of rule 2); `fused.py` and `fused_policy.py` compute the same with Triton kernels.
"""

from __future__ import annotations

import math

import torch

from ..config import SparsePrefillConfig
from ..layout import causal_block_limits, diagonal_first_block
from .estimate import BlockScores, soft_cap


def last_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparsePrefillConfig,
    scale: float | None = None,
    key_range: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Each query head's exact attention from its last query block, summed per key block and averaged
    over that block's queries: fp32 [B, Hq, n_k_blocks] (rows sum to 1, or 0 if no key is visible)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, bs = hq // hkv, config.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    first = (-(-lq // bs) - 1) * bs  # the last query block's first row
    n_kb = -(-lk // bs)
    q_pos = torch.arange(first, lq, device=q.device) + (lk - lq)
    cols = torch.arange(lk, device=k.device)
    allowed = (cols[None, :] <= q_pos[:, None])[None, None]  # [1, 1, rows, Lk]
    if key_range is not None:
        kr = key_range.to(k.device)
        allowed = allowed & ((cols[None] >= kr[:, :1]) & (cols[None] < kr[:, 1:]))[:, None, None, :]
    mass = torch.empty(b, hq, n_kb, device=q.device)
    for h in range(hkv):  # one KV group at a time bounds memory to [B, G, bs, Lk]
        qh = q[:, h * group:(h + 1) * group, first:].float() * scale
        s = soft_cap(qh @ k[:, h:h + 1].float().transpose(-1, -2), softcap).masked_fill(~allowed, -math.inf)
        probs = torch.softmax(s, dim=-1).nan_to_num(0.0).mean(2)  # [B, G, Lk]
        mass[:, h * group:(h + 1) * group] = (
            torch.nn.functional.pad(probs, (0, n_kb * bs - lk)).reshape(b, group, n_kb, bs).sum(-1))
    return mass


def head_budget_fractions(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparsePrefillConfig,
    scale: float | None = None,
    key_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query head's need from its last query block, fp32 [B, Hq] in (0, 1]: the fewest key blocks
    holding `gamma` of that block's exact attention, over the blocks it can see. Sharp heads score low."""
    lq, lk, bs = q.shape[2], k.shape[2], config.block_size
    visible = causal_block_limits(-(-lq // bs), bs, lq, lk)[-1]
    need = blocks_to_cover(last_block_mass(q, k, config, scale, key_range).sort(-1, descending=True).values,
                           config.gamma)
    return (need.float() / visible).clamp(max=1.0)


def blocks_to_cover(sorted_mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """How many leading entries of each row of `sorted_mass` reach `gamma` of the row's total."""
    cumulative = sorted_mass.cumsum(-1)
    total = cumulative[..., -1:]
    return (cumulative < gamma * total).sum(-1) + 1


def row_geometry(n_q_blocks: int, q_len: int, k_len: int, config: SparsePrefillConfig, device) -> torch.Tensor:
    """Each query block's causal limit and its first local block, int32 [2, n_q_blocks].

    Row i may see key blocks [0, limit[i]) (layout.causal_block_limits) and always keeps, of those, the
    first `sink_blocks` and every block from local_start[i] = its first diagonal block
    (layout.diagonal_first_block) - `local_blocks` on (rule 3). The one statement of the rows' geometry:
    `always_kept` builds its mask from it and the Triton policy loads it.
    """
    bs = config.block_size
    limits = causal_block_limits(n_q_blocks, bs, q_len, k_len, device=device)
    local_start = diagonal_first_block(n_q_blocks, bs, q_len, k_len, device=device) - config.local_blocks
    return torch.stack([limits, local_start]).to(torch.int32)


def always_kept(n_q_blocks: int, n_k_blocks: int, q_len: int, k_len: int, config: SparsePrefillConfig,
                device) -> torch.Tensor:
    """Rule 3's fixed blocks (sink, local, diagonal), bool [n_q_blocks, n_k_blocks], causal only."""
    limits, local_start = row_geometry(n_q_blocks, q_len, k_len, config, device)[:, :, None]
    cols = torch.arange(n_k_blocks, device=device)[None, :]
    return ((cols < config.sink_blocks) | (cols >= local_start)) & (cols < limits)


def exact_tail_start(n_q_blocks: int, q_len: int, config: SparsePrefillConfig) -> int:
    """Rule 4: the first query block of the exact tail (n_q_blocks when there is none)."""
    if config.exact_tail_tokens <= 0:
        return n_q_blocks
    return max(q_len - config.exact_tail_tokens, 0) // config.block_size


def _ranks(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank) of each row of `key`, largest first, ties by lower block index: order[r] is the r-th
    block, rank[j] block j's place."""
    order = key.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device)
                                            .expand_as(order))
    return order, rank


def choose_blocks(scores: BlockScores, last_mass: torch.Tensor, config: SparsePrefillConfig, q_len: int,
                  k_len: int) -> torch.Tensor:
    """The policy (module docstring) as a bool mask [B, Hq, n_q_blocks, n_k_blocks], loop- and sync-free.

    `scores` is the estimate ([B, P, Qb, Kb]); `last_mass` the exact last-block mass [B, Hq, Kb].
    """
    b, hq, n_kb = last_mass.shape
    n_qb = scores.mass.shape[-2]
    device = last_mass.device
    limits = causal_block_limits(n_qb, config.block_size, q_len, k_len, device=device)  # [Qb]
    causal = torch.arange(n_kb, device=device)[None, :] < limits[:, None]  # [Qb, Kb]
    if config.gamma >= 1:
        return causal.expand(b, hq, n_qb, n_kb)
    forced = always_kept(n_qb, n_kb, q_len, k_len, config, device)
    n_forced = forced.sum(-1)

    # Rule 1: rank each proxy row by estimated mass, forced blocks first (mass <= 1), non-causal last;
    # a row covers at least its forced blocks.
    order, rank = _ranks(scores.mass.masked_fill(~causal, -1.0).masked_fill(forced, 2.0))
    cover = torch.maximum(blocks_to_cover(scores.mass.gather(-1, order), config.gamma), n_forced)  # [B, P, Qb]
    proxy_of_head = torch.arange(hq, device=device) // scores.heads_per_proxy
    budget = cover[:, proxy_of_head]  # [B, Hq, Qb]

    # Rule 2: the same count, from the exact last block, in the exact ranking (forced first).
    last_order, last_rank = _ranks(last_mass.masked_fill(~causal[-1], -1.0).masked_fill(forced[-1], 2.0))
    exact_need = torch.maximum(blocks_to_cover(last_mass.gather(-1, last_order), config.gamma), n_forced[-1])
    budget = budget + (exact_need - budget[..., -1]).clamp(min=0)[..., None]

    # Rule 3.
    floor = torch.clamp(n_forced, min=config.min_budget_blocks)
    budget = torch.minimum(torch.maximum(budget, floor), limits)
    mask = (rank[:, proxy_of_head] < budget[..., None]) & causal
    last_floor = torch.minimum(torch.maximum(exact_need, floor[-1]), limits[-1])
    mask[:, :, -1] |= (last_rank < last_floor[..., None]) & causal[-1]

    # Rule 5: the top non-forced blocks of the exact last-block ranking, in every row that can see them.
    n_last = n_forced[-1]
    columns = (last_rank >= n_last) & (last_rank < n_last + config.question_blocks) & causal[-1] & ~forced[-1]
    mask |= columns[:, :, None, :] & causal

    # Rule 4.
    tail = exact_tail_start(n_qb, q_len, config)
    mask[:, :, tail:] = causal[tail:]
    return mask
