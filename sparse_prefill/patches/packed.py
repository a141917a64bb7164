"""Packed calls of continuous batching: each long request selected and attended alone, the rest in one engine call.

transformers' continuous batching (`generate_batch`, `transformers serve`) hands the attention one row of
packed queries q [1, Hq, Tq, D] and the keys its paged cache read back, k/v [1, Hkv, Tk, D]; request i owns
queries [cu_seq_lens_q[i], cu_seq_lens_q[i+1]) and keys [cu_seq_lens_k[i], cu_seq_lens_k[i+1]), and its
queries are the last of its keys (a prefill chunk continues what the cache holds of its prompt). sdpa and
eager also get a block-diagonal causal mask [.., Tq, Tk]; flash attention gets the lengths alone.

Each request long enough for the sparse path (`per_request.goes_sparse`) is selected and attended as its own
sequence, exactly as if it ran alone. All the other requests (decode steps, short prompts) run the engine's own
attention function in ONE call over a pack of them alone: their queries, their keys, their rows and columns of
the mask and their lengths, gathered from the call (`ShortPack`). That is the engine's computation for them,
without the long requests' rows. A call with no long request goes to the engine untouched.

What a pack holds is the same for every layer of one forward, so it is read once (`PackPlan`, remembered on the
call's `cu_seq_lens_q`, `masks.remembered`), index tensors included: a layer then launches the long requests'
kernels, three gathers, one engine call and one scatter, with no host synchronisation.

A prefill chunk whose prompt goes on in a later batch is no prompt end: it skips the exact tail and the
question columns, which belong to the prompt's last queries (`sparse_attention(last_chunk=False)`). A
request's last chunk is the one whose last query gives a token (`logits_indices` holds that position).

transformers >= 5.24 hands over keys already read back from its paged cache. Older versions pass the cache
instead (a `cache` argument) and let the attention function write this call's keys into it and read every
request's keys back (`cache.update`). For those, when the call may hold a long request, the wrapper makes that
same update itself, once, and goes on as on 5.24 (`attend_updating_cache`); the engine's function then gets the
keys already read, through a stand-in cache for the functions that insist on one (`_KeysReadBack`). A call with
no long request goes to the engine untouched, update included.

A request the sparse path fails on (out of memory, say) runs densely with one warning rather than stopping the
engine, which would fail every request in flight.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable

import torch

from .. import stats
from ..config import SparsePrefillConfig
from .masks import remembered
from .per_request import (
    PackedRequests,
    attend_alone,
    request_reason,
    short_reason,
    too_short_for_sparse,
    warn_dense,
    warn_failed,
)


@dataclasses.dataclass(frozen=True)
class EngineCall:
    """One call of an engine's attention function, as continuous batching made it, and that function (`dense`)."""

    dense: Callable
    module: torch.nn.Module
    query: torch.Tensor  # [1, Hq, Tq, D]
    key: torch.Tensor  # [1, Hkv, Tk, D]: every request's keys (5.24), or this call's new keys (< 5.24, `cache`)
    value: torch.Tensor
    mask: torch.Tensor | dict | None
    dropout: float
    scaling: float | None
    kwargs: dict  # the engine's other arguments: lengths, positions, logits_indices, the cache before 5.24

    @property
    def window(self) -> int | None:
        """The layer's sliding window in keys, None for none: a call argument (Mistral passes it only so), else
        the module's own attribute."""
        window = self.kwargs.get("sliding_window")
        return getattr(self.module, "sliding_window", None) if window is None else window

    def run_dense(self, **changes) -> torch.Tensor:
        """The engine's output [1, Tq, Hq, D] for this call, with `changes` to its tensors or arguments."""
        call = dataclasses.replace(self, **{k: v for k, v in changes.items() if k != "kwargs"})
        kwargs = changes.get("kwargs", self.kwargs)
        return call.dense(call.module, call.query, call.key, call.value, call.mask, dropout=call.dropout,
                          scaling=call.scaling, **kwargs)[0]


@dataclasses.dataclass(frozen=True)
class ShortPack:
    """The requests of a pack that run the engine's attention, as one pack of their own (device tensors)."""

    q_rows: torch.Tensor  # int64: their query rows in the call, in order
    k_rows: torch.Tensor  # int64: their key rows
    kwargs: dict  # their cu_seq_lens_q/k (from 0), max lengths, positions: what the engine's call takes


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """What one forward's packs hold, read once for every layer: the requests, which go sparse, the short pack."""

    requests: PackedRequests
    sparse: tuple[bool, ...]
    short: ShortPack | None  # None: no request runs the engine's attention


def read_packed(kwargs: dict, q_len: int, k_len: int, reader=None) -> tuple[PackedRequests | None, str | None]:
    """(PackedRequests, None) from a continuous-batching call's arguments, or (None, why they do not fit); read
    once per forward (`reader`: the calling module, see `masks.remembered`)."""
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
    if not isinstance(cu_k, torch.Tensor) or cu_q.dim() != 1 or cu_k.dim() != 1 or cu_q.numel() != cu_k.numel():
        return None, "packed sequences without matching `cu_seq_lens_q` and `cu_seq_lens_k`"
    logits = kwargs.get("logits_indices")
    key = ("packed", q_len, k_len, kwargs.get("max_length_q"), kwargs.get("max_length_k"))
    return remembered(cu_q, key, lambda: _read(cu_q, cu_k, logits, q_len, k_len), reader)


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


def plan_pack(call: EngineCall, config: SparsePrefillConfig) -> tuple[PackPlan | None, str | None]:
    """(the PackPlan of this call, None), or (None, why its lengths cannot be read); once per forward."""
    kwargs, q_len, k_len = call.kwargs, call.query.shape[2], call.key.shape[2]
    requests, reason = read_packed(kwargs, q_len, k_len, call.module)
    if requests is None:
        return None, reason
    key = ("plan", q_len, k_len, config, call.window, call.query.device)
    return remembered(kwargs["cu_seq_lens_q"], key, lambda: _plan(requests, call, config), call.module), None


def _plan(requests: PackedRequests, call: EngineCall, config: SparsePrefillConfig) -> PackPlan:
    sparse = requests.sparse(config, call.window)
    short = [i for i, on in enumerate(sparse) if not on and requests.q_bounds[i][1] > requests.q_bounds[i][0]]
    if not any(sparse) or not short:
        return PackPlan(requests, sparse, None)
    q_lens = [requests.q_bounds[i][1] - requests.q_bounds[i][0] for i in short]
    k_lens = [requests.k_bounds[i][1] - requests.k_bounds[i][0] for i in short]
    # Index tensors built once per forward from host values (one copy to the GPU), then shared by every layer.
    device = call.query.device
    q_rows = torch.cat([torch.arange(*requests.q_bounds[i]) for i in short]).to(device)
    k_rows = torch.cat([torch.arange(*requests.k_bounds[i]) for i in short]).to(device)
    cu_dtype = call.kwargs["cu_seq_lens_q"].dtype
    kwargs = {
        "cu_seq_lens_q": torch.tensor([0, *itertools.accumulate(q_lens)], dtype=cu_dtype).to(device),
        "cu_seq_lens_k": torch.tensor([0, *itertools.accumulate(k_lens)], dtype=cu_dtype).to(device),
        "max_length_q": max(q_lens), "max_length_k": max(k_lens),
    }
    if "max_seqlen_q" in call.kwargs:  # the names before transformers 5.19
        kwargs["max_seqlen_q"], kwargs["max_seqlen_k"] = max(q_lens), max(k_lens)
    return PackPlan(requests, sparse, ShortPack(q_rows, k_rows, kwargs))


def attend_packed(call: EngineCall, config: SparsePrefillConfig) -> torch.Tensor | None:
    """The output [1, Tq, Hq, D] of a packed call (module docstring), or None when the whole call should go to the
    engine's function unchanged: also when this glue fails on the call, which must not stop the engine (every
    request in flight would fail); it is said once."""
    try:
        if call.kwargs.get("cache") is not None:
            return attend_updating_cache(call, config)
        return _attend_packed(call, config)
    except Exception as err:
        warn_failed(err, "a packed call")
        return None


def _attend_packed(call: EngineCall, config: SparsePrefillConfig) -> torch.Tensor | None:
    if _engine_call_as_is(call.query, call.kwargs, config):
        queries, keys = longest_request(call.kwargs, "q"), longest_request(call.kwargs, "k")
        if stats.RECORDERS and call.kwargs.get("block_table") is None and queries and keys:  # its longest request
            stats.note_dense(call.module, queries, keys, short_reason(queries, config))
        return None
    plan, reason = plan_pack(call, config)
    if reason is not None:
        warn_dense(reason)
        stats.note_dense(call.module, call.query.shape[2], call.key.shape[2], reason)
        return None
    if stats.RECORDERS:
        _note_dense_requests(call, plan, config)
    if not any(plan.sparse):
        return None
    query, key, value = call.query, call.key, call.value
    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    requests, failed = plan.requests, []
    # Long requests first: their kernels fill the GPU's queue while the host prepares the short pack's call.
    for i in (i for i, on in enumerate(plan.sparse) if on):
        (qs, qe), (ks, ke) = requests.q_bounds[i], requests.k_bounds[i]
        attended = attend_alone(query[:, :, qs:qe], key[:, :, ks:ke], value[:, :, ks:ke], config, scale=call.scaling,
                                softcap=call.kwargs.get("softcap"), last_chunk=requests.last_chunk[i])
        if attended is None:  # it failed (out of memory, say): the engine's attention for it, alone
            failed.append(i)
            continue
        out[:, qs:qe] = attended.transpose(1, 2)
    if plan.short is not None:
        out.index_copy_(1, plan.short.q_rows, _attend_short(call, plan.short, _short_mask(call, plan)))
    for i in failed:
        out[:, slice(*requests.q_bounds[i])] = _attend_one(call, requests, i)
    return out


def _note_dense_requests(call: EngineCall, plan: PackPlan, config: SparsePrefillConfig) -> None:
    """`stats.record()`: each request of the pack that stays dense, and why (decode steps are dropped there)."""
    requests = plan.requests
    for i, on in enumerate(plan.sparse):
        (qs, qe), (ks, ke) = requests.q_bounds[i], requests.k_bounds[i]
        if not on and qe > qs:
            stats.note_dense(call.module, qe - qs, ke - ks, request_reason(qe - qs, ke - ks, config, call.window),
                             requests.last_chunk[i])


def _attend_short(call: EngineCall, short: ShortPack, mask) -> torch.Tensor:
    """The engine's output [1, Tq', Hq, D] for a short pack: its gathered tensors are fresh and laid out as the
    projections' [1, L, H, D] are, its mask rows 16-byte aligned (a view starting mid-buffer made cuDNN's attention
    fail with a misaligned address on an H200)."""
    q, k, v = (_gathered(x, rows) for x, rows in ((call.query, short.q_rows), (call.key, short.k_rows),
                                                  (call.value, short.k_rows)))
    kwargs = {**call.kwargs, **short.kwargs}
    positions = call.kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[-1] == call.query.shape[2]:
        kwargs["position_ids"] = positions.index_select(1, short.q_rows)
    return call.run_dense(query=q, key=k, value=v, mask=mask, kwargs=kwargs)


def _attend_one(call: EngineCall, requests: PackedRequests, i: int) -> torch.Tensor:
    """The engine's output for request i alone (one the sparse path failed on: rare, so nothing is remembered)."""
    (qs, qe), (ks, ke) = requests.q_bounds[i], requests.k_bounds[i]
    device, cu_q, cu_k = call.query.device, call.kwargs["cu_seq_lens_q"], call.kwargs["cu_seq_lens_k"]
    lengths = {"max_length_q": qe - qs, "max_length_k": ke - ks}
    if "max_seqlen_q" in call.kwargs:
        lengths.update(max_seqlen_q=qe - qs, max_seqlen_k=ke - ks)
    alone = ShortPack(torch.arange(qs, qe, device=device), torch.arange(ks, ke, device=device),
                      {"cu_seq_lens_q": cu_q[i:i + 2] - cu_q[i], "cu_seq_lens_k": cu_k[i:i + 2] - cu_k[i], **lengths})
    mask = call.mask
    if _is_pack_mask(call):
        mask = _aligned_rows(mask[..., qs:qe, ks:ke])
    return _attend_short(call, alone, mask)


def _gathered(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of x [1, H, T, D] along T as a fresh [1, H, len(rows), D] view of a [1, len(rows), H, D] tensor."""
    return x.transpose(1, 2).index_select(1, rows).transpose(1, 2)


def _is_pack_mask(call: EngineCall) -> bool:
    """Whether the call's mask is a tensor over the whole pack [.., Tq, Tk] (sdpa, eager; flash takes none)."""
    shape = (call.query.shape[2], call.key.shape[2])
    return isinstance(call.mask, torch.Tensor) and tuple(call.mask.shape[-2:]) == shape


def _short_mask(call: EngineCall, plan: PackPlan):
    """The mask's rows and columns of the short pack, the same for every layer of a forward: cut once and
    remembered on the mask. Any other mask (None for flash attention) is passed on as it is."""
    if not _is_pack_mask(call):
        return call.mask
    mask, short = call.mask, plan.short
    key = ("short pack", plan.requests, plan.sparse)
    return remembered(mask, key, lambda: _aligned_rows(mask.index_select(-2, short.q_rows)
                                                       .index_select(-1, short.k_rows)), call.module)


def attend_updating_cache(call: EngineCall, config: SparsePrefillConfig) -> torch.Tensor | None:
    """`attend_packed` for transformers < 5.24, whose attention function gets this call's new keys and the paged
    cache (`kwargs["cache"]`) and updates the cache itself. When the call may hold a long request, the cache is
    updated here, as the engine's function would have done it, and the call goes on with the keys read back;
    otherwise None: the engine's call unchanged. Once the cache is updated the call is answered here, densely if
    need be."""
    cache, module = call.kwargs["cache"], call.module
    if _engine_call_as_is(call.query, call.kwargs, config) or _windowed_beyond(call):
        return None
    update = getattr(cache, "update", None)
    if not callable(update) or getattr(module, "layer_idx", None) is None:
        warn_dense(f"continuous batching with a paged cache ({type(cache).__name__}) sparse_prefill cannot update "
                   "(transformers >= 5.24 hands the attention keys already read from its cache)")
        return None
    own = {name: item for name, item in call.kwargs.items() if name != "cache"}
    flat = not _updates_kwargs(type(cache))
    if not flat:  # 5.19-5.23: `own` gets this layer's lengths in place
        key, value = update(call.key, call.value, module.layer_idx, kwargs=own)
    else:  # 5.0-5.18: keys [L, Hkv, D] read through per-layer-group indices; lengths keyed by layer type
        key, value = update(key_states=call.key, value_states=call.value, layer_idx=module.layer_idx,
                            read_index=own["read_index"], write_index=own["write_index"])
        key, value = key.transpose(0, 1).unsqueeze(0), value.transpose(0, 1).unsqueeze(0)
        for name in ("cu_seq_lens_k", "max_seqlen_k", "max_length_k"):
            if isinstance(own.get(name), dict):
                own[name] = own[name]["full_attention"]
    mask = call.mask["full_attention"] if isinstance(call.mask, dict) else call.mask
    engine = call.dense

    def dense_after(module, q, k, v, mask, **rest):
        return engine(module, q, k, v, mask, cache=_KeysReadBack(k, v, flat), **rest)

    after = dataclasses.replace(call, dense=dense_after, key=key, value=value, mask=mask, kwargs=own)
    out = attend_packed(after, config)
    if out is None:  # the cache holds this call's keys now (whatever failed): the engine's attention over them
        out = after.run_dense()
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


def _windowed_beyond(call: EngineCall) -> bool:
    """Whether a windowed layer's call may hold a request with more keys than its window, judged before the cache
    is read (< 5.24): such a call keeps the engine's exact windowed attention, cache update and mask included."""
    window, longest = call.window, longest_request(call.kwargs, "k")
    return window is not None and (not isinstance(longest, int) or longest > window)


def _no_long_request(kwargs: dict, config: SparsePrefillConfig) -> bool:
    """Whether the longest lengths the engine passes already rule the sparse path out for every request."""
    lengths = [longest_request(kwargs, "q"), longest_request(kwargs, "k")]
    return all(isinstance(n, int) for n in lengths) and too_short_for_sparse(*lengths, config)


def longest_request(kwargs: dict, which: str) -> int | None:
    """The longest query ("q") or key ("k") length of a packed call's requests as the engine passes it
    (`max_length_*`; `max_seqlen_*` before 5.19, per layer type where a model mixes them), or None."""
    found = next((kwargs[n] for n in (f"max_length_{which}", f"max_seqlen_{which}") if kwargs.get(n) is not None),
                 None)
    return max(found.values(), default=None) if isinstance(found, dict) else found


def _aligned_rows(mask: torch.Tensor) -> torch.Tensor:
    """A copy of `mask` whose rows start on 16-byte boundaries (the row stride padded), as the engine's own masks
    are: slices of a buffer as wide as its cache."""
    width = -(-mask.shape[-1] * mask.element_size() // 16) * 16 // mask.element_size()
    buffer = mask.new_empty(*mask.shape[:-1], width)
    buffer[..., :mask.shape[-1]] = mask
    return buffer[..., :mask.shape[-1]]
