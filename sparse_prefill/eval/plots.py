"""The pictures users decide with (matplotlib, PNG, headless).

- NIAH accuracy over context length x needle depth, dense and sparse side by side.
- Accuracy against prefill speedup over dense, one point per gamma (the trade-off curve).
- Density per layer x head: where the sparse path keeps more or fewer blocks.
- Kept blocks per head next to the exact attention, needle reads marked (the demo's picture).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _grid(rows: list[dict], mode: str, lengths: list[int], depths: list[float]) -> list[list[float | None]]:
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        if r["mode"] == mode and r.get("depth") is not None:
            cells.setdefault((r["depth"], r["length"]), []).append(r["score"])
    return [[(sum(v) / len(v)) if (v := cells.get((d, n))) else None for n in lengths] for d in depths]


def plot_niah_heatmap(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy per (depth, length): one panel per mode present in `rows`, shared colour scale."""
    modes = [m for m in ("dense", "sparse") if any(r["mode"] == m for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows if r.get("depth") is not None})
    if not modes or not depths:
        raise ValueError("plot_niah_heatmap needs rows of a needle task (with depths) in dense or sparse mode.")
    size = (max(6.0, 1.5 + 1.1 * len(lengths) * len(modes)), max(3.0, 1.6 + 0.45 * len(depths)))
    fig, axes = plt.subplots(1, len(modes), figsize=size, squeeze=False, constrained_layout=True)
    image = None
    for ax, mode in zip(axes[0], modes, strict=True):
        grid = _grid(rows, mode, lengths, depths)
        values = [[float("nan") if v is None else v for v in row] for row in grid]
        image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(mode)
    axes[0][0].set_ylabel("needle depth")
    fig.supxlabel("context length (tokens)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_accuracy_vs_speedup(points: list[dict], path: str | Path, dense_accuracy: float | None = None,
                             title: str = "") -> Path:
    """points: dicts with speedup, accuracy and a label (e.g. gamma); dense is the point (1, dense_accuracy)."""
    if not points:
        raise ValueError("plot_accuracy_vs_speedup needs at least one point.")
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    ordered = sorted(points, key=lambda p: p["speedup"])
    ax.plot([p["speedup"] for p in ordered], [p["accuracy"] for p in ordered], "o-", label="sparse prefill")
    for p in ordered:
        ax.annotate(str(p.get("label", "")), (p["speedup"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if dense_accuracy is not None:
        ax.plot([1.0], [dense_accuracy], "s", color="black", label="dense")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("prefill speedup over dense (TTFT ratio)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_density_heatmap(layer_head: list[list[float] | None], path: str | Path, title: str = "") -> Path:
    """Density per (layer, head); layers that stayed dense are blank."""
    if not layer_head or all(row is None for row in layer_head):
        raise ValueError("plot_density_heatmap needs densities of at least one sparse layer.")
    heads = max(len(row) for row in layer_head if row is not None)
    values = [[float("nan")] * heads if row is None else row for row in layer_head]
    # at least 4.8 x 3.2 inches, so that a small model's title, labels and colour bar have room
    width, height = max(4.8, 2.4 + 0.25 * heads), max(3.2, 1.6 + 0.2 * len(values))
    fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="kept causal blocks (density)")
    if title:  # over the whole figure, wrapped to its width (about 12 characters per inch at 10 pt)
        fig.suptitle(textwrap.fill(title, width=max(24, int(12 * (width - 0.4)))), fontsize=10)
    return _save(fig, path)


def plot_kept_blocks(mass, mask, reads, head_titles: list[str], path: str | Path, title: str = "",
                     curves: dict | None = None, point: tuple[float, float] | None = None) -> Path:
    """Per head, the exact attention (mean mass of each query block in each key block, log scale) over the
    blocks the selection kept: kept in grey, needle reads (`reads`, bool [H, Qb, Kb]) kept in green and
    dropped in red. `curves` ({"ours": [...], "oracle": [...]}, points with density and captured) adds a panel of
    captured mass against kept share, with the run's own `point` (density, captured) marked."""
    import numpy as np

    heads = len(head_titles)
    extra = 1 if curves else 0
    fig = plt.figure(figsize=(2.9 * heads + 3.6 * extra, 6.4), constrained_layout=True)
    grid = fig.add_gridspec(2, heads + extra, width_ratios=[1] * heads + [1.25] * extra)
    image = None
    for h, head_title in enumerate(head_titles):
        top, bottom = fig.add_subplot(grid[0, h]), fig.add_subplot(grid[1, h])
        exact = np.log10(np.maximum(np.asarray(mass[h], dtype=float), 1e-5))
        exact[np.triu(np.ones_like(exact, dtype=bool), 1)] = np.nan
        image = top.imshow(exact, cmap="magma", vmin=-5, vmax=0, interpolation="nearest")
        top.set_title(head_title, fontsize=9)
        kept = np.asarray(mask[h], dtype=bool)
        needle = np.asarray(reads[h], dtype=bool) if reads is not None else np.zeros_like(kept)
        rgb = np.ones(kept.shape + (3,))
        rgb[kept] = (0.45, 0.45, 0.45)
        rgb[needle & kept] = (0.1, 0.7, 0.2)
        rgb[needle & ~kept] = (0.9, 0.1, 0.1)
        bottom.imshow(rgb, interpolation="nearest")
        bottom.set_title(f"kept {kept.sum() / np.tril(np.ones_like(kept)).sum():.0%} of the blocks", fontsize=9)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
        bottom.set_xlabel("key block", fontsize=8)
    fig.axes[0].set_ylabel("query block\n(exact attention)", fontsize=8)
    fig.axes[1].set_ylabel("query block\n(kept blocks)", fontsize=8)
    fig.colorbar(image, ax=fig.axes[0::2], location="top", shrink=0.5, label="log10 of the mean attention mass "
                 "(green: needle read kept, red: dropped)")
    if curves:
        ax = fig.add_subplot(grid[:, heads])
        for name, style in (("ours", "o-"), ("oracle", "s:")):
            points = sorted(curves.get(name, []), key=lambda p: p["density"])
            ax.plot([p["density"] for p in points], [p["captured"] for p in points], style,
                    label={"ours": "the selection (gamma sweep)", "oracle": "exact per-row oracle"}[name])
        if point:
            ax.plot(*point, "*", ms=14, color="tab:red", label="this run")
        ax.set_xlabel("kept share of the causal blocks")
        ax.set_ylabel("captured attention mass")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.05)  # never cut what sticks out
    plt.close(fig)
    return path
