"""The three plots are written as non-empty PNG files, and refuse data they cannot draw."""

import pytest

from sparse_prefill.eval.plots import plot_accuracy_vs_speedup, plot_density_heatmap, plot_niah_heatmap

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 2000


def test_niah_heatmap_dense_and_sparse_side_by_side(tmp_path):
    rows = [{"mode": m, "length": n, "depth": d, "score": float((n + d * 10) % 2)}
            for m in ("dense", "sparse") for n in (1024, 4096) for d in (0.0, 0.5, 1.0)]
    assert _is_png(plot_niah_heatmap(rows, tmp_path / "sub" / "niah.png", "title"))
    with pytest.raises(ValueError, match="needle task"):
        plot_niah_heatmap([{"mode": "dense", "length": 1, "depth": None, "score": 1.0}], tmp_path / "x.png")


def test_accuracy_vs_speedup_curve(tmp_path):
    points = [{"label": f"g={g}", "accuracy": a, "speedup": s} for g, a, s in ((0.9, 0.8, 2.0), (0.99, 1.0, 1.2))]
    assert _is_png(plot_accuracy_vs_speedup(points, tmp_path / "curve.png", dense_accuracy=1.0))
    with pytest.raises(ValueError, match="at least one point"):
        plot_accuracy_vs_speedup([], tmp_path / "y.png")


def test_density_heatmap_leaves_dense_layers_blank(tmp_path):
    assert _is_png(plot_density_heatmap([[0.1, 0.9], None, [0.5, 0.5]], tmp_path / "density.png"))
    with pytest.raises(ValueError, match="at least one sparse layer"):
        plot_density_heatmap([None, None], tmp_path / "z.png")


def test_density_heatmap_of_a_small_model_fits_its_canvas(tmp_path, monkeypatch):
    """2 layers x 4 heads (the tiny model) with the CLI's title: title, axes and colour bar inside the figure."""
    from matplotlib.text import Text

    from sparse_prefill.eval import plots

    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: None)  # keep the figure to measure it
    path = plot_density_heatmap([[0.1, 0.4, 0.6, 0.9], [0.5, 0.5, 0.7, 1.0]], tmp_path / "density.png",
                                "sparse-prefill-tiny (random weights): density per layer x head")
    assert _is_png(path)
    (fig,) = drawn
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)  # runs the layout
    canvas, ink = fig.bbox, fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # both in pixels
    assert canvas.x0 - 1 <= ink.x0 and ink.x1 <= canvas.x1 + 1, (ink, canvas)
    assert canvas.y0 - 1 <= ink.y0 and ink.y1 <= canvas.y1 + 1, (ink, canvas)
    (title,) = [t for t in fig.findobj(Text) if "sparse-prefill-tiny" in t.get_text()]
    colorbar = fig.axes[-1]
    assert len(fig.axes) == 2 and colorbar.get_ylabel().startswith("kept")  # the heatmap and its colour bar
    for artist in (title, colorbar):
        box = artist.get_window_extent(renderer)
        assert canvas.x0 - 1 <= box.x0 and box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1, (artist, box)
    assert fig.get_figwidth() >= 4 and fig.get_figheight() >= 3
