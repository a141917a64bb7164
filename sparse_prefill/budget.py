"""Block scores -> BlockLayout: how many key blocks each head keeps, and which.

Policy, in three rules (each row is one (head, query block)):

1. *Per-head dynamic budget.* A head's own last query block is attended exactly; the fewest key
   blocks holding `gamma` of that attention, as a fraction of the blocks it can see, is the head's
   budget fraction. Sharp heads get a few blocks, flat heads many.
2. *Per-row coverage.* Every row also keeps, in the order of its proxy head's block scores, enough
   blocks to cover `gamma` of the estimated mass, so a row unlike the last one is not starved.
3. *Always kept.* Sink blocks, `local_blocks` before the diagonal, the diagonal, and at least
   `min_budget_tokens` worth of blocks. Never a block above the causal diagonal.

A row keeps the top `max(rule 1, rule 2, rule 3)` blocks of its proxy's ranking, with the
always-kept blocks ranked first. `gamma >= 1` keeps every causal block.
"""

from __future__ import annotations

import math

import torch

from .config import SparsePrefillConfig
from .estimate import BlockScores
from .layout import BlockLayout, causal_block_limits, diagonal_first_block


def head_budget_fractions(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparsePrefillConfig,
    scale: float | None = None,
    key_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rule 1: each query head's budget fraction from its last query block, fp32 [B, Hq] in (0, 1]."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, bs = hq // hkv, config.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = min(bs, lq)
    n_kb = -(-lk // bs)
    q_pos = torch.arange(lq - rows, lq, device=q.device) + (lk - lq)
    cols = torch.arange(lk, device=k.device)
    allowed = cols[None, :] <= q_pos[:, None]  # [rows, Lk]
    allowed = allowed[None, None]
    if key_range is not None:
        kr = key_range.to(k.device)
        allowed = allowed & ((cols[None] >= kr[:, :1]) & (cols[None] < kr[:, 1:]))[:, None, None, :]
    visible = int(q_pos[-1]) // bs + 1
    fractions = torch.empty(b, hq, device=q.device)
    for h in range(hkv):  # one KV group at a time bounds memory to [B, G, bs, Lk]
        qh = q[:, h * group:(h + 1) * group, lq - rows:].float() * scale
        s = (qh @ k[:, h:h + 1].float().transpose(-1, -2)).masked_fill(~allowed, -math.inf)
        probs = torch.softmax(s, dim=-1).nan_to_num(0.0).mean(2)  # [B, G, Lk]
        block_mass = torch.nn.functional.pad(probs, (0, n_kb * bs - lk)).reshape(b, group, n_kb, bs).sum(-1)
        needed = blocks_to_cover(block_mass.sort(-1, descending=True).values, config.gamma)
        fractions[:, h * group:(h + 1) * group] = needed.float() / visible
    return fractions.clamp(max=1.0)


def blocks_to_cover(sorted_mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """How many leading entries of each row of `sorted_mass` reach `gamma` of the row's total."""
    cumulative = sorted_mass.cumsum(-1)
    total = cumulative[..., -1:]
    return (cumulative < gamma * total).sum(-1) + 1


def always_kept(n_q_blocks: int, n_k_blocks: int, q_len: int, k_len: int, config: SparsePrefillConfig,
                device) -> torch.Tensor:
    """Rule 3's fixed blocks (sink, local, diagonal), bool [n_q_blocks, n_k_blocks], causal only."""
    bs = config.block_size
    limits = causal_block_limits(n_q_blocks, bs, q_len, k_len, device=device)
    first_diag = diagonal_first_block(n_q_blocks, bs, q_len, k_len, device=device)
    cols = torch.arange(n_k_blocks, device=device)[None, :]
    causal = cols < limits[:, None]
    local = cols >= (first_diag - config.local_blocks)[:, None]
    sink = cols < config.sink_blocks
    return (sink | local) & causal


def layout_from_scores(
    scores: BlockScores,
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparsePrefillConfig,
    scale: float | None = None,
    key_range: torch.Tensor | None = None,
) -> BlockLayout:
    """Apply the three rules to the estimate of q [B, Hq, Lq, D] over k [B, Hkv, Lk, D]."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    n_qb, n_kb = scores.score.shape[-2:]
    device = q.device
    limits = causal_block_limits(n_qb, config.block_size, lq, lk, device=device)  # [Qb]
    causal = torch.arange(n_kb, device=device)[None, :] < limits[:, None]  # [Qb, Kb]
    if config.gamma >= 1:
        mask = causal.expand(b, hq, n_qb, n_kb)
        return BlockLayout.from_mask(mask.contiguous(), config.block_size, max_count=n_kb)

    forced = always_kept(n_qb, n_kb, lq, lk, config, device)
    # Rank blocks per proxy row: forced first (scores are probabilities <= 1), never non-causal ones.
    key = scores.score.masked_fill(~causal, -1.0).masked_fill(forced, 2.0)
    order = key.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_kb, device=device).expand_as(order))
    cover = blocks_to_cover(scores.mass.gather(-1, order), config.gamma)  # rule 2, [B, P, Qb]

    fraction = head_budget_fractions(q, k, config, scale, key_range)  # rule 1, [B, Hq]
    per_head = torch.ceil(fraction[..., None] * limits).long()  # [B, Hq, Qb]
    proxy_of_head = torch.arange(hq, device=device) // scores.heads_per_proxy
    budget = torch.maximum(per_head, cover[:, proxy_of_head])
    budget = torch.maximum(budget, torch.tensor(config.min_budget_blocks, device=device))
    budget = torch.maximum(budget, forced.sum(-1))  # rule 3
    budget = torch.minimum(budget, limits)
    mask = (rank[:, proxy_of_head] < budget[..., None]) & causal
    return BlockLayout.from_mask(mask, config.block_size, max_count=n_kb)
