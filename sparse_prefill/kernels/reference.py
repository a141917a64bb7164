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
    q, k, v, layout, softcap = call.q, call.k, call.v, call.layout, call.softcap
    batch, hq, q_len, dim = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = call.softmax_scale
    block_mask = None if layout is None else layout.to_mask().to(q.device)

    out = torch.empty(batch, hq, q_len, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, q_len, dtype=torch.float32, device=q.device)
    for q0 in range(0, q_len, _CHUNK):
        q1 = min(q0 + _CHUNK, q_len)
        qc = q[:, :, q0:q1].float() * scale
        m = torch.full((batch, hq, q1 - q0), -math.inf, device=q.device)
        denom = torch.zeros(batch, hq, q1 - q0, device=q.device)
        acc = torch.zeros(batch, hq, q1 - q0, dim, device=q.device)
        k_stop = min(k_len, q1 + k_len - q_len) if call.causal else k_len
        for k0 in range(0, k_stop, _CHUNK):
            k1 = min(k0 + _CHUNK, k_stop)
            mask = token_mask(layout, block_mask, range(q0, q1), range(k0, k1), q_len, k_len, call.causal,
                              call.key_range, batch, hq, q.device)
            if not mask.any():
                continue
            kc = k[:, :, k0:k1].float().repeat_interleave(group, dim=1)
            vc = v[:, :, k0:k1].float().repeat_interleave(group, dim=1)
            s = qc @ kc.transpose(-1, -2)
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe[..., None])
            alpha = torch.exp(m - safe)
            denom = denom * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vc
            m = m_new
        empty = denom == 0
        out[:, :, q0:q1] = torch.where(empty[..., None], torch.zeros_like(acc), acc / denom.clamp_min(1e-30)[..., None])
        lse[:, :, q0:q1] = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(denom.clamp_min(1e-30)))
    out = out.to(q.dtype)
    return (out, lse) if call.return_lse else out
