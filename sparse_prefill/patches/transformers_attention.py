"""patch_model / unpatch_model for transformers models, through `AttentionInterface`.

The hook. transformers dispatches attention by name through one registry (`AttentionInterface`), and
its serving engines (`generate_batch`, the continuous-batching manager, `transformers serve`) accept
a model only under the names they know: "sdpa", the flash attentions, "paged|eager". So the model
keeps its name, and each of those registry entries is wrapped once by an attention function that
asks whether the calling module belongs to a patched model (`_CONFIGS`): if not, it calls the
original function untouched; if so, it runs the sparse path for long causal prefill and hands
everything else (decode, short prompts, features the sparse path lacks) to the original unchanged,
so dense results stay bit-identical. The engines then see the implementation they expect, whatever
their version, and switching a patched model between those names (as continuous batching does when
flash attention is installed) keeps it sparse. "eager" is no registry entry in every transformers
version, so an eager model is switched to a name of our own, "sparse_prefill:eager", as before; the
registry entries are wrapped for it too, so that moved to "paged|eager" (continuous batching's eager,
which refuses any other name) or to flash attention it stays sparse.
`unpatch_model` drops the module from `_CONFIGS`; when no patched model is left the registry entries
are restored. Upstream, a registry entry that could declare the calling convention it follows (e.g.
`register(name, fn, like="sdpa")`) would let the engines accept any name and make the wrapping
unnecessary.

The mask the model builds is read once per forward (`masks.py`): padded batches run row by row as if
each row were alone (`padded_rows.py`), static caches lose their empty slots, and any other mask
pattern goes dense. Packed calls of continuous batching run request by request (`packed.py`). Under
torch.compile the sparse branch runs eagerly between compiled graphs; the decision to take it depends
on shapes only, so decode steps trace straight through.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import stats
from ..attention import sparse_attention
from ..config import SparsePrefillConfig, as_config
from ..notices import forget_warnings
from .masks import MaskReading, read_mask
from .packed import EngineCall, attend_packed, longest_request
from .padded_rows import attend_rows_alone
from .per_request import (
    call_reason,
    check_proxy_heads,
    rank_config,
    short_reason,
    too_short_for_sparse,
    warm_up_layer,
    warn_dense,
)

try:  # where transformers >= 5 collects `output_attentions` through hooks
    from transformers.utils.output_capturing import _active_collector as _ACTIVE_COLLECTOR
except ImportError:  # pragma: no cover - older layouts: fall back to the model config
    _ACTIVE_COLLECTOR = None

PREFIX = "sparse_prefill:"
_SUPPORTED_PREVIOUS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
# Registry entries a patched model may be run under: its own, and those a serving engine switches it to
# (continuous batching: flash attention when installed, "paged|eager" for eager models; older versions:
# "paged|<name>"). Each present one is wrapped while a model is patched.
_WRAPPED_NAMES = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "paged|eager",
                  "paged|sdpa", "paged|flash_attention_2", "paged|flash_attention_3", "paged|flash_attention_4")


# Per attention module: the config it runs with. Weak keys: a deleted model leaves nothing behind.
_CONFIGS: weakref.WeakKeyDictionary[torch.nn.Module, SparsePrefillConfig] = weakref.WeakKeyDictionary()
# Per model: the implementation to restore on unpatch.
_PREVIOUS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
# Per wrapped registry name: the function it held before (restored when no patched model is left).
_ORIGINALS: dict[str, Callable] = {}


def _previous_attention(previous: str, module: torch.nn.Module) -> Callable:
    """The dense implementation behind `previous`: the wrapped registry entry's original, or the model's own
    eager function."""
    if previous in _ORIGINALS:
        return _ORIGINALS[previous]
    if previous == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward to fall back to.")
        return eager
    return ALL_ATTENTION_FUNCTIONS[previous]


_PACKED_ARGUMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "block_table")  # continuous batching's, in an unpacked call


def _call_reason(module, query, key, value, dropout, kwargs, config, *, packed: bool) -> str | None:
    """Why no request of this call may go sparse (`per_request.call_reason`, the rule every engine asks), or None.
    A packed call's requests meet the sliding window one by one (`PackedRequests.sparse`); an unpacked call holds
    one sequence per row, whose keys are all the call's."""
    is_causal = kwargs.get("is_causal")
    if packed or is_causal is None:  # continuous batching passes is_causal=False with its block-diagonal mask
        is_causal = getattr(module, "is_causal", True)
    window = None if packed else kwargs.get("sliding_window")
    not_causal = None if is_causal else f"non-causal attention in {type(module).__name__}"
    return call_reason(query, config, not_causal=not_causal, window=window,
                       max_keys=key.shape[2], lacks=_lacks(module, query, key, value, dropout, kwargs, packed))


def _lacks(module, query, key, value, dropout, kwargs, packed: bool) -> tuple[str, ...]:
    """What this transformers call uses that the sparse path does not do, named for the user."""
    lacks = []
    if kwargs.get("output_attentions") or _recording_attentions(module):
        lacks.append("output_attentions=True (the sparse path computes no attention weights)")
    if dropout and module.training:
        lacks.append("attention dropout in training mode")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        lacks.append("calls that need gradients (the sparse path is forward-only: run inference under "
                     "torch.no_grad())")
    arguments = ("s_aux", "sinks", "position_bias", "head_mask") + (() if packed else _PACKED_ARGUMENTS)
    lacks += [f"`{name}` (not supported by the sparse path)" for name in arguments if kwargs.get(name) is not None]
    if value.shape != key.shape:
        lacks.append(f"values of head_dim {value.shape[-1]} with keys of head_dim {key.shape[-1]}")
    return tuple(lacks)


def _dense_reason(previous, module, query, key, value, attention_mask, dropout, kwargs,
                  config) -> tuple[str | None, bool]:
    """(why this unpacked call must be dense, whether to warn), or (None, _) when the sparse path may run."""
    reason = _call_reason(module, query, key, value, dropout, kwargs, config, packed=False)
    if reason is None and previous.startswith("flash") and attention_mask is None and _packed_positions(
            kwargs.get("position_ids")):
        reason = "packed sequences (position_ids restart inside the batch)"
    return reason, reason is not None


def _recording_attentions(module) -> bool:
    """Whether transformers is collecting attention weights through its output hooks.

    With `config.output_attentions=True` transformers >= 5 records the weights each attention returns
    without passing `output_attentions` to it; a sparse call would leave them out silently.
    """
    if _ACTIVE_COLLECTOR is not None:
        return "attentions" in (_ACTIVE_COLLECTOR.get() or {})
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _packed_positions(position_ids) -> bool:
    """Flash attention's test for packed sequences: one row whose positions restart somewhere."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return False
    return bool((position_ids.diff(dim=-1) != 1).any())


def _make_attention(previous: str) -> Callable:
    """The attention function registered for `previous`: sparse prefill for patched modules, else `previous`."""
    def sparse_prefill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        config = _CONFIGS.get(module)
        # Shapes only, so torch.compile traces decode steps straight through to the previous implementation. An
        # engine that updates its paged cache in this call (transformers < 5.24) passes the new keys alone.
        keys = key.shape[2] if kwargs.get("cache") is None else sys.maxsize
        if config is not None and not too_short_for_sparse(query.shape[2], keys, config):
            out = _sparse_prefill(previous, module, query, key, value, attention_mask, dropout, scaling, kwargs, config)
            if out is not None:
                return out, None
        elif config is not None and stats.RECORDERS:
            _note_short(module, query, key, kwargs, config)
        dense = _previous_attention(previous, module)
        return dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    sparse_prefill_attention.__name__ = f"sparse_prefill_attention_over_{previous}"
    return sparse_prefill_attention


@torch.compiler.disable
def _note_short(module, query, key, kwargs, config) -> None:
    """`stats.record()`: a prefill call too short for the sparse path (a decode step is none: `stats` drops it); a
    packed call by its longest request (its lengths are on the device: reading them would wait for the GPU)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if kwargs.get("cu_seq_lens_q") is not None:
        q_len, k_len = longest_request(kwargs, "q") or 0, longest_request(kwargs, "k") or 0
    with stats.in_layer(module):
        stats.note_dense(module, q_len, k_len, short_reason(q_len, config))


@torch.compiler.disable  # data-dependent selection: under torch.compile it runs eagerly, between compiled graphs
def _sparse_prefill(previous, module, query, key, value, attention_mask, dropout, scaling, kwargs,
                    config) -> torch.Tensor | None:
    """The sparse attention output [B, Lq, Hq, D], or None when this call must go to the dense implementation."""
    if not stats.RECORDERS:
        return _attend(previous, module, query, key, value, attention_mask, dropout, scaling, kwargs, config)
    with stats.in_layer(module):  # `stats.record()`: the sparse calls made below are this layer's
        return _attend(previous, module, query, key, value, attention_mask, dropout, scaling, kwargs, config)


def _attend(previous, module, query, key, value, attention_mask, dropout, scaling, kwargs, config):
    softcap = kwargs.get("softcap")
    config = _rank_config(module, query.shape[1], config)
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cache") is not None:  # continuous batching
        reason = _call_reason(module, query, key, value, dropout, kwargs, config, packed=True)
        if reason is not None:
            warn_dense(reason)
            stats.note_dense(module, query.shape[2], key.shape[2], reason)
            return None
        call = EngineCall(_previous_attention(previous, module), module, query, key, value, attention_mask, dropout,
                          scaling, kwargs)
        return attend_packed(call, config)
    reading = _plan_sparse(previous, module, query, key, value, attention_mask, dropout, kwargs, config)
    if reading is None:
        return None
    key, value = key[:, :, :reading.num_keys], value[:, :, :reading.num_keys]
    if reading.rows is not None:
        out = attend_rows_alone(query, key, value, reading.rows, config, scale=scaling, softcap=softcap)
    else:
        out = sparse_attention(query, key, value, config, scale=scaling, softcap=softcap)
    return out.transpose(1, 2).contiguous()


def _plan_sparse(previous, module, query, key, value, attention_mask, dropout, kwargs, config) -> MaskReading | None:
    """The mask reading to run the sparse path with, or None (after warning once where the user may care)."""
    reason, loud = _dense_reason(previous, module, query, key, value, attention_mask, dropout, kwargs, config)
    reading = None
    if reason is None:
        reading, reason = read_mask(attention_mask, query.shape[2], key.shape[2], previous, reader=module)
        loud = True
    if reason is None and too_short_for_sparse(query.shape[2], reading.num_keys, config):
        reason, loud = short_reason(query.shape[2], config), False  # a static cache's prompt shorter than the threshold
    if reason is not None:
        if loud:
            warn_dense(reason)
        stats.note_dense(module, query.shape[2], key.shape[2] if reading is None else reading.num_keys, reason)
        return None
    return reading


def _register(previous: str) -> str:
    """Route calls of `previous` from patched modules through the sparse path; returns the implementation name
    a patched model runs under: `previous` itself for registry entries, "sparse_prefill:eager" for eager."""
    for name in _WRAPPED_NAMES:  # eager models too: continuous batching runs them as "paged|eager" or flash
        if name in AttentionInterface._global_mapping and name not in _ORIGINALS:
            _ORIGINALS[name] = AttentionInterface._global_mapping[name]
            AttentionInterface.register(name, _make_attention(name))
    if previous == "eager":  # no registry entry in every transformers version: a name of our own
        name = PREFIX + previous
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _make_attention(previous))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
        return name
    return previous


def _restore_registry() -> None:
    """Put back the registry entries `_register` wrapped (when no patched model is left)."""
    for name, original in _ORIGINALS.items():
        AttentionInterface.register(name, original)
    _ORIGINALS.clear()


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `patch_model` switched this model to sparse prefill (and it was not unpatched)."""
    return model in _PREVIOUS


def patch_model(model: torch.nn.Module, config: SparsePrefillConfig | None = None) -> torch.nn.Module:
    """Make every causal self-attention layer of a transformers model run block-sparse prefill.

    Decode steps, prompts shorter than `config.min_seq_len` and anything the sparse path cannot do
    exactly run the model's previous attention implementation unchanged. The model keeps its attention
    implementation name (except eager, see the module docstring), so serving engines that accept it
    accept the patched model. Patching again only replaces the config. Returns the model.
    """
    config = as_config(config)
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model, "set_attn_implementation"):
        raise NotImplementedError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; patch_model needs one.")
    if getattr(model_config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"{type(model).__name__} is an encoder-decoder model; sparse prefill is for decoder-only causal LMs.")
    if not model._can_set_attn_implementation():
        raise NotImplementedError(
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, so "
            "sparse_prefill cannot hook it. Use a model class that calls ALL_ATTENTION_FUNCTIONS.")
    attention_modules = [m for m in model.modules() if hasattr(m, "is_causal") and "Attention" in type(m).__name__]
    if not any(m.is_causal for m in attention_modules):
        raise NotImplementedError(
            f"{type(model).__name__} has no causal self-attention layer; sparse prefill is for causal LMs.")

    _check_heads(attention_modules, model_config, config, tp_size=_tp_size(model))

    current = model_config._attn_implementation
    # Patching again only replaces the config, under the name the model serves under now (one of ours, or one
    # continuous batching moved it to); a name the user chose since is patched afresh.
    serving = model in _PREVIOUS and (current.startswith(PREFIX) or current in _ORIGINALS)
    previous = _PREVIOUS[model] if serving else current
    if previous not in _SUPPORTED_PREVIOUS and previous not in _WRAPPED_NAMES:  # "paged|sdpa": batching ran before
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={previous!r}; sparse_prefill falls back to 'sdpa', "
            "'eager' or flash attention. Call model.set_attn_implementation('sdpa') first.")
    name = _register(previous)
    if name != current and not serving:
        model.set_attn_implementation(name)
    _PREVIOUS[model] = previous
    for module in model.modules():
        _CONFIGS[module] = config
    forget_warnings()
    return model


def serve_eager_in_batches(model: torch.nn.Module) -> bool:
    """Switch a patched eager model to "paged|eager", continuous batching's name for eager attention, and say
    whether it was switched. Continuous batching refuses any other name (the switch it makes itself from "eager"
    does not recognise "sparse_prefill:eager"); the model stays sparse under it, and `unpatch_model` gives it
    "eager" back. Outside continuous batching the model runs "paged|eager"'s own function, which lacks eager's
    softcap and dropout: switch only a model about to serve."""
    if not is_patched(model) or model.config._attn_implementation != PREFIX + "eager":
        return False
    model.set_attn_implementation("paged|eager")
    return True


def context_length(model_config) -> int | None:
    """The longest prompt a config allows: max_position_embeddings, or what its rope scaling extends it to
    (configs that carry YaRN often keep the trained length there)."""
    text = getattr(model_config, "text_config", None) or model_config
    length = getattr(text, "max_position_embeddings", None)
    for rope in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None)):
        if isinstance(rope, dict) and rope.get("original_max_position_embeddings") and rope.get("factor"):
            length = max(length or 0, int(rope["original_max_position_embeddings"] * rope["factor"]))
    return length


def warm_up(model: torch.nn.Module, max_len: int | None = None) -> int:
    """Compile, before the first long prompt, the kernel variants a patched model's prompts of up to `max_len`
    tokens need (default: its context, `context_length`), on each GPU its attention layers live on: the first long
    request then finds no Triton compile in its way (seconds on a fresh machine; `attention.warm_up_kernels`).
    Returns the number of sparse calls made; 0 where the path runs no Triton kernel (CPU, fp32, backend="torch").
    """
    if not is_patched(model):
        raise ValueError("warm_up needs a patched model: call patch_model(model) first.")
    max_len = max_len or context_length(model.config)
    if not max_len:
        raise ValueError(f"{type(model).__name__}'s config has no max_position_embeddings: pass max_len.")
    calls, done, tp_size = 0, set(), _tp_size(model)
    for module in model.modules():
        config = _CONFIGS.get(module)
        q_proj = getattr(module, "q_proj", None)
        if config is None or not getattr(module, "is_causal", False) or not isinstance(q_proj, torch.nn.Linear):
            continue
        heads, head_dim = _layer_heads(module, model.config, tp_size), getattr(module, "head_dim", None)
        if heads is None or not head_dim:
            continue
        q_heads, kv_heads = heads[0] // heads[2], max(1, heads[1] // heads[2])  # this GPU's share under TP
        calls += warm_up_layer(q_heads, kv_heads, head_dim, max_len, config, dtype=q_proj.weight.dtype,
                               device=q_proj.weight.device, softcap=getattr(module, "attn_logit_softcapping", None),
                               done=done)
    return calls


def _head_counts(module: torch.nn.Module, model_config) -> tuple[int, int] | None:
    """(query heads, KV heads) of one attention module, from its projections or the model config."""
    q_proj, k_proj = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
    head_dim = getattr(module, "head_dim", None)
    if head_dim and isinstance(q_proj, torch.nn.Linear) and isinstance(k_proj, torch.nn.Linear):
        return q_proj.out_features // head_dim, k_proj.out_features // head_dim
    text = getattr(model_config, "text_config", None) or model_config
    hq = getattr(text, "num_attention_heads", None)
    if not hq:
        return None
    return hq, getattr(text, "num_key_value_heads", None) or hq


def _tp_size(model: torch.nn.Module) -> int:
    """The tensor-parallel size transformers recorded on the model (not every release does: `_layer_heads`), else 1."""
    return getattr(model, "_tp_size", None) or 1


def _layer_heads(module: torch.nn.Module, model_config, tp_size: int) -> tuple[int, int, int] | None:
    """(query heads, KV heads, GPUs they are split over) of one attention layer as a whole, or None.

    Tensor parallelism shards the projections, and transformers releases record it differently: a DTensor weight
    (its shape is the layer's, `to_local()` the rank's share: 5.0, >= 5.16; 5.16 sets no `_tp_size`), or the
    rank's plain share with `model._tp_size` (5.8-5.12), whose `out_features` are then the rank's heads."""
    counts = _head_counts(module, model_config)
    q_proj, head_dim = getattr(module, "q_proj", None), getattr(module, "head_dim", None)
    if counts is None or not head_dim or not isinstance(q_proj, torch.nn.Linear):
        return None if counts is None else (*counts, tp_size)
    weight = q_proj.weight
    if hasattr(weight, "to_local"):  # a DTensor
        return weight.shape[0] // head_dim, counts[1], max(1, weight.shape[0] // max(1, weight.to_local().shape[0]))
    text = getattr(model_config, "text_config", None) or model_config
    whole = getattr(text, "num_attention_heads", None)
    if tp_size > 1 and weight.shape[0] // head_dim * tp_size == whole:  # the rank's plain share
        kv = getattr(text, "num_key_value_heads", None) or whole
        return whole, min(kv, counts[1] * tp_size), tp_size
    return weight.shape[0] // head_dim, counts[1], 1


# Per attention module: its query heads in all, where tensor parallelism gives each rank a share (`_check_heads`).
_WHOLE_HEADS: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


def _rank_config(module, local_heads: int, config: SparsePrefillConfig) -> SparsePrefillConfig:
    """The config for a call that sees `local_heads` of the module's query heads (`per_request.rank_config`)."""
    if not isinstance(config.proxy_heads, int):
        return config
    whole = _WHOLE_HEADS.get(module)
    if whole is None:
        counts = _head_counts(module, getattr(module, "config", None))
        whole = None if counts is None else counts[0]
    return config if whole is None else rank_config(config, local_heads, whole)


def _check_heads(attention_modules, model_config, config: SparsePrefillConfig, tp_size: int = 1) -> None:
    """Refuse a `proxy_heads` that some layer's head counts do not fit, now rather than at the first long forward;
    remember each layer's query heads in all for the calls' `_rank_config`."""
    for module in attention_modules:
        heads = _layer_heads(module, model_config, tp_size)
        if heads is None:
            continue
        q_heads, kv_heads, shards = heads
        if shards > 1:
            _WHOLE_HEADS[module] = q_heads
        try:
            check_proxy_heads(config, q_heads, kv_heads, shards=shards)
        except ValueError as err:
            name = type(module).__name__
            raise ValueError(f"SparsePrefillConfig.proxy_heads does not fit {name}: {err}") from None


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make the model run exactly as before `patch_model`; when no patched model is left, the registry entries
    `patch_model` wrapped are restored too. Returns the model."""
    previous = _PREVIOUS.pop(model, None)
    if previous is None:
        return model
    current = model.config._attn_implementation
    if current.startswith(PREFIX) or (previous == "eager" and current == "paged|eager"):  # our name, or the one
        model.set_attn_implementation(previous)  # continuous batching takes for eager (`serve_eager_in_batches`)
    for module in model.modules():
        _CONFIGS.pop(module, None)
    if not _PREVIOUS:
        _restore_registry()
    return model
