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
