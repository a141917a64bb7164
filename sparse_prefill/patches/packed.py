"""Packed calls of continuous batching: several requests in one row, each selected and attended alone.

transformers' continuous batching (`generate_batch`, `transformers serve`) hands the attention one row of
packed queries q [1, Hq, Tq, D] and the keys its paged cache read back, k/v [1, Hkv, Tk, D]; request i owns
queries [cu_seq_lens_q[i], cu_seq_lens_q[i+1]) and keys [cu_seq_lens_k[i], cu_seq_lens_k[i+1]), and its
queries are the last of its keys (a prefill chunk continues what the cache holds of its prompt). sdpa and
eager also get a block-diagonal causal mask [.., Tq, Tk]; flash attention gets the lengths alone.

Each request long enough for the sparse path is selected and attended as its own sequence, exactly as if it
ran alone. Every other request (decode steps, short prompts) runs the engine's own attention function on its
own slice of the call: what it would compute if that request were alone in the batch. So no request's output
depends on which others share its batch, and a batch with no long request goes to the engine untouched.

A prefill chunk whose prompt goes on in a later batch is no prompt end: it skips the exact tail and the
question columns, which belong to the prompt's last queries (`sparse_attention(last_chunk=False)`). A
request's last chunk is the one whose last query gives a token (`logits_indices` holds that position).

transformers >= 5.24 hands over keys already read back from its paged cache. Older versions pass the cache
instead (a `cache` argument) and let the attention function write this call's keys into it and read every
request's keys back (`cache.update`). For those, when the call holds a long request, the wrapper makes that
same update itself, once, and goes on as on 5.24 (`attend_updating_cache`); the engine's function then gets the
keys already read, through a stand-in cache for the functions that insist on one (`_KeysReadBack`). A call with no
long request goes to the engine untouched, update included.

A request the sparse path fails on (out of memory, say) runs densely with one warning rather than stopping the
engine, which would fail every request in flight.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from ..config import SparsePrefillConfig
from .masks import remembered
from .per_request import PackedRequests, attend_alone, too_short_for_sparse, warn_dense, warn_failed


def read_packed(kwargs: dict, q_len: int, k_len: int) -> tuple[PackedRequests | None, str | None]:
    """(PackedRequests, None) from a continuous-batching call's arguments, or (None, why they do not fit)."""
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
    if not isinstance(cu_k, torch.Tensor) or cu_q.dim() != 1 or cu_k.dim() != 1 or cu_q.numel() != cu_k.numel():
        return None, "packed sequences without matching `cu_seq_lens_q` and `cu_seq_lens_k`"
    logits = kwargs.get("logits_indices")
    key = ("packed", q_len, k_len, kwargs.get("max_length_q"), kwargs.get("max_length_k"))
    return remembered(cu_q, key, lambda: _read(cu_q, cu_k, logits, q_len, k_len))


def _read(cu_q, cu_k, logits, q_len, k_len) -> tuple[PackedRequests | None, str | None]:
    n = cu_q.numel()
    parts = [cu_q, cu_k.to(cu_q.device)]
    if isinstance(logits, torch.Tensor) and logits.dim() == 1:
        parts.append(logits.to(cu_q.device))
    values = torch.cat([p.to(torch.int64) for p in parts]).tolist()  # one host synchronisation
    q_edges, k_edges, token_rows = values[:n], values[n:2 * n], values[2 * n:]
    q_bounds = tuple(zip(q_edges[:-1], q_edges[1:], strict=True))
    k_bounds = tuple(zip(k_edges[:-1], k_edges[1:], strict=True))
    fits = (q_edges[0] == 0 == k_edges[0] and q_edges[-1] <= q_len and k_edges[-1] <= k_len
            and all(0 <= qe - qs <= ke - ks for (qs, qe), (ks, ke) in zip(q_bounds, k_bounds, strict=True)))
    if not fits:
        return None, (f"packed sequence lengths that do not fit the call (cu_seq_lens_q={q_edges}, "
                      f"cu_seq_lens_k={k_edges} for {q_len} queries and {k_len} keys)")
    rows = set(token_rows)
    last = tuple(not token_rows or end - 1 in rows for _, end in q_bounds)  # no logits_indices: assume the end
    return PackedRequests(q_bounds, k_bounds, last), None


def attend_packed(dense: Callable, module, query, key, value, attention_mask, dropout, scaling, kwargs: dict,
                  config: SparsePrefillConfig) -> torch.Tensor | None:
    """The output [1, Tq, Hq, D] of a packed call with each request attended alone (module docstring), or None
    when the whole call should go to the engine's `dense` function unchanged: also when this glue fails on the
    call, which must not stop the engine (every request in flight would fail); it is said once."""
    try:
        return _attend_packed(dense, module, query, key, value, attention_mask, dropout, scaling, kwargs, config)
    except Exception as err:
        warn_failed(err, "a packed call")
        return None


def _attend_packed(dense, module, query, key, value, attention_mask, dropout, scaling, kwargs, config):
    if kwargs.get("cache") is not None:
        return attend_updating_cache(dense, module, query, key, value, attention_mask, dropout, scaling, kwargs,
                                     config)
    if _engine_call_as_is(query, kwargs, config):
        return None
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        warn_dense("a prefill captured in a CUDA graph (selection reads the request lengths on the host); turn "
                   "graphs off for the prefill path, e.g. ContinuousBatchingConfig(use_cuda_graph=(False, True))")
        return None
    requests, reason = read_packed(kwargs, query.shape[2], key.shape[2])
    if reason is not None:
        warn_dense(reason)
        return None
    long = requests.sparse(config)
    if not any(long):
        return None

    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    # Long requests first: their kernels fill the GPU's queue while the host prepares the short requests' calls.
    order = sorted(range(len(long)), key=lambda i: not long[i])
    for i in order:
        (qs, qe), (ks, ke) = requests.q_bounds[i], requests.k_bounds[i]
        if qe == qs:
            continue
        q, k, v = query[:, :, qs:qe], key[:, :, ks:ke], value[:, :, ks:ke]
        if long[i]:
            attended = attend_alone(q, k, v, config, scale=scaling, softcap=kwargs.get("softcap"),
                                    last_chunk=requests.last_chunk[i])
            if attended is not None:  # None: it failed (out of memory, say) and runs dense instead
                out[:, qs:qe] = attended.transpose(1, 2)
                continue
        own = _one_request_kwargs(kwargs, i, (qs, qe), (ks, ke), query.shape[2])
        mask = attention_mask
        if isinstance(mask, torch.Tensor) and tuple(mask.shape[-2:]) == (query.shape[2], key.shape[2]):
            mask = _aligned_rows(mask[..., qs:qe, ks:ke])
        # The engine's kernels get this request as a batch of it alone would hand them: fresh tensors laid out
        # like the projections' [1, L, H, D], a mask whose rows start 16-byte aligned (a view starting mid-row
        # made cuDNN's attention fail with a misaligned address on an H200).
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        out[:, qs:qe] = dense(module, q, k, v, mask, dropout=dropout, scaling=scaling, **own)[0]
    return out


def attend_updating_cache(dense: Callable, module, query, key, value, attention_mask, dropout, scaling,
                          kwargs: dict, config: SparsePrefillConfig) -> torch.Tensor | None:
    """`attend_packed` for transformers < 5.24, whose attention function gets this call's new keys and the paged
    cache (`kwargs["cache"]`) and updates the cache itself. With a long request in the call, the cache is updated
    here, as the engine's function would have done it, and the call goes on with the keys read back; otherwise
    None: the engine's call unchanged. Once the cache is updated the call is answered here, densely if need be."""
    cache = kwargs["cache"]
    if getattr(module, "sliding_window", None) or _engine_call_as_is(query, kwargs, config):
        return None  # a windowed layer keeps its exact windowed attention
    update = getattr(cache, "update", None)
    if not callable(update) or getattr(module, "layer_idx", None) is None:
        warn_dense(f"continuous batching with a paged cache ({type(cache).__name__}) sparse_prefill cannot update "
                   "(transformers >= 5.24 hands the attention keys already read from its cache)")
        return None
    own = {name: item for name, item in kwargs.items() if name != "cache"}
    flat = not _updates_kwargs(type(cache))
    if not flat:  # 5.19-5.23: `own` gets this layer's lengths in place
        key, value = update(key, value, module.layer_idx, kwargs=own)
    else:  # 5.0-5.18: keys [L, Hkv, D] read through per-layer-group indices; lengths keyed by layer type
        key, value = update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                            read_index=own["read_index"], write_index=own["write_index"])
        key, value = key.transpose(0, 1).unsqueeze(0), value.transpose(0, 1).unsqueeze(0)
        for name in ("cu_seq_lens_k", "max_seqlen_k", "max_length_k"):
            if isinstance(own.get(name), dict):
                own[name] = own[name]["full_attention"]

    def dense_after(module, q, k, v, mask, **rest):
        return dense(module, q, k, v, mask, cache=_KeysReadBack(k, v, flat), **rest)

    if isinstance(attention_mask, dict):
        attention_mask = attention_mask["full_attention"]
    out = attend_packed(dense_after, module, query, key, value, attention_mask, dropout, scaling, own, config)
    if out is None:  # the cache holds this call's keys now (whatever failed): the engine's attention over them
        out = dense_after(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **own)[0]
    return out


@functools.cache
def _updates_kwargs(cache_type: type) -> bool:
    """Whether this paged cache's `update` takes the call's kwargs (5.19-5.23) rather than read and write indices
    (5.0-5.18): read once per cache type, not in every layer's call."""
    return "kwargs" in inspect.signature(cache_type.update).parameters


class _KeysReadBack:
    """A paged cache already updated for this call, for the engine's functions that insist on one (5.18's
    `paged|sdpa`, `paged|eager` before 5.24; sdpa and flash of 5.19-5.23 ignore a cache that is no
    PagedAttentionCache): its `update` hands back the keys and values the wrapper read, laid out as the real
    one's: [L, Hkv, D] before 5.19 (`flat`), [1, Hkv, L, D] after."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, flat: bool = True):
        self.key, self.value, self.flat = key, value, flat

    def update(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.flat:
            return self.key, self.value
        return self.key[0].transpose(0, 1), self.value[0].transpose(0, 1)


def _engine_call_as_is(query: torch.Tensor, kwargs: dict, config: SparsePrefillConfig) -> bool:
    """Whether the call goes to the engine without a look at its requests: the decode fast path (a block table),
    a batch that is no single packed row, or longest lengths that rule every request out (nothing to read)."""
    return kwargs.get("block_table") is not None or query.shape[0] != 1 or _no_long_request(kwargs, config)


def _no_long_request(kwargs: dict, config: SparsePrefillConfig) -> bool:
    """Whether the longest lengths the engine passes (`max_length_*`; `max_seqlen_*` before 5.19, per layer type
    where a model mixes them) already rule the sparse path out for every request of the call."""
    lengths = []
    for names in (("max_length_q", "max_seqlen_q"), ("max_length_k", "max_seqlen_k")):
        found = next((kwargs[name] for name in names if kwargs.get(name) is not None), None)
        if isinstance(found, dict):
            found = max(found.values(), default=None)
        lengths.append(found)
    return all(isinstance(n, int) for n in lengths) and too_short_for_sparse(*lengths, config)


def _aligned_rows(mask: torch.Tensor) -> torch.Tensor:
    """A copy of `mask` whose rows start on 16-byte boundaries (the row stride padded), as the engine's own masks
    are: slices of a buffer as wide as its cache."""
    width = -(-mask.shape[-1] * mask.element_size() // 16) * 16 // mask.element_size()
    buffer = mask.new_empty(*mask.shape[:-1], width)
    buffer[..., :mask.shape[-1]] = mask
    return buffer[..., :mask.shape[-1]]


def _one_request_kwargs(kwargs: dict, i: int, q_bounds, k_bounds, q_len: int) -> dict:
    """The engine's arguments for request `i` alone: its own lengths and positions. The lengths are cut from the
    call's own device tensors: a tensor built from host values would be a copy to the GPU that waits for every
    kernel queued before it, once per request and layer, leaving the GPU idle while the next launch is prepared."""
    (qs, qe), (ks, ke) = q_bounds, k_bounds
    own = dict(kwargs)
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        edges = kwargs[name]
        own[name] = edges[i:i + 2] - edges[i]
    own["max_length_q"], own["max_length_k"] = qe - qs, ke - ks
    if "max_seqlen_q" in kwargs:  # the names before transformers 5.19
        own["max_seqlen_q"], own["max_seqlen_k"] = qe - qs, ke - ks
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[-1] == q_len:
        own["position_ids"] = positions[:, qs:qe]
    return own
