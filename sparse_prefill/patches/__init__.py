"""Hooking sparse prefill into model libraries: transformers (through its AttentionInterface) and vLLM (an
attention backend registered through its plugin entry point, `patches/vllm/`).

The names below load on first use (PEP 562): vLLM imports `sparse_prefill.patches.vllm` in every process it
starts, and that must not import the transformers glue.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..notices import SparsePrefillWarning
    from .transformers_attention import is_patched, patch_model, unpatch_model, warm_up

_LAZY = {"SparsePrefillWarning": "..notices", "is_patched": ".transformers_attention",
         "patch_model": ".transformers_attention", "unpatch_model": ".transformers_attention",
         "warm_up": ".transformers_attention"}

__all__ = ["SparsePrefillWarning", "is_patched", "patch_model", "unpatch_model", "warm_up"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
