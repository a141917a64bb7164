"""sparse_prefill: training-free block-sparse prefill for Hugging Face models.

The names below load on first use (PEP 562), so that `import sparse_prefill.cli` (the
`sparse-prefill --help` path) and `sparse_prefill.config` do not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .attention import sparse_attention
    from .config import SparsePrefillConfig
    from .kernels import block_sparse_attention
    from .layout import BlockLayout
    from .notices import SparsePrefillWarning
    from .patches import is_patched, patch_model, unpatch_model, warm_up
    from .selection import select_blocks
    from .stats import log_prefills, record

_LAZY = {  # public name -> the submodule that defines it
    "sparse_attention": ".attention",
    "SparsePrefillConfig": ".config",
    "block_sparse_attention": ".kernels",
    "BlockLayout": ".layout",
    "SparsePrefillWarning": ".notices",
    "is_patched": ".patches",
    "log_prefills": ".stats",
    "patch_model": ".patches",
    "record": ".stats",
    "unpatch_model": ".patches",
    "warm_up": ".patches",
    "select_blocks": ".selection",
}

__all__ = [
    "BlockLayout",
    "SparsePrefillConfig",
    "SparsePrefillWarning",
    "block_sparse_attention",
    "is_patched",
    "log_prefills",
    "patch_model",
    "record",
    "select_blocks",
    "sparse_attention",
    "unpatch_model",
    "warm_up",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # once loaded, a plain module attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
