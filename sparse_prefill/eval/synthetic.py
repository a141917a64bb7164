"""A synthetic attention problem with the structure of real attention, for the demo on a machine without a
trained model: what the block selection keeps, and what it captures, against the exact per-row oracle.

Queries and keys are built so that their softmax attention has what trained models' attention has:
  * a sink: the first tokens draw mass from every query;
  * local decay: rotary-style position dimensions make each query prefer nearby keys, with the diagonal
    "slash" lines that rotary embeddings give;
  * needles: a few short key spans that later queries read (the question at the end reads every needle, and
    a "mention" some hundred tokens after each needle reads that needle again);
  * heads of different sharpness: each head's queries are scaled by its own temperature, so sharp heads put
    their mass on a few blocks and flat heads spread it.
Everything is seeded; nothing is learned or downloaded. demo.py scores the selection on it with recall.py's
exact block mass, captured mass and oracle, as it scores a trained model's layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHARPNESS = (1.6, 1.2, 0.8, 0.5)  # one temperature per query head: sharp to flat
KV_HEADS = 2
HEAD_DIM = 64
NEEDLE_TOKENS = 48
NEEDLE_DEPTHS = (0.2, 0.49, 0.76)
QUESTION_TOKENS = 256  # the last queries: they read every needle
MENTION = (600, 100)  # (offset after its needle, tokens): queries that read one needle again
# Logit of each part at temperature 1: a query's own position, the sink, a needle for its readers; noise std.
LOCAL, SINK, NEEDLE, NOISE = 12.0, 8.0, 10.0, 0.65


@dataclass(frozen=True)
class Problem:
    """q [1, Hq, L, D] and k [1, Hkv, L, D] (fp32, scale 1/sqrt(D)); each needle's key span and reader rows."""

    q: torch.Tensor
    k: torch.Tensor
    needles: tuple[tuple[int, int], ...]  # (first key, end) of each needle
    readers: tuple[tuple[tuple[int, int], ...], ...]  # per needle: (first query, end) of the rows that read it
    sharpness: tuple[float, ...]

    @property
    def length(self) -> int:
        return self.q.shape[2]

    def reads(self, block_size: int) -> torch.Tensor:
        """bool [Qb, Kb]: the (query block, key block) pairs where a needle's readers meet its keys."""
        n = -(-self.length // block_size)
        out = torch.zeros(n, n, dtype=torch.bool)
        for (k0, k1), rows in zip(self.needles, self.readers, strict=True):
            for r0, r1 in rows:
                out[r0 // block_size:-(-r1 // block_size), k0 // block_size:-(-k1 // block_size)] = True
        return out


def make_problem(length: int = 4096, sharpness=SHARPNESS, seed: int = 0) -> Problem:
    """The synthetic problem of `length` tokens (at least 1024): one query head per `sharpness` value."""
    if length < 1024:
        raise ValueError(f"the synthetic problem needs at least 1024 tokens (its needles and question); got {length}.")
    g = torch.Generator().manual_seed(seed)
    hq, d = len(sharpness), HEAD_DIM
    q, k = torch.zeros(1, hq, length, d), torch.zeros(1, KV_HEADS, length, d)
    # dims 0-31: rotary position, 16 periods from 6 to 512 tokens; q_i . k_j = LOCAL * mean_f cos(w_f (i - j))
    freqs = 2 * math.pi / torch.exp(torch.linspace(math.log(6), math.log(512), 16))
    angle = torch.arange(length)[:, None] * freqs[None]
    rotary = torch.cat([angle.cos(), angle.sin()], -1) / math.sqrt(16)
    q[..., :32], k[..., :32] = rotary * LOCAL, rotary
    q[..., 32], k[..., :4, 32] = SINK, 1.0  # dim 32: the sink, the first 4 keys
    needles, readers = [], []
    for n, depth in enumerate(NEEDLE_DEPTHS):  # dims 33-35: one per needle
        start = int(depth * length) // 16 * 16
        mention = (start + MENTION[0], start + MENTION[0] + MENTION[1])
        rows = (mention, (length - QUESTION_TOKENS, length)) if mention[1] < length - QUESTION_TOKENS else (
            (length - QUESTION_TOKENS, length),)
        k[..., start:start + NEEDLE_TOKENS, 33 + n] = 1.0
        for r0, r1 in rows:
            q[..., r0:r1, 33 + n] = NEEDLE
        needles.append((start, start + NEEDLE_TOKENS))
        readers.append(rows)
    noise = math.sqrt(NOISE / math.sqrt(d - 36))  # dims 36-63: q . k noise of std NOISE
    q[..., 36:] = torch.randn(1, hq, length, d - 36, generator=g) * noise
    k[..., 36:] = torch.randn(1, KV_HEADS, length, d - 36, generator=g) * noise
    q = q * torch.tensor(sharpness).view(1, hq, 1, 1) * math.sqrt(d)  # undo the 1/sqrt(D) scale
    return Problem(q, k, tuple(needles), tuple(readers), tuple(sharpness))

