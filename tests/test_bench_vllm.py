"""bench/bench_vllm.py's wiring on a CPU, without vLLM: argument parsing, the plan, one worker process per engine,
pairing, tables and JSON, with the stand-in engine (`--engine stub`). The GPU run must not fail on a typo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from model_zoo import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_vllm.py"
STUB = ["--models", "sparse-prefill-tiny", "--engine", "stub", "--lengths", "2k,3k", "--mixed-long", "2k",
        "--short", "2", "--short-length", "600", "--seeds", "1", "--tasks", "niah_single,niah_multikey"]


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_help_and_parsing_need_no_vllm(bench):
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--stages" in out.stdout and "CUSTOM" in out.stdout
    args = bench.parse_args(["--lengths", "32k,64k,128k", "--config", "gamma=0.9"])
    assert args.lengths == [32768, 65536, 131072] and args.stages == list(bench.STAGES)
    assert "vllm" not in sys.modules
    with pytest.raises(ValueError, match="gama"):  # a config typo fails before any engine starts
        bench.parse_args(["--config", "gama=0.9"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--stages", "ttft,speed"])


def run(tmp_path, *extra, env=None):
    proc = subprocess.run([sys.executable, str(SCRIPT), *STUB, "--out", str(tmp_path), *extra], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, **(env or {})})
    return proc, json.loads((tmp_path / "vllm.json").read_text())


def test_stub_run_fills_every_stage_table_and_the_summary(tmp_path):
    proc, results = run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model = results["models"]["sparse-prefill-tiny"]
    assert set(model["FLASH_ATTN"]["stages"]) == {"ttft", "answers", "mixed", "yarn"}  # yarn: dense's only

    assert set(model["CUSTOM"]["stages"]) == {"ttft", "gather", "answers", "mixed"}  # gather: CUSTOM's only
    tables = model["tables"]
    assert [row["speedup"] for row in tables["ttft"]] == [2.0, 2.0]  # the stub's CUSTOM prefills twice as fast
    assert [row["gather_share"] for row in tables["ttft"]] == pytest.approx([0.1, 0.1])
    assert [row["prompts"] for row in tables["answers"]] == [2, 2]  # two tasks x one seed per length
    assert tables["mixed"][1]["same_tokens"] == "3 of 3"
    assert results["summary"][0]["ttft_x_3k"] == 2.0
    assert proc.stdout.rstrip().splitlines()[-1].startswith("written:") and "summary" in proc.stdout


def test_a_failed_engine_costs_only_its_own_figures(tmp_path):
    proc, results = run(tmp_path, env={"BENCH_VLLM_STUB_FAIL": "CUSTOM"})
    assert proc.returncode == 1
    model = results["models"]["sparse-prefill-tiny"]
    assert "told to fail" in model["CUSTOM"]["errors"]["engine"]
    assert [row["dense_s"] is not None and row["sparse_s"] is None for row in model["tables"]["ttft"]] == [True] * 2


def test_stages_past_the_time_limit_are_recorded_as_skipped(tmp_path):
    proc, results = run(tmp_path, "--time-limit", "0", "--stages", "ttft")
    assert proc.returncode == 1
    errors = results["models"]["sparse-prefill-tiny"]["FLASH_ATTN"]["errors"]
    assert errors["ttft"].startswith("skipped: out of time")


def test_yarn_reaches_vllm_as_config_fields(bench, tmp_path):
    """vLLM applies a callable hf_overrides to configs that have no trained context too (it failed there on an
    H200 GPU); the bench hands it the fields YaRN changes instead, computed from the model's own config."""
    from model_zoo import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m", "qwen2", max_position_embeddings=1024)
    overrides = bench.yarn_overrides(folder, 4.0)
    assert overrides["max_position_embeddings"] == 4096
    rope = overrides.get("rope_parameters") or overrides["rope_scaling"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["original_max_position_embeddings"] == 1024
