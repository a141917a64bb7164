"""Block selection: which key blocks each (head, query block) keeps. Estimate -> budget -> BlockLayout.

    estimate.py      proxy heads and pooled tokens -> block scores      (plain PyTorch: the specification)
    budget.py        block scores -> which blocks each row keeps         (plain PyTorch: the specification)
    fused.py         the estimate and the exact last-block attention as Triton kernels
    fused_policy.py  the budget policy as Triton kernels that write the BlockLayout

`select_blocks` is the one dispatch point between the two implementations of the same policy; tests
run both on the same inputs (tests/test_selection.py). The policy itself is described in budget.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import SparsePrefillConfig, as_config
from ..kernels.support import SELECTION_DTYPES, head_dim_supported
from ..layout import BlockLayout, causal_layout
from ..notices import warn_once
from .budget import choose_blocks, last_block_mass
from .estimate import estimate_block_scores


def fused_selection_supports(q: torch.Tensor) -> str | None:
    """None when the fused (Triton) selection can run on these queries, else the reason it cannot."""
    if not q.is_cuda:
        return f"tensors are on {q.device.type}, the fused selection needs CUDA"
    if not head_dim_supported(q.shape[-1]):
        return f"head_dim {q.shape[-1]} (see sparse_prefill.kernels.support for the supported ones)"
    return None


def use_fused_selection(q: torch.Tensor, backend: str) -> bool:
    """Resolve `config.backend` for the selection: "auto" fuses fp16/bf16 CUDA inputs, "triton" any
    CUDA input it can (raising when it cannot), "torch" never."""
    if backend == "torch":
        return False
    reason = fused_selection_supports(q)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot select blocks: {reason}. Use backend='auto' or 'torch'.")
    return reason is None and (backend == "triton" or q.dtype in SELECTION_DTYPES)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    config: SparsePrefillConfig | Mapping | None = None,
    scale: float | None = None,
    key_range: torch.Tensor | None = None,
    softcap: float | None = None,
) -> BlockLayout:
    """The BlockLayout the sparse path uses for q [B, Hq, Lq, D] over k [B, Hkv, Lk, D].

    `scale`, `key_range` and `softcap` mean what they mean for the attention (kernels/reference.py):
    the selection measures coverage on the same distribution the attention computes.
    """
    config = as_config(config)
    if config.gamma >= 1:  # every causal block: nothing to estimate
        return causal_layout(q.shape[0], q.shape[1], q.shape[2], k.shape[2], config.block_size, q.device)
    if use_fused_selection(q, config.backend):
        return select_blocks_fused(q, k, config, scale, key_range, softcap)
    if q.is_cuda and config.backend == "auto":
        warn_once(f"sparse_prefill: the plain-PyTorch block selection runs for {fused_selection_supports(q) or q.dtype}"
                  "; on a GPU it is slower than dense attention.")
    return select_blocks_reference(q, k, config, scale, key_range, softcap)


def select_blocks_reference(q, k, config: SparsePrefillConfig, scale=None, key_range=None, softcap=None) -> BlockLayout:
    """The specification: estimate.py, then budget.py, in plain PyTorch (any device and dtype)."""
    scores = estimate_block_scores(q, k, config, scale, key_range, softcap)
    last_mass = last_block_mass(q, k, config, scale, key_range, softcap)
    mask = choose_blocks(scores, last_mass, config, q.shape[2], k.shape[2])
    return BlockLayout.from_mask(mask, config.block_size, max_count=mask.shape[-1])


def select_blocks_fused(q, k, config: SparsePrefillConfig, scale=None, key_range=None, softcap=None) -> BlockLayout:
    """The same policy in Triton: fused.py's estimate and last-block attention, fused_policy.py's policy."""
    from .fused import estimate_block_scores_fused, last_block_mass_fused
    from .fused_policy import choose_blocks_fused

    scores = estimate_block_scores_fused(q, k, config, scale, key_range, softcap)
    last_mass = last_block_mass_fused(q, k, config, scale, key_range, softcap)
    return choose_blocks_fused(scores, last_mass, config, q.shape[2], k.shape[2])


__all__ = ["fused_selection_supports", "select_blocks", "select_blocks_fused", "select_blocks_reference",
           "use_fused_selection"]
