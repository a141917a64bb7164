"""The fused selection, part 2: the policy of `budget.choose_blocks` as two Triton kernels that write the
BlockLayout.

In torch the policy sorts every row of block scores and then compacts a [B, H, Qb, Kb] mask: a dozen
launches over tensors of that size. Here one program handles one row (one head, one query block) in
registers and writes its `counts` and ascending `indices` directly:

  `_calibrate_heads_kernel`  per head: blocks the exact last-block attention needs, blocks the
                             estimate said for that row, and the shortfall between them (rule 2);
                             the question columns (rule 5)
  `_choose_rows_kernel`      per row: coverage count (rule 1) + shortfall, floors and caps (rule 3),
                             the top blocks, the exact last-row blocks, the question columns, the
                             exact tail (rule 4), compaction

The rows' geometry (causal limit, first local block: `budget.row_geometry`) and the exact tail's first
row (`budget.exact_tail_start`) are computed once by the PyTorch definitions and passed in, never
re-derived here.

"Largest first" needs no sort: masses are >= 0, so their fp32 bit patterns order like the values
and a 31-step bisection over the bits finds the threshold; ties go to the lower block index, as the
stable sort of the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BlockLayout
from .budget import exact_tail_start, row_geometry
from .estimate import BlockScores


@triton.jit
def _row_blocks(geometry_ptr, i, n_q_blocks, cols, sink):
    """Causal limit of query block i, its causal key blocks, and its always-kept ones (sink, local, diagonal),
    from `budget.row_geometry` [2, n_q_blocks]."""
    limit = tl.load(geometry_ptr + i)
    causal = cols < limit
    forced = causal & ((cols < sink) | (cols >= tl.load(geometry_ptr + n_q_blocks + i)))
    return limit, causal, forced


@triton.jit
def _mass_bits(mass, eligible):
    """fp32 masses (>= 0) as ordered int32 keys; -1 for blocks that may not be chosen."""
    return tl.where(eligible, mass.to(tl.int32, bitcast=True), -1)


@triton.jit
def _cover(mass, forced, eligible, gamma):
    """How many blocks reach `gamma` of the row's mass: its forced blocks, then the fewest eligible ones,
    largest first (`budget.blocks_to_cover` with forced blocks ranked first)."""
    n_forced = tl.sum(forced.to(tl.int32))
    target = gamma * tl.sum(tl.where(forced | eligible, mass, 0.0)) - tl.sum(tl.where(forced, mass, 0.0))
    bits = _mass_bits(mass, eligible)
    # The largest threshold t whose blocks at or above it still hold `target` (0x7F800000 = +inf).
    lo = 0
    hi = 0x7F800000
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum(tl.where(bits >= mid, mass, 0.0)) >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    above = bits > lo
    at = bits == lo
    value = tl.max(tl.where(at, mass, 0.0))
    missing = target - tl.sum(tl.where(above, mass, 0.0))
    n_at = tl.sum(at.to(tl.int32))
    ratio = tl.minimum(tl.where(value > 0, missing / tl.maximum(value, 1e-30), 0.0), n_at + 1.0)
    take = ratio.to(tl.int32)
    take = tl.where(value > 0, take + (take.to(tl.float32) < ratio).to(tl.int32), n_at)  # ceil
    needed = tl.sum(above.to(tl.int32)) + tl.minimum(tl.maximum(take, 0), n_at)
    reachable = tl.sum(tl.where(bits >= 0, mass, 0.0)) >= target
    needed = tl.where(reachable, needed, tl.sum(eligible.to(tl.int32)))
    return n_forced + tl.where(target > 0, needed, 0)


@triton.jit
def _top(mass, eligible, n):
    """The n eligible blocks of largest mass (ties: lower index), as a bool vector."""
    bits = _mass_bits(mass, eligible)
    lo = 0
    hi = 0x7F800000
    for _ in range(31):  # the largest threshold with at least n blocks at or above it
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((bits >= mid).to(tl.int32)) >= n
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    above = bits > lo
    at = bits == lo
    rank_at = tl.cumsum(at.to(tl.int32), 0)  # 1, 2, ... over the tied blocks in index order
    # n <= 0 drives the threshold to +inf, which no finite mass reaches: nothing is chosen.
    return above | (at & (rank_at <= n - tl.sum(above.to(tl.int32))))


@triton.jit(do_not_specialize=("n_q_blocks", "n_k_blocks"))  # one compiled variant per NKB, whatever the length
def _calibrate_heads_kernel(
    mass_ptr, last_mass_ptr, geometry_ptr, shortfall_ptr, exact_need_ptr, columns_ptr,
    n_heads, heads_per_proxy, n_proxies, n_q_blocks, n_k_blocks, gamma, sink, question_blocks, NKB: tl.constexpr,
):
    """Rules 2 and 5 per head: exact need of the last query block, how far the estimate's count fell short,
    and the question columns (the top non-forced blocks of the exact last block)."""
    pid_bh = tl.program_id(0)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    cols = tl.arange(0, NKB)
    i = n_q_blocks - 1
    _, causal, forced = _row_blocks(geometry_ptr, i, n_q_blocks, cols, sink)
    eligible = causal & ~forced
    in_row = cols < n_k_blocks
    proxy_row = ((b * n_proxies + h // heads_per_proxy) * n_q_blocks + i) * n_k_blocks
    estimated = tl.load(mass_ptr + proxy_row + cols, mask=in_row, other=0.0)
    exact = tl.load(last_mass_ptr + pid_bh * n_k_blocks + cols, mask=in_row, other=0.0)
    need = _cover(exact, forced, eligible, gamma)
    tl.store(exact_need_ptr + pid_bh, need)
    tl.store(shortfall_ptr + pid_bh, tl.maximum(need - _cover(estimated, forced, eligible, gamma), 0))
    columns = _top(exact, eligible, question_blocks)
    tl.store(columns_ptr + pid_bh * n_k_blocks + cols, columns.to(tl.int8), mask=in_row)


@triton.jit(do_not_specialize=("n_q_blocks", "n_k_blocks", "min_blocks", "tail_start"))
def _choose_rows_kernel(
    mass_ptr, last_mass_ptr, geometry_ptr, shortfall_ptr, exact_need_ptr, columns_ptr, counts_ptr, indices_ptr,
    n_heads, heads_per_proxy, n_proxies, n_q_blocks, n_k_blocks, gamma, sink, min_blocks, tail_start,
    NKB: tl.constexpr,
):
    """Rules 1-4 for one (head, query block) row, written as a compressed layout row."""
    pid_bh, i = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    cols = tl.arange(0, NKB)
    limit, causal, forced = _row_blocks(geometry_ptr, i, n_q_blocks, cols, sink)
    eligible = causal & ~forced
    in_row = cols < n_k_blocks
    proxy_row = ((b * n_proxies + h // heads_per_proxy) * n_q_blocks + i) * n_k_blocks
    mass = tl.load(mass_ptr + proxy_row + cols, mask=in_row, other=0.0)
    n_forced = tl.sum(forced.to(tl.int32))
    floor = tl.maximum(n_forced, min_blocks)
    budget = _cover(mass, forced, eligible, gamma) + tl.load(shortfall_ptr + pid_bh)
    budget = tl.minimum(tl.maximum(budget, floor), limit)
    keep = forced | _top(mass, eligible, budget - n_forced)
    if i == n_q_blocks - 1:  # the last row also keeps what its exact attention needs
        exact = tl.load(last_mass_ptr + pid_bh * n_k_blocks + cols, mask=in_row, other=0.0)
        last_budget = tl.minimum(tl.maximum(tl.load(exact_need_ptr + pid_bh), floor), limit)
        keep = keep | _top(exact, eligible, last_budget - n_forced)
    keep = keep | (causal & (tl.load(columns_ptr + pid_bh * n_k_blocks + cols, mask=in_row, other=0) != 0))
    if i >= tail_start:  # the exact tail keeps every causal block
        keep = causal
    count = tl.sum(keep.to(tl.int32))
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    row = (pid_bh * n_q_blocks + i) * n_k_blocks
    tl.store(indices_ptr + row + slot, cols, mask=keep)
    tl.store(indices_ptr + row + cols, tl.full((NKB,), -1, tl.int32), mask=(cols >= count) & in_row)
    tl.store(counts_ptr + pid_bh * n_q_blocks + i, count)


def padded_row_width(n_k_blocks: int) -> int:
    """The width the policy kernels pad a row of `n_k_blocks` key blocks to (their NKB): a power of two, at least
    16. Each width is one compiled variant of those kernels."""
    return triton.next_power_of_2(max(n_k_blocks, 16))


def choose_blocks_fused(scores: BlockScores, last_mass: torch.Tensor, config, q_len: int, k_len: int) -> BlockLayout:
    """`budget.choose_blocks` followed by the layout compaction, as two Triton launches."""
    b, hq, n_kb = last_mass.shape
    n_proxies, n_qb = scores.mass.shape[1], scores.mass.shape[2]
    device = last_mass.device
    mass = scores.mass.contiguous()  # the callers' tensors: the kernels index them as contiguous rows
    last_mass = last_mass.contiguous()
    nkb_pow2 = padded_row_width(n_kb)
    warps = 4 if nkb_pow2 <= 2048 else 8
    geometry = row_geometry(n_qb, q_len, k_len, config, device)
    shape = (hq, scores.heads_per_proxy, n_proxies, n_qb, n_kb, float(config.gamma), config.sink_blocks)
    shortfall = torch.empty(b * hq, dtype=torch.int32, device=device)
    exact_need = torch.empty_like(shortfall)
    columns = torch.empty(b * hq, n_kb, dtype=torch.int8, device=device)
    _calibrate_heads_kernel[(b * hq,)](mass, last_mass, geometry, shortfall, exact_need, columns, *shape,
                                        config.question_blocks, NKB=nkb_pow2, num_warps=warps)
    counts = torch.empty(b, hq, n_qb, dtype=torch.int32, device=device)
    indices = torch.empty(b, hq, n_qb, n_kb, dtype=torch.int32, device=device)
    _choose_rows_kernel[(b * hq, n_qb)](mass, last_mass, geometry, shortfall, exact_need, columns, counts, indices,
                                        *shape, config.min_budget_blocks, exact_tail_start(n_qb, q_len, config),
                                        NKB=nkb_pow2, num_warps=warps)
    return BlockLayout(counts, indices, config.block_size, n_kb, canonical=True)
