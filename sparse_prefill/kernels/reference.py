"""Block-sparse attention in plain PyTorch: the specification of the Triton kernel and the CPU path.

Exact softmax attention restricted to a `BlockLayout`, computed with an online softmax over key
chunks so that long sequences never need an [Lq, Lk] score matrix. The arguments and their
conventions are those of every attention function of the package: `call.AttentionCall`.
"""

from __future__ import annotations

import math

import torch

from ..layout import BlockLayout
from .call import AttentionCall

_CHUNK = 1024  # query rows and key columns per step: O(B*H*_CHUNK^2) floats of working memory


def token_mask(
    layout: BlockLayout | None,
    block_mask: torch.Tensor | None,
    q_rows: range,
    k_cols: range,
    q_len: int,
    k_len: int,
    causal: bool,
    key_range: torch.Tensor | None,
    batch: int,
    heads: int,
    device,
) -> torch.Tensor:
    """Bool mask [B, H, len(q_rows), len(k_cols)]: block layout & causality & key range."""
    rows = torch.arange(q_rows.start, q_rows.stop, device=device)
    cols = torch.arange(k_cols.start, k_cols.stop, device=device)
    mask = torch.ones(batch, heads, len(rows), len(cols), dtype=torch.bool, device=device)
    if block_mask is not None:
        bs = layout.block_size
        mask &= block_mask[:, :, rows // bs][:, :, :, cols // bs]
    if causal:
        mask &= (cols[None, :] <= rows[:, None] + (k_len - q_len))
    if key_range is not None:
        kr = key_range.to(device)
        inside = (cols[None, :] >= kr[:, :1]) & (cols[None, :] < kr[:, 1:])
        mask &= inside[:, None, None, :]
    return mask


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     layout: BlockLayout | None = None, **options):
    """The reference called on its own (tests, benchmarks): `attend(AttentionCall(q, k, v, layout, **options))`."""
    return attend(AttentionCall(q, k, v, layout, **options))


def attend(call: AttentionCall):
    """Attention of q over the key blocks `call.layout` keeps (all keys when it is None).

    Returns the output [B, Hq, Lq, D] in q's dtype, and with `return_lse` also the natural-log
    log-sum-exp of each row's scores, fp32 [B, Hq, Lq].
    """
    q, k, v = call.q, call.k, call.v
    group = q.shape[1] // k.shape[1]
    scale = call.softmax_scale

    def scores(q_rows: range, k_cols: range) -> torch.Tensor:
        keys = k[:, :, k_cols.start:k_cols.stop].float().repeat_interleave(group, dim=1)
        return (q[:, :, q_rows.start:q_rows.stop].float() * scale) @ keys.transpose(-1, -2)

    def values(k_cols: range) -> torch.Tensor:
        return v[:, :, k_cols.start:k_cols.stop].float().repeat_interleave(group, dim=1)

    return online_softmax(call, scores, values)


def online_softmax(call: AttentionCall, scores, values, weights=None, chunk: int | None = None,
                   unweighted_denominator: bool = False):
    """The reference's one online-softmax loop, over chunks of `chunk` query rows and key columns (default
    `_CHUNK`), with the arithmetic of the two products left to its caller (`attend` here, `fp8.attend`):

        scores(q_rows, k_cols) -> fp32 [B, Hq, rows, cols], the scaled scores before softcap and mask;
        values(k_cols) -> fp32 [B, Hq, cols, D], the values those columns contribute (per query head);
        weights(p, k_cols) -> p as the second product takes it (None: as computed), for p in [0, 1]
            relative to the row's running maximum; the row sums of what it returns are the denominator, or with
            `unweighted_denominator` those of p as computed.

    Masking (layout, causality, key range), softcap and the empty-row rules (zero output, -inf lse) are this
    loop's, so every arithmetic shares them. Returns what `attend` returns.
    """
    q, k, layout, softcap = call.q, call.k, call.layout, call.softcap
    batch, hq, q_len, dim = q.shape
    k_len = k.shape[2]
    chunk = chunk or _CHUNK
    block_mask = None if layout is None else layout.to_mask().to(q.device)

    out = torch.empty(batch, hq, q_len, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, q_len, dtype=torch.float32, device=q.device)
    for q0 in range(0, q_len, chunk):
        q1 = min(q0 + chunk, q_len)
        m = torch.full((batch, hq, q1 - q0), -math.inf, device=q.device)
        denom = torch.zeros(batch, hq, q1 - q0, device=q.device)
        acc = torch.zeros(batch, hq, q1 - q0, dim, device=q.device)
        k_stop = min(k_len, q1 + k_len - q_len) if call.causal else k_len
        for k0 in range(0, k_stop, chunk):
            k1 = min(k0 + chunk, k_stop)
            mask = token_mask(layout, block_mask, range(q0, q1), range(k0, k1), q_len, k_len, call.causal,
                              call.key_range, batch, hq, q.device)
            if not mask.any():
                continue
            s = scores(range(q0, q1), range(k0, k1))
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe[..., None])
            row_sum = p.sum(-1)
            if weights is not None:
                p = weights(p, range(k0, k1))
                row_sum = row_sum if unweighted_denominator else p.sum(-1)
            alpha = torch.exp(m - safe)
            denom = denom * alpha + row_sum
            acc = acc * alpha[..., None] + p @ values(range(k0, k1))
            m = m_new
        empty = denom == 0
        out[:, :, q0:q1] = torch.where(empty[..., None], torch.zeros_like(acc), acc / denom.clamp_min(1e-30)[..., None])
        lse[:, :, q0:q1] = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(denom.clamp_min(1e-30)))
    out = out.to(q.dtype)
    return (out, lse) if call.return_lse else out
