"""`sparse-prefill demo`: the synthetic problem on CPU shows real selection structure; the model path runs end to
end; which path runs, and what is downloaded, follows the device and the cache (the CUDA checks are mocked)."""

import json
import re

import pytest
import torch

from sparse_prefill.cli import main
from sparse_prefill.config import SparsePrefillConfig
from sparse_prefill.eval import demo, models
from sparse_prefill.eval.options import DEFAULTS, TINY_PRESET
from sparse_prefill.eval.recall import POLICIES, LayerQK, exact_block_mass
from sparse_prefill.eval.synthetic import make_problem
from sparse_prefill.selection import select_blocks

PIN = DEFAULTS["demo"].model


def test_the_cpu_demo_finds_the_needles_in_a_sparse_layout(tmp_path, monkeypatch, capsys):
    """What the first command shows without a GPU: most blocks dropped, nearly all the attention captured, the
    needles' blocks kept, a picture with structure, the folder named and a table last."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"output folder: {tmp_path}" in out
    last = out.strip().splitlines()
    assert last[-1].split()[0] == "all" and "needle reads kept" in last[-7]  # the table comes last
    result = json.loads((tmp_path / "demo.json").read_text())
    heads = result["heads"]
    assert result["density"] < 0.6 and result["captured"] > 0.97
    assert heads[0]["density"] < 0.25 < heads[-1]["density"]  # the sharpest head keeps fewest blocks
    reads = sum(h["needle_reads"] for h in heads)
    assert reads >= 100 and sum(h["needle_reads_kept"] for h in heads) >= 0.9 * reads
    for point in result["curves"]["ours"]:  # the gamma sweep: more gamma, more blocks, more mass
        assert 0 < point["density"] < 1
    assert [p["density"] for p in result["curves"]["ours"]] == sorted(p["density"] for p in result["curves"]["ours"])
    assert (tmp_path / "kept_blocks.png").stat().st_size > 50_000  # four heads x two maps and a curve, not blank


def test_the_estimate_alone_finds_every_needle_the_later_rows_read():
    """With the structural keeps off (no exact tail, no question columns, no minimum), the blocks where the
    question and the mentions read each needle are still kept: the estimate finds them, not a rule. (A row may
    drop up to 1 - gamma of its mass, so the reads asked for hold twice that.)"""
    problem = make_problem(4096)
    config = SparsePrefillConfig(block_size=64, min_budget_tokens=0, exact_tail_tokens=0, question_blocks=0,
                                 min_seq_len=0)
    mask = select_blocks(problem.q, problem.k, config).to_mask()[0]
    mass = exact_block_mass(problem.q, problem.k, 64)[0]
    reads = problem.reads(64) & (mass >= 2 * (1 - config.gamma))
    assert reads.sum() >= 40 and reads[:, :-4].any()  # mentions too, not only the question's rows
    assert (mask & reads).sum() == reads.sum()
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    assert mask.sum() < 0.5 * causal.sum() * mask.shape[0]


def test_the_curve_of_the_demo_is_the_librarys_selection():
    """The demo draws its gamma sweep through recall.py's policy; at the run's gamma it must be the layout
    `select_blocks` chose, or the star would not sit on the curve."""
    problem = make_problem(2048)
    config = SparsePrefillConfig(**TINY_PRESET, min_seq_len=0)
    layer = LayerQK(problem.q, problem.k, problem.q.shape[-1] ** -0.5)
    mass = exact_block_mass(layer.q, layer.k, config.block_size, layer.scale)
    curve = POLICIES["ours"](layer, config, mass)(config.gamma)
    torch.testing.assert_close(curve, select_blocks(problem.q, problem.k, config).to_mask())


def test_the_model_demo_runs_end_to_end_on_cpu(tmp_path, capsys):
    """The path a GPU takes with the pinned model, here on the tiny random model: answers, density, pictures."""
    assert main(["demo", "--model", "sparse-prefill-tiny", "--length", "1024", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^right: dense \d of 3, sparse \d of 3; kept \d+\.\d% of the blocks; median TTFT", out, re.M)
    assert "random weights" in out
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted({r["depth"] for r in rows}) == list(DEFAULTS["demo"].depths) and len(rows) == 6
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["kind"] == "model" and len(result["heads"]) == len(result["shown_heads"]) == 4
    assert result["length"] == 1024 and 0 <= result["layer"] < 2
    for name in ("kept_blocks.png", "density_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert len(json.loads((tmp_path / "density.json").read_text())["layer_head"]) == 2  # the tiny model's layers


# ---------------------------------------------------------------- which path, what is downloaded (mocked)

@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine, as far as the demo's choice of path can tell; the paths themselves are recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    taken = []
    monkeypatch.setattr(demo, "synthetic_demo", lambda args, defaults: taken.append(("synthetic",)) or 0)
    monkeypatch.setattr(demo, "model_demo", lambda args, name, device, defaults: taken.append(("model", name,
                                                                                                device.type)) or 0)
    monkeypatch.setattr(models, "fetch_model", lambda *a, **k: pytest.fail("downloaded without --fetch"))
    return taken


def test_on_a_gpu_without_the_model_the_demo_says_how_to_fetch_it_and_downloads_nothing(gpu, tmp_path, monkeypatch,
                                                                                           capsys):
    monkeypatch.setenv("SPARSE_PREFILL_CACHE", str(tmp_path))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    size = f"{models.PINS[PIN].size / 2**20:.0f} MiB"
    assert f"{PIN} is not in the cache" in out and "`sparse-prefill demo --fetch`" in out and size in out
    assert gpu == [("synthetic",)]
    assert main(["demo", "--model", PIN]) == 2  # asked for by name, still not downloaded
    assert "sparse-prefill demo --fetch" in capsys.readouterr().err


def test_on_a_gpu_the_demo_runs_the_cached_model_or_fetches_it_when_asked(gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_PREFILL_CACHE", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / f"{PIN}.gguf").write_bytes(b"cached")
    assert main(["demo"]) == 0 and main(["demo", "--synthetic", "--model", PIN]) == 0
    assert main(["demo", "--device", "cpu"]) == 0
    assert gpu == [("model", PIN, "cuda"), ("synthetic",), ("synthetic",)]
    (tmp_path / "models" / f"{PIN}.gguf").unlink()
    gpu.clear()
    fetched = []
    monkeypatch.setattr(demo, "_fetch", fetched.append)
    assert main(["demo", "--fetch"]) == 0 and fetched == [PIN] and gpu == [("model", PIN, "cuda")]
