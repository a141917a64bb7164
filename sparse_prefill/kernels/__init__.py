"""Attention over a BlockLayout: the Triton kernel on CUDA, the PyTorch reference elsewhere.

`block_sparse_attention` is the one dispatch point; `backend` picks the implementation:
"auto" takes Triton for fp16/bf16 CUDA tensors the kernel supports (`support.py`), the reference
otherwise. This package is the attention mechanism only: it imports nothing of the selection policy.
"""

from __future__ import annotations

import torch

from ..layout import BlockLayout
from .interpreter import fix_interpreter_scalars
from .reference import block_sparse_attention_reference, check_attention_inputs
from .support import triton_supports

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
):
    """Exact softmax attention of q over the key blocks `layout` keeps (None = every block).

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]; the queries are the last Lq positions. Returns the output
    in q's layout and dtype, plus the fp32 log-sum-exp [B, Hq, Lq] with `return_lse`. See
    `kernels/reference.py` for the exact semantics of every argument.
    """
    check_attention_inputs(q, k, v)
    block_size = 128 if layout is None else layout.block_size
    if use_triton(q, block_size, backend):
        from .triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, layout, causal=causal, return_lse=return_lse, scale=scale,
                                             softcap=softcap, key_range=key_range)
    return block_sparse_attention_reference(q, k, v, layout, causal=causal, return_lse=return_lse, scale=scale,
                                            softcap=softcap, key_range=key_range)


__all__ = ["block_sparse_attention", "triton_supports", "use_triton"]
