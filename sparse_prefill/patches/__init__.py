"""Hooking sparse prefill into model libraries. Only transformers (through its AttentionInterface) so far."""

from .transformers_attention import SparsePrefillWarning, is_patched, patch_model, unpatch_model

__all__ = ["SparsePrefillWarning", "is_patched", "patch_model", "unpatch_model"]
