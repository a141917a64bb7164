"""sparse_attention(): select blocks, then attend to them exactly. The one entry point of the sparse path.

Data flows one way: patches -> attention (here) -> selection (estimate -> budget -> BlockLayout) ->
kernels (attention over a BlockLayout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from . import stats
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
        start = stats.started() if stats.RECORDERS else None
        layout = select_blocks(q, k, config, scale=scale, key_range=key_range, softcap=softcap)
        # Selection ran in q's dtype whatever `attention_dtype` says: only the attention of the kept blocks is FP8.
        out = block_sparse_attention(q, k, v, layout, causal=True, scale=scale, softcap=softcap,
                                     key_range=key_range, backend=config.backend,
                                     attention_dtype=config.attention_dtype)
        if stats.RECORDERS:  # `stats.record()`: what this call kept, left on the device
            stats.note_sparse(q, k, layout, last_chunk, start)
    return (out, layout) if return_layout else out


def warm_up_kernels(q_heads: int, kv_heads: int, head_dim: int, max_len: int,
                    config: SparsePrefillConfig | Mapping | None = None, *, dtype: torch.dtype = torch.bfloat16,
                    device=None, softcap: float | None = None) -> int:
    """Run the sparse path once per kernel variant that prompts of up to `max_len` keys need, so that a server's
    first long requests find every kernel compiled (Triton compiles a variant on its first launch: seconds each on
    a GPU; its disk cache keeps them for later processes). Returns the number of calls made.

    The variants follow no length or offset (tests/test_compiled_variants.py), only the kind of call (a whole
    prompt, a chunk in the middle, a prompt's last chunk) and the width the policy kernels pad a row of key blocks
    to (`fused_policy.padded_row_width`). So: the three kinds at the narrowest width, then a middle and a last chunk
    of two query blocks for each wider one up to `max_len`. q is laid out as transformers' transposed [B, L, H, D]
    projections are; the tensors are random (the compiles do not depend on the values).
    """
    from .selection.fused_policy import padded_row_width  # Triton: only where the kernels run

    config = as_config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    block = config.block_size
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(length: int, heads: int) -> torch.Tensor:
        x = torch.randn(1, length, heads, head_dim, generator=generator, device=device, dtype=torch.float32)
        return x.to(dtype).transpose(1, 2)

    calls = 0
    widths = sorted({padded_row_width(n) for n in range(1, -(-max_len // block) + 1)})
    for width in widths:
        k_len = min(width * block, max_len)
        k, v = rand(k_len, kv_heads), rand(k_len, kv_heads)
        chunk = min(2 * block, k_len)
        kinds = [(chunk, False), (chunk, True)] + ([(k_len, True)] if width == widths[0] else [])
        for q_len, last_chunk in kinds:
            sparse_attention(rand(q_len, q_heads), k, v, config, softcap=softcap, last_chunk=last_chunk)
            calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls
