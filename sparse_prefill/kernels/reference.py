"""Block-sparse attention in plain PyTorch: the specification of the Triton kernel and the CPU path.

Exact softmax attention restricted to a `BlockLayout`, computed with an online softmax over key
chunks so that long sequences never need an [Lq, Lk] score matrix.

Conventions (shared with every attention function of the package):
    q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], Hq a multiple of Hkv (GQA: query head h reads KV
    head h // (Hq // Hkv)); the queries are the last Lq of the Lk positions; output like q.
    `key_range` (int [B, 2], optional) bounds the valid keys of each batch row to [start, end), which
    is how left or right padding reaches the attention. A query row that may see no key gets a zero
    output and a log-sum-exp of -inf.
"""

from __future__ import annotations

import math

import torch

from ..layout import BlockLayout

_CHUNK = 1024  # query rows and key columns per step: O(B*H*_CHUNK^2) floats of working memory


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


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | None,
    causal: bool = True,
    return_lse: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    key_range: torch.Tensor | None = None,
):
    """Attention of q over the key blocks `layout` keeps (all keys when `layout` is None).

    Returns the output [B, Hq, Lq, D] in q's dtype, and with `return_lse` also the natural-log
    log-sum-exp of each row's scores, fp32 [B, Hq, Lq].
    """
    check_attention_inputs(q, k, v)
    check_key_range(key_range, q)
    batch, hq, q_len, dim = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    block_mask = None
    if layout is not None:
        if layout.counts.shape != (batch, hq, -(-q_len // layout.block_size)):
            raise ValueError(f"{layout} does not fit q of shape {tuple(q.shape)}.")
        block_mask = layout.to_mask().to(q.device)

    out = torch.empty(batch, hq, q_len, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, q_len, dtype=torch.float32, device=q.device)
    for q0 in range(0, q_len, _CHUNK):
        q1 = min(q0 + _CHUNK, q_len)
        qc = q[:, :, q0:q1].float() * scale
        m = torch.full((batch, hq, q1 - q0), -math.inf, device=q.device)
        denom = torch.zeros(batch, hq, q1 - q0, device=q.device)
        acc = torch.zeros(batch, hq, q1 - q0, dim, device=q.device)
        k_stop = min(k_len, q1 + k_len - q_len) if causal else k_len
        for k0 in range(0, k_stop, _CHUNK):
            k1 = min(k0 + _CHUNK, k_stop)
            mask = token_mask(layout, block_mask, range(q0, q1), range(k0, k1), q_len, k_len, causal,
                              key_range, batch, hq, q.device)
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
    return (out, lse) if return_lse else out
