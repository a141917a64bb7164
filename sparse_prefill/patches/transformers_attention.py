"""patch_model / unpatch_model for transformers models, through `AttentionInterface`.

For a model whose attention implementation was `prev` ("sdpa", "eager" or a flash attention),
we register one attention function under "sparse_prefill:<prev>" and the mask function `prev`
already uses, then switch the model to that name. The function runs the sparse path for long
causal prefill and hands everything else (decode, short prompts, features the sparse path lacks)
to `prev` unchanged, so dense results stay bit-identical. `unpatch_model` switches back.

The mask `prev` builds is read once per forward (`masks.py`): padded batches run row by row as if
each row were alone (`padded_rows.py`), static caches lose their empty slots, and any other mask
pattern goes dense. Under torch.compile the sparse branch runs eagerly between compiled graphs; the
decision to take it depends on shapes only, so decode steps trace straight through.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..attention import sparse_attention
from ..config import SparsePrefillConfig, as_config
from ..kernels import triton_supports
from ..notices import forget_warnings, warn_once
from ..selection.estimate import num_proxies
from .masks import MaskReading, read_mask
from .padded_rows import attend_rows_alone, too_short_for_sparse

try:  # where transformers >= 5 collects `output_attentions` through hooks
    from transformers.utils.output_capturing import _active_collector as _ACTIVE_COLLECTOR
except ImportError:  # pragma: no cover - older layouts: fall back to the model config
    _ACTIVE_COLLECTOR = None

PREFIX = "sparse_prefill:"
_SUPPORTED_PREVIOUS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")


# Per attention module: the config it runs with. Weak keys: a deleted model leaves nothing behind.
_CONFIGS: weakref.WeakKeyDictionary[torch.nn.Module, SparsePrefillConfig] = weakref.WeakKeyDictionary()
# Per model: the implementation to restore on unpatch.
_PREVIOUS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _warn_once(reason: str) -> None:
    warn_once(f"sparse_prefill: dense attention used for {reason}.", stacklevel=3)


def _previous_attention(previous: str, module: torch.nn.Module) -> Callable:
    if previous == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward to fall back to.")
        return eager
    return ALL_ATTENTION_FUNCTIONS[previous]


def _dense_reason(previous, module, query, key, value, attention_mask, dropout, kwargs,
                  config) -> tuple[str | None, bool]:
    """(why this call must be dense, whether to warn), or (None, _) when the sparse path may run."""
    k_len = key.shape[2]
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        return f"non-causal attention in {type(module).__name__}", True
    window = kwargs.get("sliding_window")
    if window is not None and window < k_len:
        return "sliding-window layers (they keep their exact windowed attention)", True
    if kwargs.get("output_attentions") or _recording_attentions(module):
        return "output_attentions=True (the sparse path computes no attention weights)", True
    if dropout and module.training:
        return "attention dropout in training mode", True
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "calls that need gradients (the sparse path is forward-only: run inference under torch.no_grad())", True
    for name in ("s_aux", "sinks", "position_bias", "head_mask", "cu_seq_lens_q", "cu_seq_lens_k", "block_table"):
        if kwargs.get(name) is not None:
            return f"`{name}` (not supported by the sparse path)", True
    if value.shape != key.shape:
        return f"values of head_dim {value.shape[-1]} with keys of head_dim {key.shape[-1]}", True
    if previous.startswith("flash") and attention_mask is None and _packed_positions(kwargs.get("position_ids")):
        return "packed sequences (position_ids restart inside the batch)", True
    if query.is_cuda and config.backend == "auto":
        return triton_supports(query, config.block_size), True
    return None, False


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
    def sparse_prefill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        config = _CONFIGS.get(module)
        # Shapes only, so torch.compile traces decode steps straight through to the previous implementation.
        if config is not None and not too_short_for_sparse(query.shape[2], key.shape[2], config):
            out = _sparse_prefill(previous, module, query, key, value, attention_mask, dropout, scaling, kwargs, config)
            if out is not None:
                return out, None
        dense = _previous_attention(previous, module)
        return dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    sparse_prefill_attention.__name__ = f"sparse_prefill_attention_over_{previous}"
    return sparse_prefill_attention


@torch.compiler.disable  # data-dependent selection: under torch.compile it runs eagerly, between compiled graphs
def _sparse_prefill(previous, module, query, key, value, attention_mask, dropout, scaling, kwargs,
                    config) -> torch.Tensor | None:
    """The sparse attention output [B, Lq, Hq, D], or None when this call must go to the dense implementation."""
    reading = _plan_sparse(previous, module, query, key, value, attention_mask, dropout, kwargs, config)
    if reading is None:
        return None
    softcap = kwargs.get("softcap")
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
        reading, reason = read_mask(attention_mask, query.shape[2], key.shape[2], previous)
        loud = True
    if reason is None and too_short_for_sparse(query.shape[2], reading.num_keys, config):
        reason, loud = "decode or a short prompt", False  # a static cache's prompt shorter than the threshold
    if reason is not None:
        if loud:
            _warn_once(reason)
        return None
    return reading


def _register(previous: str) -> str:
    name = PREFIX + previous
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(previous))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `patch_model` switched this model to sparse prefill (and it was not unpatched)."""
    return model in _PREVIOUS


def patch_model(model: torch.nn.Module, config: SparsePrefillConfig | None = None) -> torch.nn.Module:
    """Make every causal self-attention layer of a transformers model run block-sparse prefill.

    Decode steps, prompts shorter than `config.min_seq_len` and anything the sparse path cannot do
    exactly run the model's previous attention implementation unchanged. Patching again only
    replaces the config. Returns the model.
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

    _check_heads(attention_modules, model_config, config)

    previous = _PREVIOUS.get(model, model_config._attn_implementation)
    if previous not in _SUPPORTED_PREVIOUS:
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={previous!r}; sparse_prefill falls back to 'sdpa', "
            "'eager' or flash attention. Call model.set_attn_implementation('sdpa') first.")
    model.set_attn_implementation(_register(previous))
    _PREVIOUS[model] = previous
    for module in model.modules():
        _CONFIGS[module] = config
    forget_warnings()
    return model


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


def _check_heads(attention_modules, model_config, config: SparsePrefillConfig) -> None:
    """Refuse a `proxy_heads` that some layer's head counts do not fit, now rather than at the first long forward."""
    for module in attention_modules:
        counts = _head_counts(module, model_config)
        if counts is not None:
            try:
                num_proxies(*counts, config.proxy_heads)
            except ValueError as err:
                name = type(module).__name__
                raise ValueError(f"SparsePrefillConfig.proxy_heads does not fit {name}: {err}") from None


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before `patch_model`. Returns the model."""
    previous = _PREVIOUS.pop(model, None)
    if previous is None:
        return model
    model.set_attn_implementation(previous)
    for module in model.modules():
        _CONFIGS.pop(module, None)
    return model
