"""Runner, layout recording and forced densities on the tiny random model (CPU)."""

import json

import pytest
import torch

import sparse_prefill.attention as attention
from sparse_prefill import SparsePrefillConfig
from sparse_prefill.eval.archs import tiny_model
from sparse_prefill.eval.recording import (
    ForcedDensity,
    LayoutRecorder,
    intercept_layouts,
    load_layer_densities,
    random_layout,
    resample_layers,
)
from sparse_prefill.eval.runner import format_table, run_examples, summarize, write_density_json
from sparse_prefill.eval.tasks import make_examples
from sparse_prefill.patches import is_patched

CONFIG = SparsePrefillConfig(block_size=64, min_budget_tokens=64, min_seq_len=0, gamma=0.9)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(device="cpu")


@pytest.fixture(scope="module")
def rows(tiny, tmp_path_factory):
    model, tok = tiny
    examples = make_examples(["passkey"], tok, [320], depths=(0.0, 1.0))
    path = tmp_path_factory.mktemp("run") / "rows.jsonl"
    return run_examples(model, tok, examples, CONFIG, jsonl=path, progress=False), path


def test_every_example_runs_dense_and_sparse_and_is_written_as_json_lines(rows, tiny):
    rows, path = rows
    assert [(r["depth"], r["mode"]) for r in rows] == [(0.0, "dense"), (0.0, "sparse"), (1.0, "dense"), (1.0, "sparse")]
    assert [json.loads(line) for line in path.read_text().splitlines()] == json.loads(json.dumps(rows))
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0 and r["ttft_s"] > 0 and isinstance(r["answer"], str)
    assert not is_patched(tiny[0])  # the runner leaves the model as it found it
    assert attention.select_blocks.__module__ == "sparse_prefill.selection"  # and unwraps the selection


def test_sparse_rows_carry_the_density_the_selection_chose_per_layer_and_head(rows):
    sparse = [r for r in rows[0] if r["mode"] == "sparse"]
    for r in sparse:
        assert r["sparse_layers"] == 2
        assert len(r["layer_head_density"]) == 2 and all(len(h) == 4 for h in r["layer_head_density"])
        assert 0.0 < r["density"] <= 1.0
        flat = [d for heads in r["layer_head_density"] for d in heads]
        assert r["density"] == pytest.approx(sum(flat) / len(flat))


def test_recorded_density_matches_the_layouts_own_density():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 512, 16), torch.randn(1, 2, 512, 16)
    recorder = LayoutRecorder(layers=1)
    layout = attention.select_blocks(q, k, CONFIG)
    recorder(0, q, k, layout)
    assert recorder.mean_density() == pytest.approx(layout.density())
    assert recorder(None, q, k, layout) is layout and recorder.sparse_layers == 1


def test_summary_groups_rows_and_gives_the_speedup_over_dense(rows):
    summary = summarize(rows[0])
    assert [(s["mode"], s["n"]) for s in summary] == [("dense", 2), ("sparse", 2)]
    dense, sparse = summary
    assert sparse["speedup"] == pytest.approx(dense["ttft_s"] / sparse["ttft_s"]) and dense["speedup"] is None
    table = format_table(summary, ["task", "mode", "accuracy", "density", "speedup"])
    assert table.splitlines()[0].split() == ["task", "mode", "accuracy", "density", "speedup"]
    assert len(table.splitlines()) == 4 and "passkey" in table


def test_density_json_round_trips_into_forced_densities(rows, tmp_path):
    data = write_density_json(rows[0], tmp_path / "density.json", "tiny")
    assert len(data["layers"]) == 2 and len(data["layer_head"][0]) == 4
    assert load_layer_densities(tmp_path / "density.json") == data["layers"]


def test_intercept_reports_the_layer_and_can_replace_the_layout(tiny):
    model, _ = tiny
    seen = []
    forced = ForcedDensity([0.3, 0.6])

    def hook(layer, q, k, layout):
        seen.append(layer)
        return forced(layer, q, k, layout)

    recorder = LayoutRecorder(2)
    from sparse_prefill import patch_model, unpatch_model

    patch_model(model, CONFIG)
    try:
        with torch.inference_mode(), intercept_layouts(model, lambda *a: recorder(*a[:3], hook(*a))):
            model(input_ids=torch.randint(0, 256, (1, 512)), use_cache=False)
    finally:
        unpatch_model(model)
    assert seen == [0, 1]
    per_layer = [sum(h) / len(h) for h in recorder.layer_head_density()]
    expected = [random_layout(1, 4, 512, 512, 64, d, seed=layer).density() for layer, d in enumerate([0.3, 0.6])]
    assert per_layer == pytest.approx(expected)
    assert expected[0] < expected[1]


def test_random_layout_keeps_sink_and_diagonal_and_hits_the_density():
    layout = random_layout(1, 2, 4096, 4096, 64, 0.25, seed=1)
    mask = layout.to_mask()
    assert mask[..., 0].all() and mask.diagonal(dim1=-2, dim2=-1).all()
    assert not mask.triu(1).any()
    assert layout.density() == pytest.approx(0.25, abs=0.03)
    assert random_layout(1, 1, 1024, 1024, 64, 0.0).density() > 0  # floor: sink, local and diagonal


def test_resample_and_load_layer_densities(tmp_path):
    assert resample_layers([0.2, 0.4], 3) == pytest.approx([0.2, 0.3, 0.4])
    assert resample_layers([0.5], 4) == [0.5] * 4
    assert resample_layers([0.1, 0.2, 0.3], 3) == [0.1, 0.2, 0.3]
    (tmp_path / "a.json").write_text("[0.5, null]")
    assert load_layer_densities(tmp_path / "a.json") == [0.5, 1.0]
    (tmp_path / "b.json").write_text('{"layers": [1.5]}')
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        load_layer_densities(tmp_path / "b.json")
    (tmp_path / "c.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="layers"):
        load_layer_densities(tmp_path / "c.json")


def test_forced_argmax_reproduces_greedy_decoding_and_shows_where_a_forced_answer_departs(tiny):
    from sparse_prefill.eval.runner import forced_argmax, greedy_tokens, set_mode

    model, tok = tiny
    ids = list(torch.randint(5, 200, (300,), generator=torch.Generator().manual_seed(3)).tolist())
    for mode, config in (("dense", None), ("sparse", CONFIG)):
        set_mode(model, mode, config)
        tokens, _, _ = greedy_tokens(model, tok, ids, 6)
        assert 1 <= len(tokens) <= 6
        assert forced_argmax(model, ids, tokens) == tokens  # one chunk gives what the decode loop chose
        other = [(t + 1) % 200 for t in tokens]
        forced = forced_argmax(model, ids, other)
        assert forced[0] == tokens[0] and len(forced) == len(other)  # the first choice never sees the answer
        if len(tokens) > 1:
            set_mode(model, "dense", None)
            greedy_after_other = greedy_tokens(model, tok, ids + other[:1], 1)[0][0]
            set_mode(model, mode, config)
            if mode == "dense":  # after a forced wrong token the choice is what greedy makes of that prefix
                assert forced[1] == greedy_after_other
    set_mode(model, "dense", None)


def test_summary_counts_the_prompts_sparse_scored_below_dense_on():
    def row(mode, seed, score, **extra):
        return {"task": "niah_multikey", "length": 4096, "depth": 0.5, "seed": seed, "mode": mode, "score": score,
                "ttft_s": 1.0, **extra}

    rows = [row("dense", 0, 1.0), row("dense", 1, 1.0), row("dense", 2, 0.0), row("dense", 3, 0.5),
            row("sparse", 0, 1.0, gamma=0.9), row("sparse", 1, 0.0, gamma=0.9), row("sparse", 2, 1.0, gamma=0.9),
            row("sparse", 3, 0.25, gamma=0.9)]
    dense, sparse = summarize(rows)
    assert dense["lost"] is None
    assert sparse["lost"] == 2  # seeds 1 and 3; seed 2, which sparse gained, does not offset them
    assert sparse["accuracy"] == pytest.approx(dense["accuracy"] - 0.0625)
    assert summarize(rows[4:])[0]["lost"] is None  # no dense answers to compare with
