"""Prefill time on the current device: dense baselines against the sparse path.

Attention only: one layer's q/k/v of a model's shape, dense SDPA per backend (cuDNN and flash
attention on CUDA, the default on CPU) against selection + block-sparse kernel. End to end: one
prefill forward of a whole model (logits for the last token only, no KV cache), dense per SDPA
backend against `patch_model`.

Random inputs attend almost uniformly and make the selection keep nearly every block. To time the
sparsity a trained model shows, pass densities to force (one number, or one per layer): the real
selection still runs and is timed, then a random layout of that density goes to the kernel.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from ..config import SparsePrefillConfig
from ..kernels import block_sparse_attention
from ..patches import patch_model, unpatch_model
from ..selection import select_blocks
from .recording import ForcedDensity, LayoutRecorder, intercept_layouts, num_layers, random_layout, resample_layers
from .runner import synchronize


def dense_backends(device: torch.device, only: Sequence[str] | None = None) -> dict[str, object]:
    """Named SDPA backends to compare against: cuDNN and flash attention on CUDA, the default elsewhere.

    `only` keeps the named CUDA ones (e.g. ["cudnn"] where each dense prefill takes a minute).
    """
    from torch.nn.attention import SDPBackend

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    unknown = sorted(set(only or ()) - set(backends))
    if unknown:
        raise ValueError(f"unknown dense backend(s) {unknown}; choose from {list(backends)}.")
    if device.type != "cuda":
        return {"sdpa": None}
    return {name: backends[name] for name in (only or backends)}


def _backend_context(backend):
    if backend is None:
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, synchronised, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_shape(model_config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a transformers config."""
    config = getattr(model_config, "text_config", None) or model_config
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    return hq, hkv, d


def _dense_attention(q, k, v, backend):
    """Causal SDPA under `backend`; GQA through enable_gqa, or expanded KV heads where refused."""
    with _backend_context(backend):
        try:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except RuntimeError:
            group = q.shape[1] // k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True)


@torch.inference_mode()
def attention_only(shape: tuple[int, int, int], length: int, config: SparsePrefillConfig, device, dtype,
                   density: float | None = None, repeats: int = 3,
                   backends: Sequence[str] | None = None) -> list[dict]:
    """Rows for one layer at `length`: each dense backend (`dense_backends(device, backends)`), then sparse
    selection, kernel and total."""
    device = torch.device(device)
    hq, hkv, d = shape
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, length, d, device=device, dtype=dtype, generator=generator)
    k = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=generator)
    v = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=generator)
    rows = []
    for name, backend in dense_backends(device, backends).items():
        try:
            seconds = time_call(lambda b=backend: _dense_attention(q, k, v, b), device, repeats)
        except RuntimeError as err:  # a backend that refuses this shape or dtype
            rows.append({"what": "attention", "length": length, "variant": f"dense {name}", "ms": None,
                         "note": str(err).splitlines()[0][:80]})
            continue
        rows.append({"what": "attention", "length": length, "variant": f"dense {name}", "ms": 1e3 * seconds})
    select_s = time_call(lambda: select_blocks(q, k, config), device, repeats)
    layout = select_blocks(q, k, config)
    if density is not None:
        layout = random_layout(1, hq, length, length, config.block_size, density, device=device)

    def kernel():
        return block_sparse_attention(q, k, v, layout, causal=True, backend=config.backend,
                                     attention_dtype=config.attention_dtype)

    kernel_s = time_call(kernel, device, repeats)
    kept = layout.density()
    note = f"forced density {density}" if density is not None else ""
    rows += [{"what": "attention", "length": length, "variant": "sparse select", "ms": 1e3 * select_s},
             {"what": "attention", "length": length, "variant": "sparse kernel", "ms": 1e3 * kernel_s,
              "density": kept, "note": note},
             {"what": "attention", "length": length, "variant": "sparse total", "ms": 1e3 * (select_s + kernel_s),
              "density": kept, "note": note}]
    return _with_speedups(rows)


@torch.inference_mode()
def end_to_end(model, input_ids: torch.Tensor, config: SparsePrefillConfig,
               densities: Sequence[float] | float | None = None, repeats: int = 3,
               backends: Sequence[str] | None = None) -> list[dict]:
    """Rows for one prefill forward of `model` over input_ids [1, L]: dense per backend
    (`dense_backends(device, backends)`), then sparse."""
    device = input_ids.device
    length = input_ids.shape[1]

    def forward():
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    rows, reference = [], None
    unpatch_model(model)
    for name, backend in dense_backends(device, backends).items():
        with _backend_context(backend):
            try:
                seconds = time_call(forward, device, repeats)
            except RuntimeError as err:  # a backend that refuses this model's shapes or dtype
                rows.append({"what": "end-to-end", "length": length, "variant": f"dense {name}", "ms": None,
                             "note": str(err).splitlines()[0][:80]})
                continue
            logits, peak = _last_call(device, forward)
        reference = logits if reference is None else reference
        rows.append({"what": "end-to-end", "length": length, "variant": f"dense {name}", "ms": 1e3 * seconds, **peak})
    layers = num_layers(model)
    recorder = LayoutRecorder(layers)
    forced = None
    if densities is not None:
        per_layer = [float(densities)] * layers if isinstance(densities, (int, float)) else resample_layers(
            list(densities), layers)
        forced = ForcedDensity(per_layer)

    def hook(layer, q, k, layout):
        return recorder(layer, q, k, forced(layer, q, k, layout) if forced else layout)

    patch_model(model, config)
    try:
        with intercept_layouts(model, hook):
            seconds = time_call(forward, device, repeats)
            recorder.reset()
            logits, peak = _last_call(device, forward)
    finally:
        unpatch_model(model)
    row = {"what": "end-to-end", "length": length, "variant": "sparse", "ms": 1e3 * seconds,
           "density": recorder.mean_density(), "sparse_layers": recorder.sparse_layers,
           "note": "forced densities" if forced else "", **peak}
    if reference is not None:  # does the sparse prefill still predict the same next token?
        row["top1_match"] = bool(logits.argmax() == reference.argmax())
        row["logit_cosine"] = float(torch.nn.functional.cosine_similarity(logits, reference, dim=0))
    rows.append(row)
    return _with_speedups(rows)


def _last_call(device: torch.device, forward: Callable[[], object]) -> tuple[torch.Tensor, dict]:
    """(fp32 last-token logits, {"peak_gib": ...} on CUDA) of one more untimed forward."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logits = forward().logits[0, -1].float()
    if device.type != "cuda":
        return logits, {}
    synchronize(device)
    return logits, {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def _with_speedups(rows: list[dict]) -> list[dict]:
    """Add `speedup` = best dense time / this time, for every row with a time."""
    dense = [r["ms"] for r in rows if r["variant"].startswith("dense") and r.get("ms")]
    best = min(dense) if dense else None
    for r in rows:
        r["speedup"] = best / r["ms"] if best and r.get("ms") and not r["variant"].startswith("sparse select") else None
    return rows
