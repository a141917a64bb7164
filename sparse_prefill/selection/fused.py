"""The fused selection, part 1: the estimate and the exact last-block attention as Triton kernels.

Both are a causal softmax of some query rows over some key rows, pooled into (query block, key
block) cells. A softmax needs each row's max and sum over all its keys before any probability can
be pooled, and holding [rows x keys] would be quadratic in tokens, so the work runs in two passes,
both streaming key tiles past a query tile held in registers (flash-attention style):

  pass 1 (`_row_stats_kernel`)    running max and sum of exp2 per row over a slice of the keys;
                                  torch merges the slices' partial stats into a log-sum-exp
  pass 2 (`_pooled_probs_kernel`) normalised probabilities, max- and sum-pooled into cells and
                                  written straight to the block-level outputs

The key axis is cut into slices (`splits`) so that short query sets, such as each head's last query
block, still fill the GPU. The two kernels serve both uses:
  * the estimate (`estimate.py`): rows and keys are runs of `stride` tokens averaged beforehand by
    `_pool_tokens_kernel` (one read of q and k), per query head or per proxy head;
  * each head's exact last-block attention (`budget.last_block_mass`): stride 1, q and k as they are.

Logits are soft-capped (`softcap * tanh(logit / softcap)`, Gemma 2) when the attention is, so coverage
is measured on the distribution the attention kernel computes. Any head_dim is padded in registers
to a power of two. The policy then runs on the block-level tensors (`fused_policy.py`). Nothing here
synchronises with the host or loops over heads or blocks in Python; memory is O(tokens + blocks^2).

Strides: the kernels take all four strides of q and k, the head dimension's included, as the attention
kernel does, rather than copying inputs to a contiguous layout at the boundary (flash-attention's
`maybe_contiguous`). Triton compiles an integer argument equal to 1 as a constant, so the usual unit
head-dim stride (contiguous tensors, and the transposed [B, H, L, D] views transformers passes) gets
the same vectorised loads as a kernel written for it, and any other layout is read in place: no input
is ever copied, and none can be misread. A tile's base offset is computed in 64 bits (a transposed
q of 32 heads passes 2**31 elements at 512K tokens), the offsets inside it in 32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..kernels.triton_attention import tanh
from .estimate import BlockScores, num_proxies

_LOG2E = 1.4426950408889634
TILE_M = 64  # pooled query rows per program tile
TILE_N = 64  # pooled keys per loop step
NUM_WARPS = 4
POOL_GROUPS = 32  # pooled groups per program of the pooling kernel
# Arguments that follow the prompt's length. Triton would otherwise compile a variant per value class (divisible
# by 16 or not, equal to 1), so a server meeting new lengths and chunk offsets would keep compiling.
_SHAPE_ARGS = ("n_rows", "n_cols", "q_len", "k_len", "row0", "n_splits", "tiles_per_split", "n_q_blocks",
               "n_k_blocks")


@triton.jit
def _tile_logits(q_tile, k_ptr, sk_b, sk_h, sk_l, sk_d, b, k_head, col0, n_cols, k_len, row_pos, key_start, key_end,
                 offs_n, offs_d, softcap_log2, COL_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr):
    """Log2-domain logits of a query tile against one tile of pooled keys, -inf where not visible.

    Key group c sits at its first valid key; it is visible to rows at or after that key. In log2 units
    the soft cap c reads `c' * tanh(s / c')` with c' = c * log2(e).
    """
    cols = col0 + offs_n
    start = cols * COL_STRIDE
    col_pos = tl.maximum(start, key_start)
    col_ok = (cols < n_cols) & (col_pos < tl.minimum(start + COL_STRIDE, key_end))
    k_tile_ptr = k_ptr + b.to(tl.int64) * sk_b + k_head.to(tl.int64) * sk_h + tl.cast(col0, tl.int64) * sk_l
    k_ptrs = k_tile_ptr + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d
    k_tile = tl.load(k_ptrs, mask=(cols < n_cols)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    s = tl.dot(q_tile, tl.trans(k_tile)).to(tl.float32)
    if HAS_SOFTCAP:
        s = softcap_log2 * tanh(s / softcap_log2)
    visible = col_ok[None, :] & (col_pos[None, :] <= row_pos[:, None])
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _program_setup(q_ptr, sq_b, sq_h, sq_l, sq_d, key_range_ptr, pid_rows, pid_bh, n_heads, kv_heads, n_rows, q_len,
                   k_len, row0, scale_log2, offs_m, offs_d, ROW_STRIDE: tl.constexpr, HAS_KEY_RANGE: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
    """A program's rows (index, position, real flag), its key head, key range and scaled query tile.

    Row r pools query rows [row0 + r*ROW_STRIDE, +ROW_STRIDE) and sits at the last real one.
    """
    b = pid_bh // n_heads
    head = pid_bh % n_heads
    rows = pid_rows * offs_m.shape[0] + offs_m
    first = row0 + rows * ROW_STRIDE
    real = (rows < n_rows) & (first < q_len)
    row_pos = tl.minimum(first + ROW_STRIDE - 1, q_len - 1) + (k_len - q_len)
    if HAS_KEY_RANGE:
        key_start = tl.load(key_range_ptr + 2 * b)
        key_end = tl.load(key_range_ptr + 2 * b + 1)
    else:
        key_start = 0
        key_end = k_len
    q_tile_ptr = (q_ptr + b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h
                  + (pid_rows * offs_m.shape[0]).to(tl.int64) * sq_l)
    q_ptrs = q_tile_ptr + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d
    q_tile = tl.load(q_ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q_tile = (q_tile.to(tl.float32) * scale_log2).to(q_ptr.dtype.element_ty)
    return b, head * kv_heads // n_heads, rows, real, row_pos, key_start, key_end, q_tile


@triton.jit
def _key_tile_range(row_pos, pid_split, n_cols, tiles_per_split, COL_STRIDE: tl.constexpr, TILE_N: tl.constexpr):
    """[first, last) key tiles of this split that the program's rows can see (causal)."""
    last_visible_col = tl.max(row_pos) // COL_STRIDE
    causal_tiles = tl.minimum(last_visible_col // TILE_N + 1, tl.cdiv(n_cols, TILE_N))
    first = pid_split * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, causal_tiles)


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _row_stats_kernel(
    q_ptr, k_ptr, key_range_ptr, m_ptr, l_ptr,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d,
    n_heads, kv_heads, n_rows, n_cols, q_len, k_len, row0, n_splits, tiles_per_split, scale_log2, softcap_log2,
    ROW_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr,
):
    """Pass 1: per row, the max and the sum of exp2 over this split's visible keys -> m, l [B*H, splits, rows]."""
    pid_rows = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) rows first
    pid_bh, pid_split = tl.program_id(1), tl.program_id(2)
    offs_m, offs_n, offs_d = tl.arange(0, TILE_M), tl.arange(0, TILE_N), tl.arange(0, BLOCK_D)
    b, k_head, rows, real, row_pos, key_start, key_end, q_tile = _program_setup(
        q_ptr, sq_b, sq_h, sq_l, sq_d, key_range_ptr, pid_rows, pid_bh, n_heads, kv_heads, n_rows, q_len, k_len, row0,
        scale_log2, offs_m, offs_d, ROW_STRIDE, HAS_KEY_RANGE, HEAD_DIM)
    m_i = tl.full((TILE_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((TILE_M,), dtype=tl.float32)
    tile_lo, tile_hi = _key_tile_range(row_pos, pid_split, n_cols, tiles_per_split, COL_STRIDE, TILE_N)
    for tile in range(tile_lo, tile_hi):
        s = _tile_logits(q_tile, k_ptr, sk_b, sk_h, sk_l, sk_d, b, k_head, tile * TILE_N, n_cols, k_len, row_pos,
                         key_start, key_end, offs_n, offs_d, softcap_log2, COL_STRIDE, HEAD_DIM, HAS_SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    out = (pid_bh * n_splits + pid_split) * n_rows + rows
    tl.store(m_ptr + out, m_i, mask=rows < n_rows)
    tl.store(l_ptr + out, l_i, mask=rows < n_rows)


@triton.jit
def _merged_lse(m_ptr, l_ptr, pid_bh, n_splits, n_rows, rows, real):
    """Each row's log2-sum-exp2 from the splits' partial (max, sum); +inf for rows that see no key or
    are padding, so that their probabilities come out 0."""
    base = pid_bh * n_splits * n_rows + rows
    m_max = tl.full(rows.shape, float("-inf"), dtype=tl.float32)
    for split in range(n_splits):
        m_max = tl.maximum(m_max, tl.load(m_ptr + base + split * n_rows, mask=real, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.zeros(rows.shape, dtype=tl.float32)
    for split in range(n_splits):
        m = tl.load(m_ptr + base + split * n_rows, mask=real, other=float("-inf"))
        total += tl.load(l_ptr + base + split * n_rows, mask=real, other=0.0) * tl.exp2(m - m_safe)
    return tl.where(total > 0, m_safe + tl.log2(tl.maximum(total, 1e-30)), float("inf"))


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _pooled_probs_kernel(
    q_ptr, k_ptr, key_range_ptr, m_ptr, l_ptr, score_ptr, mass_ptr,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d,
    n_heads, kv_heads, n_rows, n_cols, q_len, k_len, row0, n_splits, tiles_per_split, n_q_blocks, n_k_blocks,
    scale_log2, softcap_log2,
    ROW_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr, COLS_PER_BLOCK: tl.constexpr,
):
    """Pass 2: probabilities exp2(s - lse), max- and sum-pooled into (query block, key block) cells."""
    pid_rows = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh, pid_split = tl.program_id(1), tl.program_id(2)
    offs_m, offs_n, offs_d = tl.arange(0, TILE_M), tl.arange(0, TILE_N), tl.arange(0, BLOCK_D)
    b, k_head, rows, real, row_pos, key_start, key_end, q_tile = _program_setup(
        q_ptr, sq_b, sq_h, sq_l, sq_d, key_range_ptr, pid_rows, pid_bh, n_heads, kv_heads, n_rows, q_len, k_len, row0,
        scale_log2, offs_m, offs_d, ROW_STRIDE, HAS_KEY_RANGE, HEAD_DIM)
    lse = _merged_lse(m_ptr, l_ptr, pid_bh, n_splits, n_rows, rows, real)

    Q_BLOCKS: tl.constexpr = TILE_M // ROWS_PER_BLOCK
    K_BLOCKS: tl.constexpr = TILE_N // COLS_PER_BLOCK
    q_block = pid_rows * Q_BLOCKS + tl.arange(0, Q_BLOCKS)
    real_rows = tl.sum(tl.reshape(real.to(tl.float32), (Q_BLOCKS, ROWS_PER_BLOCK)), 1)
    row_weight = 1.0 / tl.maximum(real_rows, 1.0)
    out_base = pid_bh * n_q_blocks * n_k_blocks + q_block[:, None] * n_k_blocks
    tile_lo, tile_hi = _key_tile_range(row_pos, pid_split, n_cols, tiles_per_split, COL_STRIDE, TILE_N)
    for tile in range(tile_lo, tile_hi):
        s = _tile_logits(q_tile, k_ptr, sk_b, sk_h, sk_l, sk_d, b, k_head, tile * TILE_N, n_cols, k_len, row_pos,
                         key_start, key_end, offs_n, offs_d, softcap_log2, COL_STRIDE, HEAD_DIM, HAS_SOFTCAP)
        p = tl.exp2(s - lse[:, None])  # [TILE_M, TILE_N]
        # Pool keys into blocks, then rows into blocks.
        p_cols = tl.reshape(p, (TILE_M, K_BLOCKS, COLS_PER_BLOCK))
        col_max, col_sum = tl.max(p_cols, 2), tl.sum(p_cols, 2)
        score = tl.max(tl.reshape(col_max, (Q_BLOCKS, ROWS_PER_BLOCK, K_BLOCKS)), 1)
        mass = tl.sum(tl.reshape(col_sum, (Q_BLOCKS, ROWS_PER_BLOCK, K_BLOCKS)), 1) * row_weight[:, None]
        k_block = tile * K_BLOCKS + tl.arange(0, K_BLOCKS)
        ok = (q_block[:, None] < n_q_blocks) & (k_block[None, :] < n_k_blocks)
        tl.store(score_ptr + out_base + k_block[None, :], score, mask=ok)
        tl.store(mass_ptr + out_base + k_block[None, :], mass, mask=ok)


def _padded(head_dim: int) -> int:
    """The register width of a head: the next power of two, at least 16 (what tl.dot takes)."""
    return max(16, triton.next_power_of_2(head_dim))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_keys(q: torch.Tensor, programs: int, col_tiles: int) -> tuple[int, int]:
    """(splits, tiles per split) of the key axis so that about 4 programs per multiprocessor run."""
    target = 4 * (_multiprocessors(q.device.index or 0) if q.is_cuda else 1)
    splits = max(1, min(col_tiles, target // max(1, programs)))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split


def pooled_softmax_blocks(
    rows: torch.Tensor,
    keys: torch.Tensor,
    q_len: int,
    k_len: int,
    block_size: int,
    stride: int,
    scale: float,
    key_range: torch.Tensor | None = None,
    row0: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax of query rows over key rows, max- and mean-pooled into blocks, in two passes.

    rows [B, H, R, D]: row r stands for queries [row0 + r*stride, +stride) of a q of length q_len
    (queries are the last q_len of k_len positions). keys [B, Hk, C, D]: key row c stands for keys
    [c*stride, +stride); head h reads key head h * Hk // H. With `row0` given, the rows are queries
    row0, row0 + 1, ... (stride 1) and form one query block. `softcap` caps the logits as the attention
    does. Returns (score, mass) fp32 [B, H, n_q_blocks, n_k_blocks] as `estimate.py` defines them.
    """
    b, heads, n_rows, d = rows.shape
    n_cols = keys.shape[2]
    single_block = row0 is not None
    rows_per_block = block_size if single_block else block_size // stride
    n_q_blocks = 1 if single_block else -(-q_len // block_size)
    n_k_blocks = -(-k_len // block_size)
    cols_per_block = block_size // stride
    tile_m, tile_n = max(TILE_M, rows_per_block), max(TILE_N, cols_per_block)
    row_tiles, col_tiles = triton.cdiv(n_rows, tile_m), triton.cdiv(n_cols, tile_n)
    splits, tiles_per_split = _split_keys(rows, row_tiles * b * heads, col_tiles)

    kr = key_range.to(device=rows.device, dtype=torch.int32).contiguous() if key_range is not None else rows
    args = (*rows.stride(), *keys.stride(), heads, keys.shape[1], n_rows, n_cols, q_len, k_len, row0 or 0)
    meta = dict(ROW_STRIDE=1 if single_block else stride, COL_STRIDE=stride,
                HAS_KEY_RANGE=key_range is not None, HAS_SOFTCAP=softcap is not None, HEAD_DIM=d,
                BLOCK_D=_padded(d), TILE_M=tile_m, TILE_N=tile_n, num_warps=NUM_WARPS)
    scale_log2 = scale * _LOG2E
    softcap_log2 = 0.0 if softcap is None else float(softcap) * _LOG2E
    grid = (row_tiles, b * heads, splits)
    m = torch.empty(b * heads, splits, n_rows, device=rows.device, dtype=torch.float32)
    sum_exp = torch.empty_like(m)
    _row_stats_kernel[grid](rows, keys, kr, m, sum_exp, *args, splits, tiles_per_split, scale_log2, softcap_log2,
                            **meta)
    # Two allocations, not two halves of one: a half starting mid-buffer is 16-byte aligned or not by the shape,
    # and Triton compiles a kernel variant per pointer alignment.
    score, mass = (torch.zeros(b, heads, n_q_blocks, n_k_blocks, device=rows.device, dtype=torch.float32)
                   for _ in range(2))
    _pooled_probs_kernel[grid](rows, keys, kr, m, sum_exp, score, mass, *args, splits, tiles_per_split, n_q_blocks,
                               n_k_blocks, scale_log2, softcap_log2, ROWS_PER_BLOCK=rows_per_block,
                               COLS_PER_BLOCK=cols_per_block, **meta)
    return score, mass


@triton.jit(do_not_specialize=("length", "n_groups"))
def _pool_tokens_kernel(
    x_ptr, out_ptr, key_range_ptr, sx_b, sx_h, sx_l, sx_d, so_b, so_h, so_g, out_heads, length, n_groups,
    STRIDE: tl.constexpr, HEADS_PER_OUT: tl.constexpr, HAS_KEY_RANGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUPS: tl.constexpr,
):
    """out[b, h, g] = mean of x over heads [h*HEADS_PER_OUT, +HEADS_PER_OUT) and tokens [g*STRIDE, +STRIDE)
    that exist (and lie in the key range); zero for groups with no such token."""
    pid_g, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // out_heads, pid_bh % out_heads
    first_group = pid_g * GROUPS
    groups = first_group + tl.arange(0, GROUPS)
    offs_d = tl.arange(0, BLOCK_D)
    in_dim = offs_d < HEAD_DIM
    if HAS_KEY_RANGE:
        start = tl.load(key_range_ptr + 2 * b)
        end = tl.minimum(tl.load(key_range_ptr + 2 * b + 1), length)
    else:
        start = 0
        end = length
    acc = tl.zeros((GROUPS, BLOCK_D), dtype=tl.float32)
    count = tl.zeros((GROUPS,), dtype=tl.float32)
    for t in tl.static_range(STRIDE):
        token = groups * STRIDE + t
        ok = (token >= start) & (token < end)
        count += ok.to(tl.float32)
        for g in tl.static_range(HEADS_PER_OUT):
            x_head = (x_ptr + b.to(tl.int64) * sx_b + (h * HEADS_PER_OUT + g).to(tl.int64) * sx_h
                      + (first_group * STRIDE).to(tl.int64) * sx_l)
            ptrs = x_head + (token - first_group * STRIDE)[:, None] * sx_l + offs_d[None, :] * sx_d
            acc += tl.load(ptrs, mask=ok[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
    out = acc / (tl.maximum(count, 1.0) * HEADS_PER_OUT)[:, None]
    out_tile = out_ptr + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + first_group.to(tl.int64) * so_g
    out_ptrs = out_tile + tl.arange(0, GROUPS)[:, None] * so_g + offs_d[None, :]  # out: ours, contiguous
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(groups < n_groups)[:, None] & in_dim[None, :])


def pool_tokens_fused(x: torch.Tensor, stride: int, groups: int, heads: int,
                      key_range: torch.Tensor | None = None) -> torch.Tensor:
    """`estimate.pool_tokens` then `pool_proxy_heads`-style head averaging, in one pass over x.

    x [B, H, L, D] -> [B, heads, groups, D] in x's dtype: group g averages tokens [g*stride, +stride)
    (only those inside `key_range` when given) of H // heads consecutive heads (heads <= H).
    """
    b, h, length, d = x.shape
    out = torch.empty(b, heads, groups, d, dtype=x.dtype, device=x.device)
    kr = key_range.to(device=x.device, dtype=torch.int32).contiguous() if key_range is not None else x
    grid = (triton.cdiv(groups, POOL_GROUPS), b * heads)
    _pool_tokens_kernel[grid](x, out, kr, *x.stride(), out.stride(0), out.stride(1), out.stride(2), heads, length,
                              groups, STRIDE=stride, HEADS_PER_OUT=h // heads, HAS_KEY_RANGE=key_range is not None,
                              HEAD_DIM=d, BLOCK_D=_padded(d), GROUPS=POOL_GROUPS)
    return out


def estimate_block_scores_fused(q: torch.Tensor, k: torch.Tensor, config, scale: float | None = None,
                                key_range: torch.Tensor | None = None, softcap: float | None = None) -> BlockScores:
    """`estimate.estimate_block_scores`, computed by the Triton kernels."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bs, stride = config.block_size, config.stride
    proxies = num_proxies(hq, hkv, config.proxy_heads)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    per_block = bs // stride
    rows = pool_tokens_fused(q, stride, -(-lq // bs) * per_block, proxies)
    kv_proxies = proxies if hkv % proxies == 0 else hkv  # more proxies than KV heads: each reads one
    keys = pool_tokens_fused(k, stride, -(-lk // bs) * per_block, kv_proxies, key_range)
    score, mass = pooled_softmax_blocks(rows, keys, lq, lk, bs, stride, scale, key_range, softcap=softcap)
    return BlockScores(score=score, mass=mass, heads_per_proxy=hq // proxies)


def last_block_mass_fused(q: torch.Tensor, k: torch.Tensor, config, scale: float | None = None,
                          key_range: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """`budget.last_block_mass` (each head's exact attention from its last query block, pooled to key
    blocks), computed by the Triton kernels: fp32 [B, Hq, n_k_blocks]."""
    lq, bs = q.shape[2], config.block_size
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    first = (-(-lq // bs) - 1) * bs
    _, mass = pooled_softmax_blocks(q[:, :, first:], k, lq, k.shape[2], bs, 1, scale, key_range, row0=first,
                                    softcap=softcap)
    return mass[:, :, 0]
