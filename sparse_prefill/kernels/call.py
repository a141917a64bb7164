"""AttentionCall: one block-sparse attention call, stated and validated once for every backend.

Conventions shared by every attention function of the package:
    q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], Hq a multiple of Hkv (GQA: query head h reads KV
    head h // (Hq // Hkv)); the queries are the last Lq of the Lk positions; output like q.
    `layout` (a BlockLayout, or None for every block) names the key blocks each (head, query block)
    attends to; `causal` masks keys after each query's position.
    `key_range` (int [B, 2], optional) bounds the valid keys of each batch row to [start, end), which
    is how left or right padding reaches the attention. A query row that may see no key gets a zero
    output and a log-sum-exp of -inf.
    `scale` multiplies the scores (None: 1/sqrt(D)); `softcap` caps them to softcap * tanh(s / softcap)
    (Gemma 2); `return_lse` also returns the natural-log log-sum-exp of each row, fp32 [B, Hq, Lq].

`block_sparse_attention` (kernels/__init__.py) builds the call, which validates it; each backend takes
the call (`reference.attend`, `triton_attention.attend`) and checks only what it alone cannot run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import BlockLayout

_LAYOUT_HINT = ("expected q [B, Hq, Lq, D] and k, v [B, Hkv, Lk, D], heads before length (a [B, L, H, D] tensor, "
                "as a model's projections give it, needs .transpose(1, 2))")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a ValueError naming the problem when q, k, v break the shared conventions."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: "
                         f"{_LAYOUT_HINT}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share batch and head_dim; got {tuple(q.shape)} and {tuple(k.shape)}: "
                         f"{_LAYOUT_HINT}.")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads (dim 1 of q: {q.shape[1]}) must be a multiple of key/value heads (dim 1 of k: "
                         f"{k.shape[1]}); got q {tuple(q.shape)}, k {tuple(k.shape)}: {_LAYOUT_HINT}.")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries (dim 2 of q: {q.shape[2]}) than keys (dim 2 of k: {k.shape[2]}): queries are "
                         f"the last keys' positions; got q {tuple(q.shape)}, k {tuple(k.shape)}: {_LAYOUT_HINT}.")
    if not (q.dtype.is_floating_point and k.dtype.is_floating_point and v.dtype.is_floating_point):
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}.")


def check_key_range(key_range: torch.Tensor | None, q: torch.Tensor) -> None:
    """Raise a ValueError unless key_range is None or an integer tensor [B, 2] on q's device."""
    if key_range is None:
        return
    if not isinstance(key_range, torch.Tensor) or key_range.dtype.is_floating_point or key_range.dtype == torch.bool:
        got = key_range.dtype if isinstance(key_range, torch.Tensor) else type(key_range).__name__
        raise ValueError(f"key_range must be an integer tensor [B, 2] of (start, end) per row; got {got}.")
    if tuple(key_range.shape) != (q.shape[0], 2):
        raise ValueError(f"key_range must have shape [B, 2] = [{q.shape[0]}, 2]; got {tuple(key_range.shape)}.")
    if key_range.device != q.device:
        raise ValueError(f"key_range is on {key_range.device} but q is on {q.device}; move it with .to().")


@dataclass(frozen=True)
class AttentionCall:
    """The arguments of one attention call (module docstring), validated when it is built."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: BlockLayout | None = None
    causal: bool = True
    return_lse: bool = False
    scale: float | None = None
    softcap: float | None = None
    key_range: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_attention_inputs(self.q, self.k, self.v)
        check_key_range(self.key_range, self.q)
        if self.layout is not None:
            batch, heads, q_len = self.q.shape[:3]
            n_q_blocks = -(-q_len // self.layout.block_size)
            if tuple(self.layout.counts.shape) != (batch, heads, n_q_blocks):
                raise ValueError(f"{self.layout} does not fit q of shape {tuple(self.q.shape)}: counts must be "
                                 f"[{batch}, {heads}, {n_q_blocks}].")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive (or None for 1/sqrt(head_dim)); got {self.scale}.")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be positive (or None); got {self.softcap}.")

    @property
    def block_size(self) -> int:
        """The layout's block size; 128 when every block is attended (layout None)."""
        return 128 if self.layout is None else self.layout.block_size

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.q.shape[-1]) if self.scale is None else float(self.scale)
