"""The FP8 kernel's operands: K (smoothed) and V in e4m3 with one scale per (batch, KV head, block), written by a
Triton pre-pass that reads each once. `fp8.quantize_blocks` is its specification: bit for bit under the interpreter
(tested); on a GPU a scale may differ in its last bit, where torch divides by a Python number as a multiplication by
its reciprocal (tests/test_fp8_gpu.py).

`quantize_kv` returns what `triton_attention.attend(..., attention_dtype="fp8")` passes to the attention kernel:

* K minus its mean over the call's valid keys, [B, Hkv, Lk, D] e4m3, and its scales fp32 [B, Hkv, blocks];
* V, not smoothed, stored transposed ([B, Hkv, D, Lk] underneath, handed over as a [B, Hkv, Lk, D] view):
  Hopper's FP8 matrix instructions take both operands with the reduction dimension contiguous, and for P·V that
  is the keys; and its scales;
* the mean, fp32 [B, Hkv, D], which the kernel needs for the scores' row constant (softcap, the lse).

Q is quantised in the attention kernel, which loads each query tile once anyway (`to_e4m3` below).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import fp8
from .interpreter import interpreting

E4M3 = tl.float8e4nv  # torch.float8_e4m3fn: 4 exponent bits, 3 mantissa bits, no infinities, 448 largest


@triton.jit
def to_e4m3(x, INTERPRET: tl.constexpr):
    """x (fp32, already scaled into [-448, 448]) to e4m3, rounded to nearest even, as the GPU's conversion and
    torch's do. Triton's interpreter converts otherwise (100 -> 104, 0.001 -> 0, 500 -> 256), so there x is first
    rounded onto e4m3's grid in fp32 arithmetic (its values convert exactly): the tests then check the kernel's
    rounding as the GPU does it."""
    if INTERPRET:
        a = tl.minimum(tl.abs(x), 448.0)
        e = tl.floor(tl.log2(tl.where(a > 0, a, 1.0)))
        e = tl.where(tl.exp2(e) > a, e - 1.0, e)  # log2 rounded up just below a power of two
        step = tl.exp2(tl.maximum(e, -6.0) - 3.0)  # 3 mantissa bits; below 2^-6 the subnormals' step 2^-9
        a = ((a / step + 8388608.0) - 8388608.0) * step  # 2^23: fp32 addition rounds to nearest even
        x = tl.where(x < 0, -a, a)
    return x.to(E4M3)


# Arguments that follow the length: not specialised on, so that one compiled pre-pass serves every prompt and chunk
_SHAPE_ARGS = ("stride_xb", "stride_xh", "stride_ob", "stride_oh", "stride_od", "length", "n_blocks")


@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _quantize_blocks_kernel(
    X, Mean, Out, Scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    heads, length, n_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SMOOTH: tl.constexpr, TRANSPOSED: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One (block, batch x head): x - mean in fp32, its largest magnitude to 448, rounded to e4m3."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_n = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    inside = (offs_n[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    x_ptrs = (X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
              + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :] * stride_xd)
    x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
    if SMOOTH:
        mean = tl.load(Mean + bh.to(tl.int64) * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        x = tl.where(inside, x - mean[None, :], 0.0)  # padding stays 0, as the reference pads after subtracting
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    data = to_e4m3(tl.math.div_rn(x, scale), INTERPRET)
    out_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if TRANSPOSED:  # [D, L] underneath: write along the keys, which are contiguous there
        o_ptrs = out_base + offs_d[:, None] * stride_od + offs_n[None, :].to(tl.int64) * stride_on
        tl.store(o_ptrs, tl.trans(data), mask=tl.trans(inside))
    else:
        o_ptrs = out_base + offs_n[:, None].to(tl.int64) * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, data, mask=inside)
    tl.store(Scale + bh.to(tl.int64) * n_blocks + block, scale)


def quantize(x: torch.Tensor, block_size: int, mean: torch.Tensor | None = None, transposed: bool = False):
    """`fp8.quantize_blocks(x - mean, block_size)` in one pass over x: (data, scale). x [B, H, L, D] in any float
    dtype and strides; mean fp32 [B, H, D] or None. With `transposed`, data is stored [B, H, D, L] (L padded to
    16 bytes, as tensor-memory loads need) and returned as its [B, H, L, D] view."""
    batch, heads, length, dim = x.shape
    n_blocks = triton.cdiv(length, block_size)
    if transposed:
        store = torch.empty(batch, heads, dim, triton.cdiv(length, 16) * 16, dtype=torch.float8_e4m3fn,
                            device=x.device)
        data = store[..., :length].transpose(-1, -2)
    else:
        data = torch.empty(batch, heads, length, dim, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(batch, heads, n_blocks, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _quantize_blocks_kernel[(n_blocks, batch * heads)](
            x, mean if mean is not None else scale, data, scale, *x.stride(), *data.stride(),
            heads, length, n_blocks, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_SIZE=block_size,
            SMOOTH=mean is not None, TRANSPOSED=transposed, INTERPRET=interpreting(),
            num_warps=4 if block_size * dim <= 8192 else 8)
    return data, scale


@dataclass(frozen=True)
class Fp8KV:
    """K and V as the FP8 kernel reads them (module docstring)."""

    k: torch.Tensor  # e4m3 [B, Hkv, Lk, D], K minus its mean
    k_scale: torch.Tensor  # fp32 [B, Hkv, key blocks]
    v: torch.Tensor  # e4m3 [B, Hkv, Lk, D], a view of [B, Hkv, D, Lk] storage
    v_scale: torch.Tensor  # fp32 [B, Hkv, key blocks]
    k_mean: torch.Tensor  # fp32 [B, Hkv, D]


def quantize_kv(k: torch.Tensor, v: torch.Tensor, block_size: int, key_range: torch.Tensor | None = None) -> Fp8KV:
    """K smoothed by its mean over the valid keys (`fp8.key_mean`) and V, each in e4m3 per (batch, KV head,
    block of `block_size` keys)."""
    mean = fp8.key_mean(k, key_range).squeeze(2).contiguous()
    k8, k_scale = quantize(k, block_size, mean)
    v8, v_scale = quantize(v, block_size, transposed=True)
    return Fp8KV(k8, k_scale, v8, v_scale, mean)
