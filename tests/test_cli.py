"""`sparse-prefill` commands, run end to end on the embedded tiny model (CPU, seconds each)."""

import json

import pytest

from sparse_prefill.cli import build_parser, main
from sparse_prefill.eval.commands import parse_lengths

FAST = ["--min-budget-tokens", "64", "--no-progress"]


def test_help_lists_every_command(capsys):
    build_parser().print_help()
    out = capsys.readouterr().out
    for command in ("niah", "ruler", "ppl", "speed", "sweep", "fetch-model", "lm-eval"):
        assert command in out
    assert main([]) == 0


def test_lengths_accept_k_suffixes():
    assert parse_lengths("4k, 8192,0.5k") == [4096, 8192, 512]


def test_niah_writes_results_summary_heatmaps_and_density(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text("stale line from an earlier run\n")
    assert main(["niah", "--lengths", "384", "--depths", "0,1", "--out", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "sparse-prefill-tiny (random weights)" in out and "random weights" in out.splitlines()[-1]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and {r["mode"] for r in rows} == {"dense", "sparse"}  # stale line gone
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(s["length"], s["mode"]) for s in summary} == {(n, m) for n in (384,) for m in ("dense", "sparse")}
    for name in ("niah_heatmap.png", "density_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 2000
    assert len(json.loads((tmp_path / "density.json").read_text())["layers"]) == 2


def test_ruler_runs_the_asked_tasks(tmp_path, capsys):
    assert main(["ruler", "--tasks", "vt,cwe", "--lengths", "560", "--out", str(tmp_path), *FAST]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in rows}) == ["cwe", "vt"] and len(rows) == 4
    assert "cwe" in capsys.readouterr().out


def test_ppl_reports_dense_and_sparse_perplexity(tmp_path, capsys):
    assert main(["ppl", "--lengths", "256", "--out", str(tmp_path), *FAST]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["dense", "sparse"]
    # random weights over a 272-token vocabulary: perplexity near the vocabulary size, finite in both modes
    assert all(50 < r["ppl"] < 1000 for r in rows) and rows[1]["density"] is not None
    assert rows[0]["length"] == 256


def test_speed_times_attention_and_end_to_end_with_forced_density(tmp_path, capsys):
    assert main(["speed", "--lengths", "256", "--repeats", "1", "--densities", "0.5", "--out", str(tmp_path),
                 *FAST]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    variants = [(r["what"], r["variant"]) for r in rows]
    assert variants == [("attention", "dense sdpa"), ("attention", "sparse select"), ("attention", "sparse kernel"),
                        ("attention", "sparse total"), ("end-to-end", "dense sdpa"), ("end-to-end", "sparse")]
    e2e = rows[-1]
    assert e2e["note"] == "forced densities" and e2e["sparse_layers"] == 2 and e2e["density"] < 0.9
    assert isinstance(e2e["top1_match"], bool) and -1 <= e2e["logit_cosine"] <= 1.0001


def test_sweep_writes_the_accuracy_vs_speedup_curve(tmp_path, capsys):
    assert main(["sweep", "--gammas", "0.5,1.0", "--lengths", "384", "--depths", "0.5", "--out", str(tmp_path),
                 *FAST]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["gamma"] for p in summary["sparse"]] == [0.5, 1.0]
    assert summary["sparse"][0]["density"] < summary["sparse"][1]["density"] == pytest.approx(1.0)
    assert (tmp_path / "accuracy_vs_speedup.png").stat().st_size > 2000


def test_fetch_model_lists_the_pins(capsys):
    assert main(["fetch-model"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "qwen2.5-coder-1.5b-instruct" in out


def test_model_and_arch_together_is_an_error():
    with pytest.raises(ValueError, match="either --model"):
        main(["niah", "--model", "x", "--arch", "llama-3.1-8b", "--no-progress"])
