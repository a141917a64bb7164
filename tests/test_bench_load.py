"""bench/bench_load.py: the trace, the metrics on synthetic records, the vLLM command lines (vLLM cannot run here),
a server that fails or hangs, and one end-to-end run of the script's CPU check against real `transformers serve`
and `sparse-prefill serve` processes (a few requests, toy lengths, every wait bounded)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from model_zoo import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_load.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def make_trace(bench, **changes):
    options = dict(requests=40, rate=2.0, long_lengths=[32768, 65536, 131072], short_range=(512, 4096),
                   new_tokens_range=(64, 256), tasks=["niah_single", "niah_multikey"], seed=0)
    return bench.make_trace(**{**options, **changes})


# ------------------------------------------------------------------------------------------------
# The trace
# ------------------------------------------------------------------------------------------------

def test_the_trace_is_deterministic_and_as_asked(bench):
    trace = make_trace(bench)
    assert trace == make_trace(bench) and trace != make_trace(bench, seed=1)
    assert [r["id"] for r in trace] == list(range(40))
    arrivals = [r["arrival_s"] for r in trace]
    assert arrivals[0] == 0 and all(b > a for a, b in zip(arrivals, arrivals[1:], strict=False))
    longs = [r for r in trace if r["kind"] == "long"]
    shorts = [r for r in trace if r["kind"] == "short"]
    assert len(longs) == 10 and len(shorts) == 30
    assert {r["length"] for r in longs} <= {32768, 65536, 131072}
    assert all(512 <= r["length"] <= 4096 for r in shorts) and len({r["length"] for r in shorts}) > 20
    assert all(64 <= r["new_tokens"] <= 256 for r in trace)
    assert [r["task"] for r in longs] == ["niah_single", "niah_multikey"] * 5
    assert all(0.05 <= r["depth"] <= 0.95 for r in longs)


def test_arrivals_are_a_poisson_process_at_the_rate(bench):
    trace = make_trace(bench, requests=4000, rate=2.0)
    gaps = [b["arrival_s"] - a["arrival_s"] for a, b in zip(trace, trace[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.05)  # exponential gaps: sd = mean
    assert sum(r["kind"] == "long" for r in trace) == 1000
    assert {r["length"] for r in trace if r["kind"] == "long"} == {32768, 65536, 131072}


def test_another_rate_gives_the_same_requests_on_a_scaled_clock(bench):
    """So that runs at the rate each engine family needs replay the same requests."""
    slow, fast = make_trace(bench, rate=1.0), make_trace(bench, rate=4.0)
    assert [{**r, "arrival_s": None} for r in slow] == [{**r, "arrival_s": None} for r in fast]
    assert [r["arrival_s"] / 4 for r in slow] == pytest.approx([r["arrival_s"] for r in fast])


def test_prompts_are_retrieval_prompts_and_filler_at_their_lengths(bench):
    from sparse_prefill.eval.archs import byte_tokenizer

    tok = byte_tokenizer()
    trace = make_trace(bench, requests=8, long_lengths=[1024, 2048], short_range=(100, 300))
    prompts = bench.build_prompts(trace, tok)
    assert bench.build_prompts(trace, tok) == prompts
    for item, prompt in zip(trace, prompts, strict=True):
        assert prompt["prompt_tokens"] == len(tok(prompt["text"])["input_ids"])
        assert abs(prompt["prompt_tokens"] - item["length"]) <= 3  # a character cut at the edge re-encodes longer
        if item["kind"] == "long":
            assert prompt["answers"] and all(a in prompt["text"] for a in prompt["answers"])
        else:
            assert prompt["answers"] == []
    assert len({p["text"] for p in prompts}) == len(prompts)


def test_the_plan_fits_the_context_and_sizes_the_cache(bench):
    from sparse_prefill.eval.archs import byte_tokenizer

    def plan(*extra):
        args = bench.parse_args(["--model", "m", "--long-lengths", "1k,3k", "--short-range", "100-200",
                                 "--new-tokens-range", "4-8", *extra])
        return bench.make_plan(args, byte_tokenizer(), context=2048)

    small = plan("--requests", "8")
    assert small["long_lengths"] == [1024, 2048 - 8 - 64]  # cut so that prompt and answer fit the context
    sizes = [p["prompt_tokens"] + r["new_tokens"] for r, p in zip(small["trace"], small["prompts"], strict=True)]
    assert small["max_model_len"] == min(max(sizes) + 64, 2048) and max(sizes) <= 2048
    assert small["cache_tokens"] == sum(sizes) + 256 * 8  # all of it at once: less than four of the longest
    large = plan("--requests", "24")
    assert large["cache_tokens"] == 4 * (large["max_model_len"] + 256)
    assert plan("--requests", "24", "--cb-cache-tokens", "5000")["cache_tokens"] == 5000
    assert [w["new_tokens"] for w in small["warm_up"]] == [2, 2]
    assert {w["kind"] for w in small["warm_up"]} == {"short", "long"}
    assert not {p["text"] for p in small["warm_up_prompts"]} & {p["text"] for p in small["prompts"]}


# ------------------------------------------------------------------------------------------------
# Metrics on synthetic records
# ------------------------------------------------------------------------------------------------

def test_percentiles_interpolate_between_ranks(bench):
    assert bench.percentile([4, 1, 3, 2], 50) == 2.5
    assert bench.percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert bench.percentile([7.0], 90) == 7.0 and bench.percentile([], 50) is None
    values = [0.3, 1.9, 0.2, 5.0, 2.2, 0.7, 1.1]
    assert bench.percentile(values, 90) == pytest.approx(statistics.quantiles(values, n=10, method="inclusive")[-1])


TRACE = [{"id": 0, "kind": "long", "arrival_s": 0.0, "new_tokens": 10},
         {"id": 1, "kind": "short", "arrival_s": 0.5, "new_tokens": 10},
         {"id": 2, "kind": "long", "arrival_s": 1.0, "new_tokens": 10},
         {"id": 3, "kind": "short", "arrival_s": 1.5, "new_tokens": 10}]
PROMPTS = [{"answers": ["1234"], "prompt_tokens": 900}, {"answers": [], "prompt_tokens": 50},
           {"answers": ["5678"], "prompt_tokens": 900}, {"answers": [], "prompt_tokens": 60}]


def record(i, ttft, finished, text="", tokens=10, error=None, sent=None, prompt_tokens=None):
    sent = TRACE[i]["arrival_s"] if sent is None else sent
    return {"id": i, "sent_s": sent, "first_token_s": sent + ttft, "ttft_s": ttft, "finished_s": finished,
            "output_tokens": tokens, "text": text, "error": error,
            "server_prompt_tokens": PROMPTS[i]["prompt_tokens"] if prompt_tokens is None else prompt_tokens}


DENSE = [record(0, 2.0, 3.0, "the number is 1234"), record(1, 0.1, 1.0), record(2, 4.0, 6.0, "no idea"),
         record(3, 0.3, 2.0)]
SPARSE = [record(0, 1.0, 2.0, "the number is 4321"), record(1, 0.1, 1.0, tokens=7),
          record(2, 1.0, 3.0, "it is 5678"), record(3, 0.2, 9.0, error="cut after 5 s", prompt_tokens=61)]


def test_engine_metrics_from_records(bench):
    dense = bench.engine_metrics(TRACE, PROMPTS, DENSE)
    assert (dense["done"], dense["makespan_s"], dense["output_tokens"]) == (4, 6.0, 40)
    assert dense["output_tps"] == pytest.approx(40 / 6) and dense["requests_per_s"] == pytest.approx(4 / 6)
    assert dense["ttft_long_p50_s"] == pytest.approx(3.0) and dense["ttft_long_p90_s"] == pytest.approx(3.8)
    assert dense["ttft_short_p50_s"] == pytest.approx(0.2) and dense["ttft_short_p90_s"] == pytest.approx(0.28)
    assert dense["answers"] == "1/2" and dense["short_outputs"] == 0 and dense["prompt_tokens_differ"] == 0
    sparse = bench.engine_metrics(TRACE, PROMPTS, SPARSE)  # the cut request counts nowhere
    assert (sparse["done"], sparse["makespan_s"], sparse["output_tokens"]) == (3, 3.0, 27)
    assert sparse["ttft_short_p90_s"] == pytest.approx(0.1) and sparse["short_outputs"] == 1
    assert sparse["answers"] == "1/2" and sparse["prompt_tokens_differ"] == 0


def test_summary_speedups_and_answers_pair_within_a_family(bench):
    results = {"transformers:dense": {"status": "ok", "records": DENSE},
               "transformers:sparse": {"status": "1 failed", "records": SPARSE},
               "vllm:FLASH_ATTN": {"status": "failed", "error": "no GPU"},
               "vllm:CUSTOM": {"status": "ok", "records": DENSE}}
    rows = {row["engine"]: row for row in bench.summary_rows(results, TRACE, PROMPTS)}
    sparse = rows["transformers:sparse"]
    assert sparse["done"] == "3/4" and (sparse["paired"], sparse["lost"], sparse["gained"]) == (2, 1, 1)
    assert sparse["long_p50_x"] == pytest.approx(3.0) and sparse["long_p90_x"] == pytest.approx(3.8)
    assert sparse["short_p50_x"] == pytest.approx(2.0)
    assert sparse["output_tps_x"] == pytest.approx((27 / 3) / (40 / 6))
    assert "long_p50_x" not in rows["transformers:dense"] and "lost" not in rows["transformers:dense"]
    # vLLM's sparse engine pairs with vLLM's dense engine only, which failed: nothing to compare
    assert "long_p50_x" not in rows["vllm:CUSTOM"] and "lost" not in rows["vllm:CUSTOM"]
    assert rows["vllm:FLASH_ATTN"] == {"engine": "vllm:FLASH_ATTN", "status": "failed"}


# ------------------------------------------------------------------------------------------------
# Server command lines
# ------------------------------------------------------------------------------------------------

def option(command, name):
    return command[command.index(name) + 1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model_zoo import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("qwen") / "m", "qwen2", max_position_embeddings=1024)


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "CUSTOM"])
def test_vllm_command_line(bench, checkpoint, backend):
    overrides = bench.yarn_overrides(checkpoint, 4.0)
    command = bench.vllm_command(checkpoint, backend, 8123, 4160, 0.6, overrides, enforce_eager=True)
    assert command[:2] == [sys.executable, "-c"] and "vllm.entrypoints.cli.main import main" in command[2]
    assert command[3:5] == ["serve", checkpoint]
    assert (option(command, "--attention-backend"), option(command, "--max-model-len"),
            option(command, "--gpu-memory-utilization"), option(command, "--host"), option(command, "--port")) == \
        (backend, "4160", "0.6", "127.0.0.1", "8123")
    assert "--no-enable-prefix-caching" in command and "--enforce-eager" in command
    hf = json.loads(option(command, "--hf-overrides"))
    assert hf == json.loads(json.dumps(overrides)) and hf["max_position_embeddings"] == 4096
    rope = hf.get("rope_parameters") or hf["rope_scaling"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 1024)
    plain = bench.vllm_command(checkpoint, backend, 1, 2048, 0.9)
    assert not {"--hf-overrides", "--enforce-eager", "--max-num-batched-tokens"} & set(plain)
    chunked = bench.vllm_command(checkpoint, backend, 1, 2048, 0.9, max_num_batched_tokens=16384)
    assert option(chunked, "--max-num-batched-tokens") == "16384"


def test_each_engine_gets_its_command_and_environment(bench, checkpoint, monkeypatch):
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    args = bench.parse_args(["--model", checkpoint, "--yarn", "4", "--config", "gamma=0.9,min_seq_len=1024",
                             "--vllm-path", "/opt/vsite", "--device", "cuda", "--chunk", "4096"])
    folders = {"vllm": checkpoint, "transformers": "/tmp/served"}
    launch = {e: bench.server_launch(e, args, folders, 8000, 5000, 100_000) for e in bench.ENGINES}
    for backend, config in (("FLASH_ATTN", ""), ("CUSTOM", "gamma=0.9,min_seq_len=1024")):
        command, env = launch[f"vllm:{backend}"]
        assert option(command, "--attention-backend") == backend and "--hf-overrides" in command
        assert env["SPARSE_PREFILL_CONFIG"] == config
        assert (env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"], env["VLLM_USE_FLASHINFER_SAMPLER"]) == ("1", "0")
        assert env["PYTHONPATH"].split(os.pathsep)[:2] == ["/opt/vsite", str(ROOT)]
    dense, sparse = launch["transformers:dense"][0], launch["transformers:sparse"][0]
    assert "transformers.cli.transformers" in dense[2] and dense[3:5] == ["serve", "/tmp/served"]
    assert sparse[1:4] == ["-m", "sparse_prefill.cli", "serve"]
    assert sparse[4:8] == ["--gamma", "0.9", "--min-seq-len", "1024"] and "--gamma" not in dense
    assert sparse[8:] == dense[4:]  # the same server flags otherwise
    assert "--continuous-batching" in dense and option(dense, "--cb-max-batch-tokens") == "4096"
    assert (option(dense, "--max-model-len"), option(dense, "--device"), option(dense, "--dtype")) == \
        ("5000", "cuda", "bfloat16")
    with pytest.raises(RuntimeError, match="Hugging Face folder"):
        bench.server_launch("vllm:CUSTOM", args, {"vllm": None, "transformers": "/tmp/x"}, 1, 2, 3)


# ------------------------------------------------------------------------------------------------
# A server that fails, or never answers: recorded, and stopped with everything it started
# ------------------------------------------------------------------------------------------------

def fake_engine(bench, monkeypatch, tmp_path, code, start_timeout=60.0):
    args = bench.parse_args(["--model", "m", "--start-timeout", str(start_timeout)])
    monkeypatch.setattr(bench, "server_launch", lambda *a: ([sys.executable, "-c", code], dict(os.environ)))
    plan = {"max_model_len": 1, "cache_tokens": 1}
    return bench.run_engine("vllm:CUSTOM", args, {"vllm": "m"}, plan, deadline=9e9, out=tmp_path)


def test_a_server_that_stops_while_starting_is_recorded(bench, monkeypatch, tmp_path):
    result = fake_engine(bench, monkeypatch, tmp_path, "import sys; print('no vllm here'); sys.exit(3)")
    assert result["status"] == "failed" and "records" not in result
    assert "stopped while starting (exit 3)" in result["error"] and "no vllm here" in result["error"]
    assert Path(result["log"]).read_text().strip() == "no vllm here"


def test_a_server_that_never_answers_is_stopped_with_its_children(bench, monkeypatch, tmp_path):
    pids = tmp_path / "pids"
    code = ("import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); "
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); time.sleep(600)")
    result = fake_engine(bench, monkeypatch, tmp_path, code, start_timeout=3)
    assert result["status"] == "failed" and "did not answer within 3 s" in result["error"]
    for pid in map(int, pids.read_text().split()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue  # gone
        assert state == "Z", f"process {pid} still runs"  # ended, not yet reaped by init


# ------------------------------------------------------------------------------------------------
# The CPU check, end to end: real servers on localhost
# ------------------------------------------------------------------------------------------------

CHECK = ["--model", "sparse-prefill-tiny", "--engines", "transformers:dense,transformers:sparse", "--requests", "5",
         "--long-lengths", "2k", "--short-range", "128-400", "--new-tokens-range", "4-8", "--rate", "2",
         "--config", "min_seq_len=1024", "--chunk", "512", "--start-timeout", "240", "--request-timeout", "120",
         "--time-limit", "500"]


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    pytest.importorskip("openai", reason="the serve extra is not installed: pip install -e '.[serve]'")
    from transformers.utils.import_utils import is_serve_available

    from sparse_prefill.patches import serve as serve_glue

    if not is_serve_available():
        pytest.skip("transformers serve's dependencies are missing")
    try:
        serve_glue.check_version()
    except RuntimeError as err:  # sparse-prefill serve refuses this transformers: nothing to serve
        pytest.skip(str(err))
    out = tmp_path_factory.mktemp("load")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(out)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *CHECK], capture_output=True, text=True, timeout=560,
                          env=env, cwd=ROOT)
    return proc, out


def test_the_cpu_check_replays_the_trace_on_both_servers(cpu_check):
    proc, out = cpu_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "load.json").read_text())
    trace = results["trace"]
    assert len(trace) == 5 and sum(r["kind"] == "long" for r in trace) == 1
    assert len(json.loads((out / "load_trace.json").read_text())) == 5
    for engine in ("transformers:dense", "transformers:sparse"):
        run = results["engines"][engine]
        assert run["status"] == "ok", run.get("error")
        records = {r["id"]: r for r in run["records"]}
        assert sorted(records) == [r["id"] for r in trace]
        for item in trace:
            r = records[item["id"]]
            assert r["error"] is None and 0 < r["ttft_s"] <= r["finished_s"] - r["sent_s"]
            assert r["sent_s"] >= item["arrival_s"] - 0.01  # sent at its arrival time, not before
            assert r["output_tokens"] == item["new_tokens"] and r["tokens_from"] == "usage"  # no end token: forced
            assert r["server_prompt_tokens"] == item["prompt_tokens"]  # the server saw the trace's tokens
        assert "Finished server process" in Path(run["log"]).read_text()  # stopped
    sparse = results["engines"]["transformers:sparse"]
    assert "--min-seq-len" in sparse["command"] and "--min-seq-len" not in results["engines"]["transformers:dense"][
        "command"]
    summary = {row["engine"]: row for row in results["summary"]}
    assert summary["transformers:sparse"]["paired"] == 1 and summary["transformers:sparse"]["long_p50_x"] > 0
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].split()[:3] == ["transformers:sparse", "ok", "5/5"]  # the summary table last
    assert lines[-2].split()[:3] == ["transformers:dense", "ok", "5/5"] and lines[-5].startswith("summary")


def test_engines_past_the_time_limit_are_skipped(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), *CHECK[:-2], "--time-limit", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    results = json.loads((tmp_path / "load.json").read_text())
    assert [run["status"] for run in results["engines"].values()] == ["skipped", "skipped"]
    assert len(results["trace"]) == 5 and proc.stdout.rstrip().splitlines()[-1].split()[:2] == [
        "transformers:sparse", "skipped"]
