"""Hooking sparse prefill into model libraries. Only transformers (through its AttentionInterface) so far."""

from ..notices import SparsePrefillWarning
from .transformers_attention import is_patched, patch_model, unpatch_model

__all__ = ["SparsePrefillWarning", "is_patched", "patch_model", "unpatch_model"]
