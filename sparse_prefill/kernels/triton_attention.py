"""Block-sparse flash-attention forward in Triton: the fast path behind `block_sparse_attention`.

Same semantics as `reference.attend` (read it first; the arguments are `call.AttentionCall`'s). How it
is computed:

* One program per (query tile, batch row, query head). The query tile (`block_m` rows) stays on
  chip while the program walks the key blocks its layout row keeps, `block_n` keys at a time,
  with an online softmax in log2 units (the log2(e) factor is folded into the score scale, so the
  exponentials are `exp2`).
* GQA without copies: query head h reads KV head h // (Hq // Hkv). Programs are ordered so that the
  heads of one KV group run side by side, every query tile of one KV head runs before the next KV
  head, and long (late) query tiles start first; the group's heads then read each K/V tile from HBM
  once and from L2 after that, also when the layout scatters blocks.
* Masking only where needed. A BlockLayout's rows are ascending and unique (layout.py makes them
  so), so a row splits into positions [lower boundary | fully visible | upper boundary]: the fully
  visible blocks run through the unmasked loop (`MASKED=False`), the few blocks that straddle the
  causal diagonal, the end of the keys or the `key_range` bounds run through the masked one
  (`MASKED=True`). Blocks no row of the tile can see are skipped.
* K/V tiles come through Hopper's tensor memory accelerator (TMA, host-built tensor descriptors,
  Triton >= 3.4) when the strides allow it, else through plain pointer loads. `head_dim` is padded
  in registers to a power of two; TMA's out-of-bounds fill (or load masks) supplies the zeros.

* `attention_dtype="fp8"` (Hopper): the same program with a constexpr `FP8` (kernels/fp8.py is its
  specification). K and V come from a pre-pass in e4m3 (triton_fp8.py: K smoothed by its mean, V stored
  with the keys contiguous, one scale per block); the query tile is rounded to e4m3 here; P is scaled
  per row and tile, and each tile's P.V is added to the fp32 accumulator with its scales.

No host synchronisation: counts and indices are read on the device, and the layout's `indices` may
be wider than the rows' counts (only `counts[b, h, i]` entries of row i are read).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..layout import BlockLayout
from .call import AttentionCall
from .interpreter import interpreting
from .support import TRITON_BLOCK_SIZES, TRITON_DTYPES, TRITON_HEAD_DIMS
from .triton_fp8 import quantize_kv, to_e4m3

LOG2E = 1.4426950408889634
LOG2_448 = tl.constexpr(8.807354922057604)  # log2 of e4m3's largest value, the FP8 kernel's scale for P (in-kernel)
KERNEL_DTYPES = (*TRITON_DTYPES, torch.float32)  # float32: tests and debugging only (slow)
KV_LOADS = ("pointer", "tma")


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of the kernel.

    block_m: query rows per program; divides the layout's block size.
    block_n: keys per inner step; divides the layout's block size.
    num_stages: software-pipelining depth of the K/V loads (the index-reading loop gets two more, see
        the kernel); num_warps as in Triton.
    kv_loads: "pointer" (plain loads) or "tma" (host-built tensor descriptors, Hopper).
    max_registers: a per-thread register cap (None: the compiler's choice). 128 with 8 warps and
        128x64 tiles at two stages fits two programs per SM (96 KB of shared memory each); measured,
        that pays only for very short rows (bench/NOTES_kernel.md), so no default uses it.

    Measured and dropped (bench/NOTES_kernel.md): descriptors built in the kernel, Triton's warp
    specialisation of this loop, a head-major launch order, and the diagonal tile folded into the
    pipelined loop; each was slower.
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    kv_loads: str = "pointer"
    max_registers: int | None = None


def default_config(head_dim: int, block_size: int, q: torch.Tensor) -> KernelConfig:
    """Hand-picked launch shapes, measured in bench/bench_kernel.py (see bench/NOTES_kernel.md)."""
    hopper = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    loads = "tma" if hopper else "pointer"
    if block_size == 64:
        return KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, kv_loads=loads)
    if head_dim > 128:
        return KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, kv_loads=loads)
    # head_dim 64: 128-key steps leave too little matrix work per softmax step (bench/NOTES_kernel.md, row 9).
    return KernelConfig(block_m=128, block_n=128 if head_dim > 64 else 64, num_warps=8, num_stages=3, kv_loads=loads)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def tanh(x):
    """tanh through the sigmoid (Triton has no tanh of its own on every version); soft-capping uses it."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _count_positions_below(idx_row, count, width, t0, t1, t2, t3, DENSE: tl.constexpr, CHUNK: tl.constexpr):
    """How many of the row's `count` ascending block indices are < t0, t1, t2, t3 (one pass).

    The first chunk is read up to the row's `width` without waiting for `count`, so a short row
    costs one memory latency here, not two.
    """
    if DENSE:  # the row keeps blocks 0 .. count-1
        return (tl.minimum(tl.maximum(t0, 0), count), tl.minimum(tl.maximum(t1, 0), count),
                tl.minimum(tl.maximum(t2, 0), count), tl.minimum(tl.maximum(t3, 0), count))
    offs = tl.arange(0, CHUNK)
    block = tl.load(idx_row + offs, mask=offs < width, other=0)
    block = tl.where(offs < count, block, 2147483647)
    n0 = tl.sum((block < t0).to(tl.int32))
    n1 = tl.sum((block < t1).to(tl.int32))
    n2 = tl.sum((block < t2).to(tl.int32))
    n3 = tl.sum((block < t3).to(tl.int32))
    for start in range(CHUNK, count, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        block = tl.load(idx_row + offs, mask=offs < count, other=2147483647)
        n0 += tl.sum((block < t0).to(tl.int32))
        n1 += tl.sum((block < t1).to(tl.int32))
        n2 += tl.sum((block < t2).to(tl.int32))
        n3 += tl.sum((block < t3).to(tl.int32))
    return n0, n1, n2, n3


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, rows_pos,
    k_head, v_head, k_desc, v_desc, b, kv_head,
    stride_kn, stride_kd, stride_vn, stride_vd,
    idx_row, tile_lo, tile_hi, key_lo, key_hi, k_len,
    qk_scale, softcap_log2, softcap_arg,
    q_scale, k_scales, v_scales, row_bias,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    DENSE: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    KV_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr,
    FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The online-softmax core: fold key tiles [tile_lo, tile_hi) of the row into (acc, l_i, m_i).

    Scores are kept in log2 units (`qk_scale` = scale * log2 e). `MASKED` tiles apply the causal,
    key-range and end-of-keys masks; unmasked tiles are known to be fully visible to every row.

    `FP8` (kernels/fp8.py is the specification): q, K and V are e4m3, K smoothed by its mean; q_scale is the query
    tile's scale, k_scales / v_scales point at this KV head's per-block scales, row_bias is q . mean(k) per row
    (used under softcap only: elsewhere it is one constant per row, which softmax ignores). P is rounded to e4m3
    per (row, tile), its largest value per row mapped to 448, and each tile's P.V is added to the fp32
    accumulator with its scale.
    """
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for tile in tl.range(tile_lo, tile_hi, num_stages=STAGES):
        # -- which keys: the tile's first key from the layout row ----------------------------------
        if DENSE:
            n0 = tile * BLOCK_N
        else:
            block = tl.load(idx_row + tile // TILES_PER_BLOCK)
            n0 = block * BLOCK_SIZE + (tile % TILES_PER_BLOCK) * BLOCK_N
        # -- load K and V tiles [BLOCK_N, BLOCK_D] -------------------------------------------------
        if KV_TMA:
            k = k_desc.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_D)
            if FP8:  # V is stored [D, L] (keys contiguous, as the FP8 product's operand wants them)
                v = tl.trans(v_desc.load([b, kv_head, 0, n0]).reshape(BLOCK_D, BLOCK_N))
            else:
                v = v_desc.load([b, kv_head, n0, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k_ptrs = k_head + n0.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
            v_ptrs = v_head + n0.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
            if MASKED or BLOCK_D != HEAD_DIM:
                inside = ((n0 + offs_n)[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
                k = tl.load(k_ptrs, mask=inside, other=0.0)
                v = tl.load(v_ptrs, mask=inside, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        # -- scores in log2 units --------------------------------------------------------------------
        if FP8:  # s * c in log2 units, c applied with the max subtracted (one fused multiply-add per score)
            block_scale = q_scale * tl.load(k_scales + n0 // BLOCK_SIZE)
            s = tl.dot(q, tl.trans(k))  # e4m3 x e4m3, fp32 accumulation
            if HAS_SOFTCAP:
                s = softcap_log2 * tanh((s * block_scale + row_bias[:, None]) * softcap_arg)
                c = 1.0
            else:
                c = block_scale * qk_scale  # > 0: the mask's -inf and the row maximum commute with it
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_SOFTCAP:
                s = softcap_log2 * tanh(s * softcap_arg)
            else:
                s = s * qk_scale
        if MASKED:
            cols = n0 + offs_n
            visible = (cols[None, :] >= key_lo) & (cols[None, :] < key_hi)
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        # -- online softmax update ---------------------------------------------------------------------
        if FP8:
            m_tile = tl.max(s, 1) * c
            m_new = tl.maximum(m_i, m_tile)
            if MASKED:  # as below; a row with no visible key in this tile gets p = 0 and a unit rescale
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
                m_tile = tl.where(m_tile == float("-inf"), m_new, m_tile)
            # P relative to the tile's own row maximum, so its largest value is 1, becomes 448 in e4m3. The
            # denominator sums P before rounding (fp8.attend's default): reading the rounded P back as well is
            # miscompiled by Triton 3.6 on Hopper when it also feeds the product (bench/RESULTS.md, FP8)
            p = tl.math.exp2(s * c - (m_tile - LOG2_448)[:, None])  # 448 * 2^(s - m_tile)
            alpha = tl.math.exp2(m_i - m_new)
            rescale = tl.math.exp2(m_tile - m_new) * (1.0 / 448.0)
            l_i = l_i * alpha + tl.sum(p, 1) * rescale
            pv = tl.dot(to_e4m3(p, INTERPRET), v)
            acc = acc * alpha[:, None] + pv * (rescale * tl.load(v_scales + n0 // BLOCK_SIZE))[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:  # a row may have seen nothing yet: keep its max finite so exp2 gives 0, not NaN
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Arguments that follow the prompt's length or the layout's width: not specialised on, so that one compiled kernel
# serves every length and chunk offset (a server would otherwise compile a variant per value class).
_SHAPE_ARGS = ("stride_cb", "stride_ch", "stride_cq", "stride_ib", "stride_ih", "stride_iq", "q_len", "k_len",
               "n_q_tiles", "index_width", "n_key_blocks")


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _block_sparse_attention_kernel(
    Q, K, V, Out, Lse, KeyRange, Counts, Indices, k_desc, v_desc, KScale, VScale, KMean,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq,
    q_heads, kv_heads, q_len, k_len, n_q_tiles, index_width, n_key_blocks,
    qk_scale, softcap_log2, softcap_arg,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DENSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_RANGE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr, KV_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, COUNT_CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr,
    FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One (batch, query head, query tile): prologue (which keys), three calls of the online-softmax
    core (lower boundary, unmasked, upper boundary), epilogue. Long because it is one program's whole
    life; each phase is labelled, and the per-tile work lives in `_attend_tiles`."""
    # -- which (batch, head, query tile). The heads of one KV group are always neighbours (they read the
    # same K/V, so it is fetched once and served from L2), every tile of one (batch, KV head) runs before
    # the next, which keeps that head's K/V in L2 when the layout scatters blocks, and late query tiles,
    # the longest under causal masking, start first.
    pid = tl.program_id(0)
    group = q_heads // kv_heads
    per_kv_head = n_q_tiles * group
    bkv = pid // per_kv_head
    rest = pid % per_kv_head
    q_tile = n_q_tiles - 1 - rest // group
    b = bkv // kv_heads
    kv_head = bkv % kv_heads
    h = kv_head * group + rest % group
    q_offset = k_len - q_len
    row0 = q_tile * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_pos = q_offset + offs_m

    # -- operands. Q's load is issued first, so its latency overlaps the layout row's below ---------
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd)
    q_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    k_head = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    # -- FP8: the query tile to e4m3 with one scale (its largest magnitude to 448), this KV head's block scales,
    # and q . mean(k) per row where the scores or the lse need it back (kernels/fp8.py)
    NEED_BIAS: tl.constexpr = FP8 and (HAS_SOFTCAP or RETURN_LSE)
    q_scale = 1.0
    row_bias = tl.zeros([BLOCK_M], tl.float32)
    k_scales = KScale + (b * kv_heads + kv_head).to(tl.int64) * n_key_blocks
    v_scales = VScale + (b * kv_heads + kv_head).to(tl.int64) * n_key_blocks
    if FP8:
        q_f32 = q.to(tl.float32)
        if NEED_BIAS:
            mean = tl.load(KMean + (b * kv_heads + kv_head).to(tl.int64) * HEAD_DIM + offs_d,
                           mask=offs_d < HEAD_DIM, other=0.0)
            row_bias = tl.sum(q_f32 * mean[None, :], 1)
        q_amax = tl.max(tl.max(tl.abs(q_f32), 1), 0)
        q_scale = tl.where(q_amax > 0, tl.math.div_rn(q_amax, 448.0), 1.0)
        q = to_e4m3(tl.math.div_rn(q_f32, q_scale), INTERPRET)
    v_head = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    # -- keys this tile may see: [key_lo, key_hi), and causally up to each row's position -----------
    key_lo = 0
    key_hi = k_len
    if HAS_KEY_RANGE:
        key_lo = tl.maximum(tl.load(KeyRange + 2 * b), 0)
        key_hi = tl.minimum(tl.load(KeyRange + 2 * b + 1), k_len)
    vis_hi = key_hi  # no key at or past vis_hi is visible to any row of the tile
    full_hi = key_hi  # every key in [key_lo, full_hi) is visible to every row of the tile
    if CAUSAL:
        last_row = tl.minimum(row0 + BLOCK_M, q_len) - 1
        vis_hi = tl.minimum(vis_hi, q_offset + last_row + 1)
        full_hi = tl.minimum(full_hi, q_offset + row0 + 1)

    # -- the layout row, split into [lower boundary | fully visible | upper boundary] positions --------
    layout_row = row0 // BLOCK_SIZE
    if DENSE:
        count = tl.cdiv(k_len, BLOCK_SIZE)
        idx_row = Indices  # unused
    else:
        count = tl.load(Counts + b * stride_cb + h * stride_ch + layout_row * stride_cq)
        idx_row = (Indices + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
                   + layout_row.to(tl.int64) * stride_iq)
    skip_lo, full_lo_pos, full_hi_pos, vis_hi_pos = _count_positions_below(
        idx_row, count, index_width,
        key_lo // BLOCK_SIZE,  # blocks ending at or before key_lo: invisible
        tl.cdiv(key_lo, BLOCK_SIZE),  # blocks starting at or after key_lo may be fully visible ...
        tl.maximum(full_hi, 0) // BLOCK_SIZE,  # ... if they end at or before full_hi
        tl.cdiv(vis_hi, BLOCK_SIZE),  # blocks starting at or after vis_hi: invisible
        DENSE, COUNT_CHUNK)
    full_hi_pos = tl.maximum(full_hi_pos, full_lo_pos)
    vis_hi_pos = tl.maximum(vis_hi_pos, full_hi_pos)
    TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
    # Software pipelining depth of the unmasked loop. Reading the block index costs pipeline stages
    # of its own (Triton 3.6 gives the index -> TMA chain two), so a sparse row gets two more: its
    # K/V tiles then arrive NUM_STAGES - 1 tiles ahead, as on the dense path (checked in the TTGIR:
    # three K/V buffers for NUM_STAGES=3). The masked loops run one or two tiles and get two stages,
    # which keeps 128x128 tiles within shared memory.
    FULL_STAGES: tl.constexpr = NUM_STAGES if DENSE else NUM_STAGES + 2
    MASKED_STAGES: tl.constexpr = 2

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_KEY_RANGE:  # blocks straddling key_lo
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, rows_pos, k_head, v_head, k_desc, v_desc, b, kv_head,
            stride_kn, stride_kd, stride_vn, stride_vd, idx_row, skip_lo * TILES, full_lo_pos * TILES,
            key_lo, key_hi, k_len, qk_scale, softcap_log2, softcap_arg, q_scale, k_scales, v_scales, row_bias,
            BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, DENSE, CAUSAL, True, HAS_SOFTCAP, KV_TMA, DOT_PRECISION,
            MASKED_STAGES, FP8, INTERPRET)
    acc, l_i, m_i = _attend_tiles(  # fully visible blocks: no mask
        acc, l_i, m_i, q, rows_pos, k_head, v_head, k_desc, v_desc, b, kv_head,
        stride_kn, stride_kd, stride_vn, stride_vd, idx_row, full_lo_pos * TILES, full_hi_pos * TILES,
        key_lo, key_hi, k_len, qk_scale, softcap_log2, softcap_arg, q_scale, k_scales, v_scales, row_bias,
        BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, DENSE, CAUSAL, False, HAS_SOFTCAP, KV_TMA, DOT_PRECISION, FULL_STAGES,
        FP8, INTERPRET)
    acc, l_i, m_i = _attend_tiles(  # the diagonal and the end of the keys
        acc, l_i, m_i, q, rows_pos, k_head, v_head, k_desc, v_desc, b, kv_head,
        stride_kn, stride_kd, stride_vn, stride_vd, idx_row, full_hi_pos * TILES, vis_hi_pos * TILES,
        key_lo, key_hi, k_len, qk_scale, softcap_log2, softcap_arg, q_scale, k_scales, v_scales, row_bias,
        BLOCK_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, DENSE, CAUSAL, True, HAS_SOFTCAP, KV_TMA, DOT_PRECISION, MASKED_STAGES,
        FP8, INTERPRET)

    # -- epilogue: rows that saw no key get 0 and lse -inf ------------------------------------------------
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    if RETURN_LSE:
        lse_log2 = m_i + tl.math.log2(tl.where(seen, l_i, 1.0))
        if FP8 and not HAS_SOFTCAP:  # the row constant smoothing took out of the scores
            lse_log2 += row_bias * qk_scale
        lse = tl.where(seen, lse_log2 / 1.4426950408889634, float("-inf"))
        tl.store(Lse + (b * q_heads + h).to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


# --------------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------------


def _check_kernel_inputs(call: AttentionCall) -> None:
    """Raise a ValueError naming what this kernel cannot run of a (valid) call; the dispatcher never sends
    it those (support.py)."""
    q, k, v = call.q, call.k, call.v
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the Triton kernel takes float16/bfloat16 q, k, v of one dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}. Cast them, or use backend='torch'.")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton kernel takes head_dim in {TRITON_HEAD_DIMS}; got {q.shape[-1]}. "
                         "Use backend='torch'.")
    if call.block_size not in TRITON_BLOCK_SIZES:
        raise ValueError(f"the Triton kernel takes block_size 64 or 128; got {call.block_size}. Use backend='torch'.")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernel needs CUDA tensors (got {q.device}) unless TRITON_INTERPRET=1.")
    if call.layout is not None and call.layout.device != q.device:
        raise ValueError(f"the layout is on {call.layout.device} but q is on {q.device}; move it with layout.to().")


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a unit last stride and positive, 16-byte aligned base and strides."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and (s * size) % 16 == 0 for s in t.stride()[:-1]))


def _kv_operands(k, v, config: KernelConfig, block_d: int, v_transposed: bool = False):
    """What the kernel receives for K and V tile loads: descriptors, pointers, or pointers to build from.
    `v_transposed`: v is a [B, H, L, D] view of [B, H, D, L] storage (the FP8 operands), described as the latter."""
    if config.kv_loads == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        box = [1, 1, config.block_n, block_d]
        k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), box)
        if v_transposed:
            v = v.transpose(-1, -2)
            box = [1, 1, block_d, config.block_n]
        return k_desc, TensorDescriptor(v, list(v.shape), list(v.stride()), box)
    return k, v


def _allocate_outputs(q: torch.Tensor, return_lse: bool):
    """Output in q's layout and dtype, and the lse buffer (the output stands in when not asked for)."""
    out = torch.empty_like(q)
    if not return_lse:
        return out, out
    return out, torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


def triton_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  layout: BlockLayout | None = None, config: KernelConfig | None = None,
                                  attention_dtype: str = "auto", **options):
    """The kernel called on its own (tests, benchmarks):
    `attend(AttentionCall(q, k, v, layout, **options), config, attention_dtype)`.

    Example, one head, 3 blocks of 64, keeping the sink and the diagonal:

        layout = BlockLayout(counts=torch.tensor([[[1, 2, 2]]], dtype=torch.int32, device="cuda"),
                             indices=torch.tensor([[[[0, -1], [0, 1], [0, 2]]]], dtype=torch.int32,
                                                  device="cuda"), block_size=64, num_key_blocks=3)
        out = triton_block_sparse_attention(q, k, v, layout)  # q, k, v [1, 1, 192, 128] on CUDA
    """
    return attend(AttentionCall(q, k, v, layout, **options), config, attention_dtype)


def attend(call: AttentionCall, config: KernelConfig | None = None, attention_dtype: str = "auto"):
    """Block-sparse attention with the Triton kernel; arguments and results as in `call.AttentionCall`.

    q [B, Hq, Lq, D] and k/v [B, Hkv, Lk, D] in float16 or bfloat16, any strides (e.g. the
    [B, H, L, D] transposed views transformers passes); head_dim 64, 80, 96, 128 or 256; a layout of
    block size 64 or 128 (None attends to every block). Returns the output in q's layout, plus the
    natural-log log-sum-exp fp32 [B, Hq, Lq] with `return_lse`. `config` overrides the launch shape
    (benchmarks). `attention_dtype="fp8"` computes both products in e4m3 as `fp8.attend` specifies (Hopper and
    newer, or the interpreter): K and V are quantised by a pre-pass (`triton_fp8.quantize_kv`), Q in the kernel.
    """
    _check_kernel_inputs(call)
    fp8 = attention_dtype == "fp8"
    q, k, v, layout, key_range, block_size = call.q, call.k, call.v, call.layout, call.key_range, call.block_size
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    config = config or default_config(head_dim, block_size, q)
    n_key_blocks = triton.cdiv(k_len, block_size)
    if block_size % config.block_m or block_size % config.block_n:
        raise ValueError(f"{config} does not fit block_size {block_size}: block_m and block_n must divide it.")
    if config.kv_loads not in KV_LOADS:
        raise ValueError(f"KernelConfig.kv_loads must be one of {KV_LOADS}; got {config.kv_loads!r}.")
    operands = quantize_kv(k, v, block_size, key_range) if fp8 else None
    if fp8:
        k, v = operands.k, operands.v
    if config.kv_loads != "pointer" and not (_tma_ready(k) and _tma_ready(v.transpose(-1, -2) if fp8 else v)):
        config = replace(config, kv_loads="pointer")

    scale, softcap = call.softmax_scale, call.softcap
    softcap_log2 = 0.0 if softcap is None else float(softcap) * LOG2E
    softcap_arg = 0.0 if softcap is None else scale / float(softcap)
    block_d = triton.next_power_of_2(head_dim)
    n_q_tiles = triton.cdiv(q_len, config.block_m)

    out, lse = _allocate_outputs(q, call.return_lse)
    if key_range is not None and key_range.dtype != torch.int32:
        key_range = key_range.to(torch.int32)
    key_range_arg = key_range.contiguous() if key_range is not None else out
    if layout is not None:  # a row's block indices are read as one contiguous run
        counts, indices = layout.counts, layout.indices
        if indices.stride(-1) != 1:
            indices = indices.contiguous()
        count_strides, index_strides = counts.stride(), indices.stride()[:3]
    else:
        counts, indices, count_strides, index_strides = out, out, (0, 0, 0), (0, 0, 0)
    k_desc, v_desc = _kv_operands(k, v, config, block_d, v_transposed=fp8)
    scales = (operands.k_scale, operands.v_scale, operands.k_mean) if fp8 else (out, out, out)  # out: unused

    register_cap = {} if config.max_registers is None else {"maxnreg": config.max_registers}
    grid = (n_q_tiles * batch * q_heads,)
    device_context = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device_context:
        _block_sparse_attention_kernel[grid](
            q, k, v, out, lse, key_range_arg, counts, indices, k_desc, v_desc, *scales,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *count_strides, *index_strides,
            q_heads, kv_heads, q_len, k_len, n_q_tiles, indices.shape[-1] if layout is not None else 0, n_key_blocks,
            scale * LOG2E, softcap_log2, softcap_arg,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_SIZE=block_size, DENSE=layout is None, CAUSAL=bool(call.causal), HAS_KEY_RANGE=key_range is not None,
            HAS_SOFTCAP=softcap is not None, RETURN_LSE=call.return_lse, KV_TMA=config.kv_loads == "tma",
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            COUNT_CHUNK=128, NUM_STAGES=config.num_stages, FP8=fp8, INTERPRET=interpreting(),
            num_warps=config.num_warps, num_stages=config.num_stages, **register_cap,
        )
    return (out, lse) if call.return_lse else out
