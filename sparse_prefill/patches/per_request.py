"""One request at a time, whatever the engine: the pieces every serving glue shares.

Serving engines (transformers' continuous batching, vLLM) hand the attention several requests at once. The
library's answer is the same for all of them: each request long enough for the sparse path is selected and
attended as its own sequence by `sparse_attention` (the one core), every other request runs the engine's own
attention. The engine glue (`packed.py`, `vllm/`) reads its engine's metadata into `PackedRequests` and uses
what is here; nothing in this module knows an engine.

Tensor parallelism puts a slice of each layer's heads on every GPU: `rank_config` gives the config a slice
runs with, `check_proxy_heads` refuses up front a `proxy_heads` that a slice cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import sparse_attention
from ..config import SparsePrefillConfig
from ..notices import warn_once
from ..selection.estimate import num_proxies


def too_short_for_sparse(q_len: int, k_len: int, config: SparsePrefillConfig) -> bool:
    """Decode steps and prompts below the length threshold stay dense (the selection would not pay)."""
    return q_len < config.block_size or k_len < config.effective_min_seq_len


@dataclass(frozen=True)
class PackedRequests:
    """The requests of one engine call, as host ints read once per forward.

    q_bounds: each request's [start, end) in the packed queries.
    k_bounds: each request's [start, end) in the keys the engine hands over: one packed tensor (transformers),
        or the request's own keys read from a paged cache (vLLM), where start is 0 and end its sequence length.
        A request's queries are the last of its keys (a prefill chunk continues what the cache holds).
    last_chunk: whether each request's queries end its prompt (its last query gives a token).
    """

    q_bounds: tuple[tuple[int, int], ...]
    k_bounds: tuple[tuple[int, int], ...]
    last_chunk: tuple[bool, ...]

    def sparse(self, config: SparsePrefillConfig) -> tuple[bool, ...]:
        """Which requests take the sparse path: those with a block of queries and at least `min_seq_len` keys.

        The keys count what the cache already held, so a prefill chunk after a prefix-cache hit (few new
        queries over a long cached prefix) goes sparse when it has a block of queries, like any later chunk.
        """
        return tuple(not too_short_for_sparse(qe - qs, ke - ks, config)
                     for (qs, qe), (ks, ke) in zip(self.q_bounds, self.k_bounds, strict=True))


def attend_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SparsePrefillConfig, *,
                 scale: float | None, softcap: float | None, last_chunk: bool) -> torch.Tensor | None:
    """One request's sparse attention q [1, Hq, Lq, D] over k/v [1, Hkv, Lk, D] -> [1, Hq, Lq, D], or None when
    it failed (out of memory, a Triton kernel this GPU cannot compile or hold, ...): the caller then runs the
    engine's attention for it. A failing request must not stop the engine, which would fail every request in
    flight; it is said once."""
    try:
        return sparse_attention(q, k, v, config, scale=scale, softcap=softcap, last_chunk=last_chunk)
    except Exception as err:  # Triton's errors are no RuntimeError
        warn_failed(err)
        return None


def warn_failed(err: Exception, what: str = "a request") -> None:
    """Say once that `what` the sparse path failed on (`err`) runs the engine's attention instead (the one wording
    the tests turn into an error: pyproject.toml)."""
    warn_dense(f"{what} the sparse path failed on ({type(err).__name__}: {err})")


def warn_dense(reason: str) -> None:
    """Say once that the engine's dense attention ran for `reason`."""
    warn_once(f"sparse_prefill: dense attention used for {reason}.", stacklevel=4)


def rank_config(config: SparsePrefillConfig, local_heads: int, total_heads: int) -> SparsePrefillConfig:
    """The config for a call that sees `local_heads` of a layer's `total_heads` query heads (tensor parallelism
    puts a slice of the heads on each GPU). "q" and "kv" mean the same on a slice; an int number of proxies is
    for the whole layer, so each slice gets its share of them (`check_proxy_heads` made sure it is whole)."""
    if not isinstance(config.proxy_heads, int) or local_heads == total_heads or total_heads % local_heads:
        return config
    return config.replace(proxy_heads=max(1, config.proxy_heads * local_heads // total_heads))


def check_proxy_heads(config: SparsePrefillConfig, q_heads: int, kv_heads: int, shards: int = 1) -> None:
    """Raise a ValueError saying what fits when `config.proxy_heads` does not fit a layer of `q_heads` query and
    `kv_heads` KV heads split over `shards` GPUs (each GPU's slice runs its share of an int number of proxies,
    which must pool the heads it would pool on one GPU)."""
    num_proxies(q_heads, kv_heads, config.proxy_heads)
    if isinstance(config.proxy_heads, int) and shards > 1:
        if config.proxy_heads % shards or kv_heads % shards:
            raise ValueError(f"proxy_heads={config.proxy_heads} pools heads that tensor parallelism puts "
                             f"on {shards} GPUs: use \"q\", \"kv\" or a multiple of {shards}")
        num_proxies(q_heads // shards, kv_heads // shards, config.proxy_heads // shards)
