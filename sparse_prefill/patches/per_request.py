"""One request at a time, whatever the engine: the rules and pieces every glue shares.

Serving engines (transformers' continuous batching, vLLM) hand the attention several requests at once. The
library's answer is the same for all of them: each request long enough for the sparse path is selected and
attended as its own sequence by `sparse_attention` (the one core), every other request runs the engine's own
attention. The engine glue (`transformers_attention.py`, `packed.py`, `vllm/`) reads its engine's metadata into
`PackedRequests` and asks the questions here; nothing in this module knows an engine.

The rules, each stated once for every engine:
- `call_reason`: may this attention call go sparse at all, and if not, why (a reason string, or None);
- `PackedRequests.sparse` (`goes_sparse`): which of its requests do;
- `warm_up_layer`: which kernel variants a layer's prompts will need, compiled once per shape.

Tensor parallelism puts a slice of each layer's heads on every GPU: `rank_config` gives the config a slice
runs with, `check_proxy_heads` refuses up front a `proxy_heads` that a slice cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import sparse_attention, warm_up_kernels
from ..config import SparsePrefillConfig
from ..kernels import triton_supports
from ..notices import warn_once
from ..selection.estimate import num_proxies

WINDOWED = "sliding-window layers (they keep their exact windowed attention)"


def too_short_for_sparse(q_len: int, k_len: int, config: SparsePrefillConfig) -> bool:
    """Decode steps and prompts below the length threshold stay dense (the selection would not pay)."""
    return q_len < config.block_size or k_len < config.effective_min_seq_len


def goes_sparse(q_len: int, k_len: int, config: SparsePrefillConfig, window: int | None = None) -> bool:
    """Whether one request (q_len queries, the last of its k_len keys) takes the sparse path: a block of queries,
    at least `min_seq_len` keys, and, in a sliding-window layer, no key outside the window (a window of at least
    k_len keys hides none of them, so that request's attention is plain causal attention)."""
    return not too_short_for_sparse(q_len, k_len, config) and (window is None or k_len <= window)


def short_reason(q_len: int, config: SparsePrefillConfig) -> str:
    """Why a request `too_short_for_sparse` stays dense, for `stats`."""
    if q_len < config.block_size:
        return f"fewer queries than a block ({config.block_size}): a short prompt's end or a small chunk"
    return f"prompts shorter than min_seq_len ({config.effective_min_seq_len} keys): the selection would not pay"


def request_reason(q_len: int, k_len: int, config: SparsePrefillConfig, window: int | None = None) -> str | None:
    """Why one request of a call that may go sparse stays dense (`goes_sparse`), or None."""
    if too_short_for_sparse(q_len, k_len, config):
        return short_reason(q_len, config)
    return WINDOWED if window is not None and k_len > window else None


def capturing(query: torch.Tensor | None) -> bool:
    """Whether this CUDA query's stream is being captured into a CUDA graph."""
    cuda = query is not None and query.is_cuda and torch.cuda.is_available()
    return cuda and torch.cuda.is_current_stream_capturing()


def call_reason(query: torch.Tensor | None, config: SparsePrefillConfig, *, not_causal: str | None = None,
                window: int | None = None, max_keys: int | None = None, lacks: tuple[str, ...] = ()) -> str | None:
    """Why no request of this attention call may go sparse, or None: the one rule every engine asks.

    `not_causal`: what the call is when it is not causal self-attention (None: it is); `window`: the layer's sliding
    window in keys (None: none), which rules the call out unless it holds at most `window` keys in all
    (`max_keys`; None: unknown, so a windowed call is ruled out; per request: `goes_sparse`); `lacks`: what the
    call uses that the sparse path does not do, named for the user (the first is said). A call being captured
    into a CUDA graph cannot go sparse (the selection reads request lengths on the host), nor can a query the
    Triton kernels do not take where the backend is theirs to pick. `query` None: what a layer is, asked before any
    call (no device question; a probe tensor made then may land on the engine's default device).
    """
    if not_causal is not None:
        return not_causal
    if window is not None and (max_keys is None or max_keys > window):
        return WINDOWED
    if lacks:
        return lacks[0]
    if capturing(query):
        return ("a prefill captured in a CUDA graph (selection reads the request lengths on the host); turn graphs "
                "off for the prefill path, e.g. ContinuousBatchingConfig(use_cuda_graph=(False, True))")
    if query is not None and query.is_cuda and config.backend == "auto":
        return triton_supports(query, config.block_size)
    return None


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

    def sparse(self, config: SparsePrefillConfig, window: int | None = None) -> tuple[bool, ...]:
        """Which requests take the sparse path (`goes_sparse`): a block of queries, at least `min_seq_len` keys,
        and in a windowed layer no more keys than the window.

        The keys count what the cache already held, so a prefill chunk after a prefix-cache hit (few new
        queries over a long cached prefix) goes sparse when it has a block of queries, like any later chunk.
        """
        return tuple(goes_sparse(qe - qs, ke - ks, config, window)
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


def warm_up_layer(q_heads: int, kv_heads: int, head_dim: int, max_len: int, config: SparsePrefillConfig, *,
                  dtype: torch.dtype, device, softcap: float | None, done: set) -> int:
    """Compile the kernel variants one layer's prompts of up to `max_len` keys need (`attention.warm_up_kernels`),
    unless a layer of the same shape was warmed up already (`done` holds the shapes seen; this adds to it) or the
    layer runs no Triton kernel (backend "torch", a dtype, head_dim or device the kernels do not take). `q_heads`
    and `kv_heads` are the heads this GPU attends (its share under tensor parallelism). Returns the calls made."""
    probe = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
    shape = (q_heads, kv_heads, head_dim, dtype, str(device), config, softcap, max_len)
    if max_len <= 0 or shape in done or config.backend == "torch" or triton_supports(probe, config.block_size):
        return 0
    done.add(shape)
    return warm_up_kernels(q_heads, kv_heads, head_dim, max_len, config, dtype=dtype, device=device, softcap=softcap)
