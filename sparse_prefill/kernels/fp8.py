"""FP8 block-sparse attention in plain PyTorch: the specification of the Triton FP8 kernel (triton_attention.py with
`attention_dtype="fp8"`, its operands from triton_fp8.py), and the path `attention_dtype="fp8"` takes wherever the
reference runs (CPU; `backend="torch"`).

What is quantised, and how (docs/kernel.md, "FP8 attention", has the measured errors):

* Q and K to float8 e4m3 with one fp32 scale per (batch, head, block of `block_size` tokens) -- the layout's
  blocks, so the kernel reads one scale per tile it loads. The scale maps the block's largest magnitude to
  e4m3's largest finite value, 448.
* K is smoothed first: its mean over the call's valid keys (per batch, KV head and channel) is subtracted.
  Trained models' keys carry a large per-channel offset that is the same for every key; left in, it takes most
  of each block's range and leaves few of e4m3's 3 mantissa bits to what tells keys apart. q . mean(k) is one
  constant per query row, so softmax does not change; it is added back to the scores (computed from q in fp32)
  so that softcap, which is not shift-invariant, and the returned lse keep their meaning.
* The first product is fp8 x fp8 with fp32 accumulation, times q_scale * k_scale: here, the product of the
  dequantised values in fp32, the same up to fp32 rounding.
* With `quantize_pv` (what `attention_dtype="fp8"` does): V per (batch, KV head, block) like K, unsmoothed;
  P, in [0, 1], to e4m3 with one scale per (query row, key block) that maps the block's largest probability to
  448. The denominator is the row sum of P before rounding, as the kernel computes it (reading the rounded P back
  costs a conversion per score, and Triton 3.6 miscompiles it on Hopper where the same P feeds the product);
  `rounded_denominator=True` sums the rounded P instead, which makes the output a convex combination of the
  rounded V rows and was measured 1 % more accurate (bench/fp8_error.py). A fixed scale (FlashAttention-3's
  P * 448, `p_scale="fixed"`) rounds probabilities below ~2e-6 of the row's running maximum to zero, and those
  below ~3e-5 to e4m3's coarse subnormals: behind a strong sink that is most of the keys of a long row, and
  together much of its mass (the unrounded denominator still counts it; the numerator loses their values). The
  per-block scale costs the kernel one multiply per row and tile, because the tile's row maximum is already
  computed: P = exp(s - tile max), and its product is rescaled by exp(tile max - running max) as the
  accumulator is.
* fp32 everywhere else; the output in q's dtype.

The selection never runs in FP8 (`SparsePrefillConfig.attention_dtype` says why). This module holds no policy:
which calls go FP8 is kernels/__init__.py's dispatch, on the caller's word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import reference
from .call import AttentionCall

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # e4m3's largest finite value; its smallest normal is 2^-6, its smallest subnormal 2^-9
P_SCALES = ("block", "fixed")


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (fp32, in [-448, 448] after scaling) rounded to the nearest e4m3 value, returned in fp32. The clamp is
    the kernel's saturating conversion (values a rounding step past 448 stay finite)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()


@dataclass(frozen=True)
class Fp8Blocks:
    """A tensor [B, H, L, D] in e4m3 with one fp32 scale per (batch, head, block of `block_size` positions):
    x ~ data * scale. The kernel's operands: what a pre-pass writes and each tile load reads."""

    data: torch.Tensor  # float8_e4m3fn [B, H, L, D]
    scale: torch.Tensor  # fp32 [B, H, ceil(L / block_size)]
    block_size: int

    def dequantize(self, rows: range | None = None) -> torch.Tensor:
        """data * scale in fp32 for positions `rows` (default all): [B, H, len(rows), D]."""
        rows = rows if rows is not None else range(self.data.shape[2])
        blocks = torch.arange(rows.start, rows.stop, device=self.data.device) // self.block_size
        return self.data[:, :, rows.start:rows.stop].float() * self.scale[:, :, blocks, None]


def quantize_blocks(x: torch.Tensor, block_size: int) -> Fp8Blocks:
    """x [B, H, L, D] in e4m3, scaled per (batch, head, block of `block_size` positions along L) so that the
    block's largest magnitude becomes 448. An all-zero block gets scale 1. A last, partial block is scaled by
    the positions it has."""
    batch, heads, length, dim = x.shape
    n_blocks = -(-length // block_size)
    padded = F.pad(x.float(), (0, 0, 0, n_blocks * block_size - length))  # zeros leave a block's amax alone
    blocks = padded.view(batch, heads, n_blocks, block_size, dim)
    amax = blocks.abs().amax(dim=(-1, -2))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    data = round_e4m3(blocks / scale[..., None, None]).to(E4M3).view(batch, heads, n_blocks * block_size, dim)
    return Fp8Blocks(data[:, :, :length], scale, block_size)


def key_mean(k: torch.Tensor, key_range: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [B, Hkv, 1, D]: k's mean over each batch row's valid keys (all, or key_range's [start, end)), the
    offset smoothing removes. Padding keys would pull it towards whatever they hold; a row without valid keys
    gets 0 (its queries see no key anyway)."""
    if key_range is None:  # one read of K in its own dtype, summed in fp32
        return k.mean(2, dtype=torch.float32, keepdim=True)
    keys = k.float()
    positions = torch.arange(k.shape[2], device=k.device)
    inside = (positions >= key_range[:, :1]) & (positions < key_range[:, 1:])  # [B, Lk]
    count = inside.sum(-1).clamp_min(1).to(torch.float32)
    return (keys * inside[:, None, :, None]).sum(2, keepdim=True) / count[:, None, None, None]


def quantize_probabilities(p: torch.Tensor, block_size: int, p_scale: str = "block") -> torch.Tensor:
    """p (fp32 [..., cols], in [0, 1]; its first column starts a key block) rounded as the second product takes
    it: with `p_scale="block"` each (row, key block) scaled so its largest value becomes 448, with "fixed" all of
    it by 448. Returned in fp32 at p's scale."""
    if p_scale == "fixed":
        return round_e4m3(p * E4M3_MAX) / E4M3_MAX
    cols = p.shape[-1]
    n_blocks = -(-cols // block_size)
    blocks = F.pad(p, (0, n_blocks * block_size - cols)).unflatten(-1, (n_blocks, block_size))
    top = blocks.amax(-1, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))
    rounded = round_e4m3(blocks / top * E4M3_MAX) * (top / E4M3_MAX)
    return rounded.flatten(-2)[..., :cols]


def attend(call: AttentionCall, *, smooth_k: bool = True, quantize_pv: bool = True, p_scale: str = "block",
           rounded_denominator: bool = False):
    """`reference.attend` with the products in FP8 (module docstring): same arguments, masking and results.

    `smooth_k` subtracts K's mean before quantising it; `quantize_pv` rounds P and V to e4m3 for the second
    product (False keeps it at the inputs' precision, fp32 arithmetic: the first product alone in FP8);
    `p_scale` is how P is scaled for that ("block" or "fixed"); `rounded_denominator` divides by the rounded P's
    row sum instead of P's. The defaults are `attention_dtype="fp8"`, and what the Triton FP8 kernel computes.
    """
    if p_scale not in P_SCALES:
        raise ValueError(f"p_scale must be one of {P_SCALES}; got {p_scale!r}.")
    q, k, v, block_size = call.q, call.k, call.v, call.block_size
    group = q.shape[1] // k.shape[1]
    scale = call.softmax_scale
    mean = key_mean(k, call.key_range) if smooth_k else None
    q8 = quantize_blocks(q, block_size)
    k8 = quantize_blocks(k.float() - mean if smooth_k else k, block_size)
    v8 = quantize_blocks(v, block_size) if quantize_pv else None
    # scale * q . mean(k) per query row: what smoothing took out of every score of the row, put back exactly.
    row_bias = scale * (q.float() @ mean.repeat_interleave(group, dim=1).transpose(-1, -2)) if smooth_k else None

    def scores(q_rows: range, k_cols: range) -> torch.Tensor:
        keys = k8.dequantize(k_cols).repeat_interleave(group, dim=1)
        s = (q8.dequantize(q_rows) * scale) @ keys.transpose(-1, -2)
        return s if row_bias is None else s + row_bias[:, :, q_rows.start:q_rows.stop]

    def values(k_cols: range) -> torch.Tensor:
        x = v8.dequantize(k_cols) if quantize_pv else v[:, :, k_cols.start:k_cols.stop].float()
        return x.repeat_interleave(group, dim=1)

    def weights(p: torch.Tensor, k_cols: range) -> torch.Tensor:
        return quantize_probabilities(p, block_size, p_scale)

    # Chunks of whole blocks, so that each key block's P is scaled over the whole block in one step.
    chunk = max(reference._CHUNK // block_size, 1) * block_size
    return reference.online_softmax(call, scores, values, weights if quantize_pv else None, chunk,
                                    unweighted_denominator=not rounded_denominator)
