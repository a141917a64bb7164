"""sparse_attention(): select blocks, then attend to them exactly. The one entry point of the sparse path.

Data flows one way: patches -> attention (here) -> selection (estimate -> budget -> BlockLayout) ->
kernels (attention over a BlockLayout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from .config import SparsePrefillConfig, as_config
from .kernels import block_sparse_attention
from .kernels.call import check_attention_inputs, check_key_range
from .layout import BlockLayout
from .selection import select_blocks


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SparsePrefillConfig | Mapping | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    key_range: torch.Tensor | None = None,
    last_chunk: bool = True,
    return_layout: bool = False,
):
    """Causal block-sparse attention: choose blocks for q over k, then attend to them exactly.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (heads before length; Hq a multiple of Hkv; the queries are
    the last Lq positions). `config` is a SparsePrefillConfig or a dict of its fields. `last_chunk=False`
    says the prompt goes on after these queries (a prefill chunk): its exact tail and question columns
    (`exact_tail_tokens`, `question_blocks`) are for the prompt's last queries, so this chunk skips them.
    Returns the output [B, Hq, Lq, D], and the BlockLayout with `return_layout`.
    """
    config = as_config(config)
    if not last_chunk:
        config = config.replace(exact_tail_tokens=0, question_blocks=0)
    check_attention_inputs(q, k, v)
    check_key_range(key_range, q)
    if q.shape[2] == 0:  # no query: nothing to select or attend
        empty = torch.zeros(*q.shape[:2], 0, -(-k.shape[2] // config.block_size), dtype=torch.bool, device=q.device)
        layout = BlockLayout.from_mask(empty, config.block_size, max_count=0)
        return (q.new_zeros(q.shape), layout) if return_layout else q.new_zeros(q.shape)
    # Under a device_map the current CUDA device is not q's: every launch below must go to q's device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        layout = select_blocks(q, k, config, scale=scale, key_range=key_range, softcap=softcap)
        out = block_sparse_attention(q, k, v, layout, causal=True, scale=scale, softcap=softcap,
                                     key_range=key_range, backend=config.backend)
    return (out, layout) if return_layout else out
