"""Sparse prefill of a padded batch: each row exactly as if it ran alone.

Padding shifts a row's tokens against the block grid (left padding) and puts pad tokens among the
queries (right padding), so selecting blocks for the padded batch as a whole would give each row a
different layout than running it alone would. Instead each row's real keys and queries are cut out
and run as a batch of one: same blocks, same budget, same result as the unpadded prompt, and a row
too short for the sparse path is attended densely, as it would be alone. Pad queries get a zero
output (no real query reads them). The loop is over batch rows only; the ranges are host ints read
once per mask, so it adds no host synchronisation.
"""

from __future__ import annotations

import torch

from .. import stats
from ..attention import sparse_attention
from ..config import SparsePrefillConfig
from ..kernels import block_sparse_attention
from .per_request import short_reason, too_short_for_sparse


def attend_rows_alone(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: tuple[tuple[int, int], ...],
    config: SparsePrefillConfig,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of query [B, Hq, Lq, D] over key/value [B, Hkv, Lk, D] whose row b has real keys
    [rows[b][0], rows[b][1]); the queries are the last Lq positions. Returns [B, Hq, Lq, D]."""
    q_len, k_len = query.shape[2], key.shape[2]
    offset = k_len - q_len  # absolute position of query row 0
    out = torch.zeros_like(query)
    for b, (start, end) in enumerate(rows):
        first, stop = max(start - offset, 0), end - offset  # this row's real query rows
        if stop <= first:
            continue
        q_row, k_row, v_row = query[b:b + 1, :, first:stop], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end]
        if too_short_for_sparse(stop - first, end - start, config):
            if stats.RECORDERS:
                stats.note_dense(None, stop - first, end - start, short_reason(stop - first, config))
            out_row = block_sparse_attention(q_row, k_row, v_row, None, causal=True, scale=scale, softcap=softcap,
                                             backend=config.backend)
        else:
            out_row = sparse_attention(q_row, k_row, v_row, config, scale=scale, softcap=softcap)
        out[b:b + 1, :, first:stop] = out_row
    return out
