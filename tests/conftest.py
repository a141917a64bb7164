"""Shared test setup: CPU only, Triton kernels through the interpreter."""

import os

import torch

# Must be set before any @triton.jit function is defined; without a GPU the kernels run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
