"""Inputs whose attention has structure, for tests where the selection policy must decide something.

Random q and k attend almost uniformly: covering any gamma of that keeps nearly every block, and no rule
of the policy has anything to choose. These inputs have what a trained model's attention over a prompt
has, so that coverage, the per-head correction and every structural keep change the layout.
"""

import torch


def _unit(g: torch.Generator, dim: int) -> torch.Tensor:
    x = torch.randn(dim, generator=g)
    return x / x.norm()


def structured_qk(batch=1, q_heads=2, kv_heads=1, q_len=768, k_len=768, dim=32, seed=0, sharpness=(1.0, 0.1)):
    """q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] (fp32; the queries are the last Lq of Lk positions) with:

    * a sink: the first 4 keys, which every query reads;
    * recency: each query reads the ~48 keys before it (positions are smoothed noise, so q_i . k_j decays
      with |i - j|);
    * two spans of 24 keys that every later query reads;
    * four 3-key needles that only the last 48 queries (a question) read: the estimate, which averages
      `stride` keys into one, sees them faintly and the exact last-block attention fully, so the exact
      last block needs more blocks than the estimate says (the per-head correction, rule 2) and has
      blocks the other rows do not keep (the question columns, rule 5);
    * heads that differ: query head h reads all of that with strength `sharpness[h % len(sharpness)]`:
      1.0 is sharp (a few blocks hold its mass), 0.1 nearly uniform (it needs almost every block).
    """
    g = torch.Generator().manual_seed(seed)
    offset = k_len - q_len
    recency = torch.randn(k_len + 48, dim, generator=g).unfold(0, 48, 1)[:k_len].mean(-1)
    recency = recency / recency.norm(dim=-1, keepdim=True)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g) * 0.1 + recency * 3
    q = torch.randn(batch, q_heads, q_len, dim, generator=g) * 0.1
    strength = torch.tensor(sharpness, dtype=torch.float32).repeat(q_heads)[:q_heads, None, None]
    q += recency[offset:] * 2 * (1.2 - strength)
    sink = _unit(g, dim)
    k[:, :, :4] += sink * 5
    q += sink * 2 * strength
    for where in (0.3, 0.65):  # spans every later query reads
        start = int(where * k_len)
        topic = _unit(g, dim)
        k[:, :, start:start + 24] += topic * 5
        q[:, :, max(start + 24 - offset, 0):] += topic * 2.5 * strength
    for where in (0.12, 0.45, 0.55, 0.85):  # needles only the question reads
        start = int(where * k_len)
        topic = _unit(g, dim)
        k[:, :, start:start + 3] += topic * 8
        q[:, :, -48:] += topic * 3 * strength
    return q * (3 * strength + 0.2), k


def with_key_offset(k: torch.Tensor, size: float = 2.0, seed: int = 1) -> torch.Tensor:
    """k plus one offset per (KV head, channel) that every key shares, N(0, size^2): trained models' keys sit
    far from zero in some channels, whatever the token (what FP8's key smoothing removes). With the default
    size the offset is several times the spread of `structured_qk`'s keys."""
    g = torch.Generator().manual_seed(seed)
    return k + torch.randn(1, k.shape[1], 1, k.shape[-1], generator=g) * size


def sink_row(k_len: int, q_len: int = 128, dim: int = 64, gap: float = 12.5, seed: int = 0):
    """q [1, 1, q_len, D], k [1, 1, k_len, D] (fp32): every query scores key 0 about `gap` above all other keys
    (natural-log units, after the 1/sqrt(D) scale), which score about alike. Behind such a sink each other key
    holds ~exp(-gap) of the sink's probability, and a long row holds many of them (k_len * exp(-gap) of the
    sink's mass together): the probabilities that a fixed FP8 scale for P flushes to zero."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, q_len, dim, generator=g) * 0.1
    k = torch.randn(1, 1, k_len, dim, generator=g) * 0.1
    direction = torch.randn(dim, generator=g)
    direction = direction / direction.norm()
    reach = (gap * dim ** 0.5) ** 0.5  # q . k_0 = reach^2 = gap * sqrt(D)
    return q + direction * reach, torch.cat([k[:, :, :1] + direction * reach, k[:, :, 1:]], dim=2)


def exact_attention(q, k, v, layout=None, key_range=None, rows: int = 256) -> torch.Tensor:
    """Causal attention in float64 over the keys `layout` keeps (None: all), `rows` queries at a time: the
    truth the fp32, bf16 and FP8 paths are measured against. Softmax scale 1/sqrt(D); rows without keys give 0."""
    from sparse_prefill.kernels.reference import token_mask

    batch, heads, q_len, dim = q.shape
    k_len, group = k.shape[2], heads // k.shape[1]
    keys = k.double().repeat_interleave(group, 1)
    values = v.double().repeat_interleave(group, 1)
    block_mask = None if layout is None else layout.to_mask()
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        mask = token_mask(layout, block_mask, range(start, stop), range(k_len), q_len, k_len, True, key_range,
                          batch, heads, q.device)
        s = (q[:, :, start:stop].double() @ keys.transpose(-1, -2)) / dim ** 0.5
        p = torch.softmax(s.masked_fill(~mask, -float("inf")), -1).nan_to_num(0.0)
        out[:, :, start:stop] = p @ values
    return out
