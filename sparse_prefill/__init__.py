"""sparse_prefill: training-free block-sparse prefill for Hugging Face models."""

from .attention import sparse_attention
from .config import SparsePrefillConfig
from .kernels import block_sparse_attention
from .layout import BlockLayout
from .notices import SparsePrefillWarning
from .patches import patch_model, unpatch_model
from .selection import select_blocks

__all__ = [
    "BlockLayout",
    "SparsePrefillConfig",
    "SparsePrefillWarning",
    "block_sparse_attention",
    "patch_model",
    "select_blocks",
    "sparse_attention",
    "unpatch_model",
]
__version__ = "0.1.0"
