"""Watching, and for timing forcing, the block layouts the sparse path chooses, per layer and head.

`sparse_attention` asks `sparse_prefill.attention.select_blocks` for its layout. While
`intercept_layouts(model, fn)` is active, that function is wrapped so that `fn(layer, q, k, layout)`
sees every layout (and may return another); forward pre-hooks on the attention modules say which
layer is running. Outside the context nothing is wrapped, so the normal path pays nothing.

`LayoutRecorder` keeps per-(layer, head) kept-block counts on the device (no host sync until read).
`ForcedDensity` swaps in random layouts of a given density per layer: random weights attend almost
uniformly and so choose nearly dense layouts; forcing the densities a trained model chose gives the
time that model's sparsity would buy, while the real selection still runs (and is timed).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .. import attention as _attention
from ..layout import BlockLayout, causal_block_limits, diagonal_first_block

LayoutHook = Callable[[int | None, torch.Tensor, torch.Tensor, BlockLayout], BlockLayout]


def attention_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, module) of each self-attention module that carries a `layer_idx`."""
    return [(m.layer_idx, m) for m in model.modules()
            if "Attention" in type(m).__name__ and isinstance(getattr(m, "layer_idx", None), int)]


def num_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "num_hidden_layers", None) or (max(i for i, _ in attention_layers(model)) + 1)


@contextlib.contextmanager
def intercept_layouts(model: torch.nn.Module, hook: LayoutHook):
    """Route every layout the sparse path selects inside `model` through `hook(layer, q, k, layout)`."""
    current: dict[str, int | None] = {"layer": None}
    handles = [module.register_forward_pre_hook(lambda _m, _a, i=idx: current.__setitem__("layer", i))
               for idx, module in attention_layers(model)]
    original = _attention.select_blocks

    def select_blocks(q, k, *args, **kwargs):
        return hook(current["layer"], q, k, original(q, k, *args, **kwargs))

    _attention.select_blocks = select_blocks
    try:
        yield
    finally:
        _attention.select_blocks = original
        for handle in handles:
            handle.remove()


class LayoutRecorder:
    """Accumulates the density of each (layer, head) over the layouts it is shown.

    Density of one layout = kept blocks / causal blocks (the layout never keeps blocks above the
    diagonal). Batch rows are averaged; padding (key_range) is not subtracted.
    """

    def __init__(self, layers: int):
        self.layers = layers
        self._kept: dict[int, torch.Tensor] = {}
        self._total: dict[int, float] = {}

    def __call__(self, layer, q, k, layout: BlockLayout) -> BlockLayout:
        if layer is None:
            return layout
        _, _, n_qb, _ = layout.shape
        limits = causal_block_limits(n_qb, layout.block_size, q.shape[2], k.shape[2])  # on the host: no sync
        kept = layout.counts.sum(-1, dtype=torch.float32).mean(0)  # [H], stays on the device
        self._kept[layer] = self._kept.get(layer, 0) + kept
        self._total[layer] = self._total.get(layer, 0.0) + float(limits.sum())
        return layout

    def reset(self) -> None:
        self._kept.clear()
        self._total.clear()

    @property
    def sparse_layers(self) -> int:
        return len(self._kept)

    def layer_head_density(self) -> list[list[float] | None]:
        """Per layer, each head's density; None for layers that never ran the sparse path."""
        out: list[list[float] | None] = [None] * self.layers
        for layer, kept in self._kept.items():
            out[layer] = (kept.cpu() / self._total[layer]).tolist()
        return out

    def mean_density(self) -> float | None:
        """Average over every recorded layer and head (how ANCHORS.md reports density)."""
        rows = [h for heads in self.layer_head_density() if heads is not None for h in heads]
        return sum(rows) / len(rows) if rows else None


def random_layout(batch: int, heads: int, q_len: int, k_len: int, block_size: int, density: float,
                  device=None, seed: int = 0, sink_blocks: int = 1, local_blocks: int = 1) -> BlockLayout:
    """A causal layout keeping about `density` of each row's causal blocks, at random.

    The sink block(s), `local_blocks` before the diagonal and the diagonal are always kept (as the
    real selection does), so very low densities are raised to that floor.
    """
    n_qb, n_kb = -(-q_len // block_size), -(-k_len // block_size)
    limits = causal_block_limits(n_qb, block_size, q_len, k_len, device=device)[:, None]
    first_diag = diagonal_first_block(n_qb, block_size, q_len, k_len, device=device)[:, None]
    cols = torch.arange(n_kb, device=device)
    always = (cols < sink_blocks) | ((cols >= first_diag - local_blocks) & (cols < limits))
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(batch, heads, n_qb, n_kb, generator=generator, device=device)
    scores = torch.where(always, 2.0, torch.where(cols < limits, scores, -1.0))
    keep = torch.maximum(torch.ceil(density * limits), always.sum(-1, keepdim=True)).clamp(max=limits)
    rank = scores.argsort(-1, descending=True).argsort(-1)
    return BlockLayout.from_mask(rank < keep, block_size)


class ForcedDensity:
    """Replace layer i's layout by a random one of density `densities[i]` (cached per shape)."""

    def __init__(self, densities: list[float], seed: int = 0):
        self.densities = list(densities)
        self.seed = seed
        self._cache: dict[tuple, BlockLayout] = {}

    def __call__(self, layer, q, k, layout: BlockLayout) -> BlockLayout:
        if layer is None:
            return layout
        b, h, _, _ = layout.shape
        key = (layer, b, h, q.shape[2], k.shape[2], layout.block_size, q.device)
        if key not in self._cache:
            self._cache[key] = random_layout(b, h, q.shape[2], k.shape[2], layout.block_size,
                                             self.densities[layer], device=q.device, seed=self.seed + layer)
        return self._cache[key]


def resample_layers(values: list[float], layers: int) -> list[float]:
    """Stretch per-layer values onto `layers` layers by relative depth (linear interpolation)."""
    if not values:
        raise ValueError("No per-layer densities to resample.")
    if len(values) == layers:
        return list(values)
    out = []
    for i in range(layers):
        x = i * (len(values) - 1) / max(layers - 1, 1)
        lo = math.floor(x)
        hi = min(lo + 1, len(values) - 1)
        out.append(values[lo] + (x - lo) * (values[hi] - values[lo]))
    return out


def load_layer_densities(path: str | Path) -> list[float]:
    """Per-layer densities from a JSON file: a list of numbers, or an object with a "layers" list
    (what `sparse-prefill niah` writes as density.json; null entries, dense layers, count as 1.0)."""
    data = json.loads(Path(path).read_text())
    values = data.get("layers") if isinstance(data, dict) else data
    if not isinstance(values, list) or not values:
        raise ValueError(f"{path}: expected a JSON list of per-layer densities or an object with a \"layers\" list.")
    out = [1.0 if v is None else float(v) for v in values]
    if not all(0.0 < v <= 1.0 for v in out):
        raise ValueError(f"{path}: densities must be in (0, 1].")
    return out
