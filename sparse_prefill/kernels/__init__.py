"""Attention over a BlockLayout: the Triton kernel on CUDA, the PyTorch reference elsewhere.

`block_sparse_attention` is the one dispatch point: it states the call once (`call.AttentionCall`, which
validates it) and hands it to the implementation `backend` picks: "auto" takes Triton for fp16/bf16
CUDA tensors the kernel supports (`support.py`), the reference otherwise. `attention_dtype` picks the
arithmetic of that implementation: "fp8" runs the FP8 reference (`fp8.py`) where the reference runs, and
where Triton runs, the FP8 kernel on Hopper and newer (`triton_attention.attend(..., attention_dtype="fp8")`)
or, on an older GPU, the fp16/bf16 kernel, warned once. This package is the attention mechanism only: it
imports nothing of the selection policy.
"""

from __future__ import annotations

import torch

from ..layout import BlockLayout
from ..notices import warn_once
from . import fp8, reference
from .call import AttentionCall
from .interpreter import fix_interpreter_scalars
from .support import ATTENTION_DTYPES, fp8_triton_supports, triton_supports

fix_interpreter_scalars()  # interpreted kernels on Triton 3.4-3.6 with numpy >= 2.4 (interpreter.py)


def use_triton(q: torch.Tensor, block_size: int, backend: str) -> bool:
    """Resolve `backend` for these inputs; raise when "triton" is forced but cannot run."""
    if backend == "torch":
        return False
    reason = triton_supports(q, block_size)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run: {reason}. Use backend='auto' or 'torch'.")
    return reason is None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    causal: bool = True,
    return_lse: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    key_range: torch.Tensor | None = None,
    backend: str = "auto",
    attention_dtype: str = "auto",
):
    """Exact softmax attention of q over the key blocks `layout` keeps (None = every block).

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]; the queries are the last Lq positions. Returns the output
    in q's layout and dtype, plus the fp32 log-sum-exp [B, Hq, Lq] with `return_lse`. See
    `kernels/call.py` for the exact semantics of every argument. `attention_dtype="fp8"` computes both
    products in float8 e4m3 with per-block scales (`fp8.py`; the module docstring says where it runs).
    """
    if attention_dtype not in ATTENTION_DTYPES:
        raise ValueError(f"attention_dtype must be one of {ATTENTION_DTYPES}; got {attention_dtype!r}.")
    call = AttentionCall(q, k, v, layout, causal, return_lse, scale, softcap, key_range)
    triton = use_triton(q, call.block_size, backend)
    if attention_dtype == "fp8":
        if not triton:  # the reference's FP8 twin: slow, exactly the kernel's specification
            return fp8.attend(call)
        reason = fp8_triton_supports(q, call.block_size)
        if reason is not None:
            warn_once(f"attention_dtype='fp8' runs in {str(q.dtype).removeprefix('torch.')} here: {reason}.")
            attention_dtype = "auto"
    if triton:
        from . import triton_attention

        return triton_attention.attend(call, attention_dtype=attention_dtype)
    return reference.attend(call)


__all__ = ["AttentionCall", "block_sparse_attention", "fp8_triton_supports", "triton_supports", "use_triton"]
