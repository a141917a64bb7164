"""What the Triton kernels support: the one table the attention kernel, the fused selection and the
model glue all read, so none of them can disagree about it.

Anything outside it runs exactly elsewhere: on CUDA the glue sends the call to the model's dense
attention (with one warning), off CUDA the PyTorch reference runs.
"""

from __future__ import annotations

import functools

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16)  # what the dispatchers send to Triton (fp32: the fused
# selection under backend="triton", and the attention kernel only when called directly, as tests do)
SELECTION_DTYPES = TRITON_DTYPES
TRITON_HEAD_DIMS = (64, 80, 96, 128, 256)  # non-powers of two are padded in registers
TRITON_BLOCK_SIZES = (64, 128)
MIN_TRITON = (3, 4)  # tensor descriptors (TMA) in kernels and `tl.range(num_stages=...)`
ATTENTION_DTYPES = ("auto", "fp8")  # the products' arithmetic: the inputs' dtype, or e4m3 (kernels/fp8.py)
# FP8 products: Hopper's tensor cores and up. Ada (8.9) has FP8 tensor cores too, but the kernel is built for
# Hopper's and unmeasured on Ada. Triton's e4m3 `tl.dot` on sm90 predates MIN_TRITON: no Triton check of its own.
FP8_MIN_CAPABILITY = (9, 0)
# Below head_dim 128 a tile holds too little matrix work for FP8's faster products to pay for its extra
# per-score work: measured 0.70x (128x64 tiles) and 0.92x (128x128) the bf16 kernel's speed at head_dim 64 on an
# H100, and 1.17-1.22x at 128 (bench/RESULTS.md, "FP8 attention"). Such calls run the fp16/bf16 kernel, warned.
FP8_MIN_HEAD_DIM = 128


def head_dim_supported(head_dim: int) -> bool:
    return head_dim in TRITON_HEAD_DIMS


@functools.cache
def triton_version_ok() -> bool:
    """Whether the installed Triton is new enough for the kernels (MIN_TRITON)."""
    try:
        import triton
    except ImportError:
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= MIN_TRITON


def triton_supports(q: torch.Tensor, block_size: int) -> str | None:
    """None when the Triton kernels can run these inputs, else the reason they cannot."""
    if not q.is_cuda:
        return f"tensors are on {q.device.type}, the Triton kernel needs CUDA"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} (the Triton kernel takes float16 and bfloat16)"
    if not head_dim_supported(q.shape[-1]):
        return f"head_dim {q.shape[-1]} (the Triton kernel takes {', '.join(map(str, TRITON_HEAD_DIMS))})"
    if block_size not in TRITON_BLOCK_SIZES:
        return f"block_size {block_size} (the Triton kernel takes {' and '.join(map(str, TRITON_BLOCK_SIZES))})"
    if not triton_version_ok():
        return f"Triton older than {'.'.join(map(str, MIN_TRITON))} (the kernels need tensor descriptors)"
    return None


def fp8_triton_supports(q: torch.Tensor, block_size: int) -> str | None:
    """None when the Triton FP8 kernel can run these inputs, else the reason it cannot (then attention_dtype="fp8"
    runs the fp16/bf16 kernel, warned once with this reason)."""
    reason = triton_supports(q, block_size)
    if reason is not None:
        return reason
    capability = tuple(torch.cuda.get_device_capability(q.device))
    if capability < FP8_MIN_CAPABILITY:
        return (f"this GPU is of compute capability {capability[0]}.{capability[1]}, the FP8 kernel needs "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Hopper) or newer")
    if q.shape[-1] < FP8_MIN_HEAD_DIM:
        return (f"head_dim {q.shape[-1]} is below {FP8_MIN_HEAD_DIM}, where the FP8 kernel was measured slower than "
                f"the bf16 one (0.70-0.92x at head_dim 64 on an H100)")
    return None
