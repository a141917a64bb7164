r"""Sparse prefill where users serve: transformers' continuous batching (`generate_batch`) and `transformers serve`,
dense against sparse in the same run on the same card. One command; each stage prints a short table, the
summary table comes last, and everything is written to $OUT/serving.json.

    python3 bench/bench_serving.py --model MODEL_DIR --yarn 4 --stages ttft,mixed,overhead,serve,chunked

Stages:
  ttft      one long prompt per length: TTFT through model.generate (one-shot prefill) and through
            generate_batch (chunked at --chunk tokens a batch), dense vs sparse; the speed-up kept by the
            serving path = (CB speed-up) / (generate speed-up)
  mixed     generate_batch with --long prompts of --long-lengths and --short prompts of --short-length
            tokens, all submitted at once, --passes times: per-request TTFT, decode tokens/s, total throughput
  overhead  the packed call of that mix in every layer of a forward, per layer (long requests as prefill chunks,
            short ones whole; the pack read once per forward, as a model's forward reads it): the packed path
            against the long requests alone plus one engine call for the short ones
            (and, to tell the loop's glue from the calls themselves, the engine's function once per short
            request); then a decode step of every request of the mix, patched against the engine's function
  serve     the mix through a real `transformers serve` (dense) and `sparse-prefill serve` process on
            localhost, one after the other, with the OpenAI client streaming: TTFT, decode tokens/s,
            throughput
  lastchunk one long prompt per --lengths through generate_batch in --chunk chunks: TTFT with middle chunks known
            as such (what the library does) against every chunk taken as its prompt's last (what vLLM's backend
            does, its metadata not saying which chunk is): the cost of not knowing
  chunked   retrieval answers (paired against dense one-shot) and kept blocks: sparse one-shot, the
            `exact` control (gamma 1, one-shot) and sparse chunked prefill through generate_batch at
            each of --chunk-sizes

A check of the script on a CPU, not a measurement (a random-weight model; the lengths must be given, the defaults
are a GPU's):

    python3 bench/bench_serving.py --model sparse-prefill-tiny --device cpu --stages overhead,mixed,chunked \
        --long-lengths 2k,3k --chunk 512 --short 3 --short-length 400 --new-tokens 4 --passes 1 \
        --chunked-lengths 2k --chunk-sizes 512 --seeds 1 --tasks niah_single --config min_seq_len=1024
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_prefill import SparsePrefillConfig, patch_model, unpatch_model  # noqa: E402
from sparse_prefill.eval.archs import resolve_model  # noqa: E402
from sparse_prefill.eval.models import with_yarn  # noqa: E402
from sparse_prefill.eval.options import parse_lengths  # noqa: E402
from sparse_prefill.eval.recording import LayoutRecorder, intercept_layouts, num_layers  # noqa: E402
from sparse_prefill.eval.runner import format_table, greedy_answer, set_mode, synchronize, timed_prefill  # noqa: E402
from sparse_prefill.eval.scoring import paired_difference, score  # noqa: E402
from sparse_prefill.eval.speed import time_call  # noqa: E402
from sparse_prefill.eval.tasks import make_example  # noqa: E402
from sparse_prefill.patches.per_request import too_short_for_sparse  # noqa: E402

PAGE = 256  # paged-cache page size (tokens)


def prompt(tok, length: int, seed: int = 0, task: str = "niah_single", depth: float = 0.5):
    return make_example(task, tok, length, depth, seed, haystack="prose")


def cb_config(chunk: int, total_tokens: int, device):
    """A paged cache just large enough for `total_tokens` (the sdpa path's mask grows with it) and prefill
    chunks of `chunk` tokens; prefill outside CUDA graphs (selection reads lengths on the host)."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(max_batch_tokens=chunk, page_size=PAGE,
                                    num_blocks=math.ceil(total_tokens * 1.05 / PAGE) + 8,
                                    use_cuda_graph=(False, device.type == "cuda"))


def run_batch(model, inputs: list[list[int]], new_tokens: int, chunk: int, device) -> tuple[list[dict], float]:
    """generate_batch: per request {ttft_s, decode_tps, tokens}, and the wall time of the whole batch."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    total = sum(len(x) for x in inputs) + len(inputs) * (new_tokens + PAGE)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate_batch(inputs, gen, continuous_batching_config=cb_config(chunk, total, device),
                               record_timestamps=True, progress_bar=False)
    wall = time.perf_counter() - start
    rows = []
    for i in range(len(inputs)):
        result = out[f"req_{i}"]
        if result.error is not None:
            raise RuntimeError(f"request {i} failed: {result.error}")
        stamps = result.timestamps or []
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
        rows.append({"prompt": len(inputs[i]), "ttft_s": stamps[0] - result.created_time if stamps else None,
                     "decode_tps": decode, "tokens": list(result.generated_tokens)})
    return rows, wall


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------

def stage_ttft(model, tok, args, config, device) -> list[dict]:
    rows = []
    for length in args.lengths:
        ids = prompt(tok, length).input_ids
        for mode in ("dense", "sparse"):
            set_mode(model, mode, config)
            prefill = min(timed_prefill(model, torch.tensor([ids], device=device))[1] for _ in range(args.repeats))
            batch = min(run_batch(model, [list(ids)], 1, args.chunk, device)[0][0]["ttft_s"]
                        for _ in range(args.repeats))
            rows.append({"length": length, "mode": mode, "generate_s": prefill, "generate_batch_s": batch})
        dense, sparse = rows[-2], rows[-1]
        sparse["generate_x"] = dense["generate_s"] / sparse["generate_s"]
        sparse["batch_x"] = dense["generate_batch_s"] / sparse["generate_batch_s"]
        sparse["kept"] = sparse["batch_x"] / sparse["generate_x"]
    unpatch_model(model)
    print(format_table(rows, ["length", "mode", "generate_s", "generate_batch_s", "generate_x", "batch_x", "kept"]))
    return rows


def stage_lastchunk(model, tok, args, config, device) -> list[dict]:
    """What vLLM's backend pays for treating every prefill chunk as its prompt's last (its metadata does not say
    which chunk is): one long prompt per --lengths through generate_batch in --chunk chunks, sparse as the library
    runs it (middle chunks skip the exact tail and the question columns) against every chunk taken as the last."""
    from sparse_prefill.patches import packed

    rows, exact = [], packed.attend_alone
    for length in args.lengths:
        ids = list(prompt(tok, length).input_ids)
        set_mode(model, "sparse", config)
        for mode in ("middle chunks known", "every chunk last"):
            packed.attend_alone = exact if mode.startswith("middle") else (
                lambda *a, **kw: exact(*a, **{**kw, "last_chunk": True}))
            try:
                ttft = min(run_batch(model, [ids], 1, args.chunk, device)[0][0]["ttft_s"] for _ in range(args.repeats))
            finally:
                packed.attend_alone = exact
            rows.append({"length": length, "chunk": args.chunk, "mode": mode, "ttft_s": ttft})
        rows[-1]["cost"] = rows[-1]["ttft_s"] / rows[-2]["ttft_s"] - 1
    unpatch_model(model)
    print(format_table(rows, ["length", "chunk", "mode", "ttft_s", "cost"]))
    return rows


def mixed_inputs(tok, args) -> list[list[int]]:
    longs = [list(prompt(tok, n, seed=i).input_ids) for i, n in enumerate(args.long_lengths[:args.long])]
    shorts = [list(prompt(tok, args.short_length, seed=100 + i).input_ids) for i in range(args.short)]
    return longs + shorts


def summarize_requests(rows: list[dict], wall: float, mode: str, path: str) -> list[dict]:
    """Mean TTFT and decode speed of the long and of the short requests, and the batch's total throughput."""
    shortest = min(r["prompt"] for r in rows)
    groups = {"long": [r for r in rows if r["prompt"] > 4 * shortest],
              "short": [r for r in rows if r["prompt"] <= 4 * shortest]}
    out = []
    for kind, chosen in groups.items():
        if chosen:
            decode = [r["decode_tps"] for r in chosen if r["decode_tps"]]
            out.append({"path": path, "mode": mode, "requests": f"{len(chosen)} {kind}",
                        "ttft_s": statistics.mean(r["ttft_s"] for r in chosen),
                        "ttft_max_s": max(r["ttft_s"] for r in chosen),
                        "decode_tps": statistics.mean(decode) if decode else None,
                        "throughput_tps": sum(len(r["tokens"]) for r in rows) / wall})
    return out


def stage_mixed(model, tok, args, config, device) -> list[dict]:
    inputs = mixed_inputs(tok, args)
    summary, tokens = [], {}
    for mode in ("dense", "sparse"):
        set_mode(model, mode, config)
        run_batch(model, [inputs[-1]], 2, args.chunk, device)  # warm up the path
        for n in range(1, args.passes + 1):  # pass 1 meets new lengths: any kernel compile lands there
            rows, wall = run_batch(model, inputs, args.new_tokens, args.chunk, device)
            summary += [{**row, "pass": n} for row in summarize_requests(rows, wall, mode, "generate_batch")]
        tokens[mode] = [r["tokens"] for r in rows]
    unpatch_model(model)
    same = sum(a == b for a, b in zip(tokens["dense"], tokens["sparse"], strict=True))
    print(format_table(summary, ["path", "mode", "pass", "requests", "ttft_s", "ttft_max_s", "decode_tps",
                                 "throughput_tps"]))
    print(f"generate_batch: sparse gave dense's tokens on {same} of {len(inputs)} requests")
    return summary


def stage_overhead(model, tok, args, config, device) -> list[dict]:
    """A packed call per layer of a forward (the pack read once, as in a forward, and its cost spread over the
    layers): the mix's long requests as their last prefill chunk, the short ones whole; milliseconds per layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sparse_prefill.patches import transformers_attention as glue

    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__]
    layer = layers[0]
    hq, hkv, d = model.config.num_attention_heads, model.config.num_key_value_heads, layer.head_dim
    q_lens = [args.chunk] * len(args.long_lengths[:args.long]) + [args.short_length] * args.short
    k_lens = list(args.long_lengths[:args.long]) + [args.short_length] * args.short
    dtype = next(model.parameters()).dtype

    def pack(q_lens, k_lens):
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, hq, sum(q_lens), d, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(1, hkv, sum(k_lens), d, device=device, dtype=dtype, generator=g) for _ in "kv")
        cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
              for lens in (q_lens, k_lens)]
        mask = torch.full((1, 1, sum(q_lens), sum(k_lens)), torch.finfo(dtype).min, device=device, dtype=dtype)
        for i in range(len(q_lens)):
            rows = torch.arange(q_lens[i], device=device)[:, None] + (k_lens[i] - q_lens[i])
            block = torch.where(torch.arange(k_lens[i], device=device)[None] <= rows, 0.0, torch.finfo(dtype).min)
            mask[0, 0, cu[0][i]:cu[0][i + 1], cu[1][i]:cu[1][i + 1]] = block
        kwargs = dict(cu_seq_lens_q=cu[0], cu_seq_lens_k=cu[1], max_length_q=max(q_lens), max_length_k=max(k_lens),
                      logits_indices=cu[0][1:] - 1, is_causal=False)
        return q, k, v, mask, kwargs

    patch_model(model, config)
    attention = glue._make_attention("sdpa")
    sparse = [not too_short_for_sparse(q, k, config) for q, k in zip(q_lens, k_lens, strict=True)]
    if all(sparse) or not any(sparse):
        raise ValueError("the overhead stage needs both requests the sparse path takes and ones it leaves dense; "
                         f"with {config} the mix {list(zip(q_lens, k_lens, strict=True))} has not")
    whole = pack(q_lens, k_lens)
    longs = pack(*zip(*[(q, k) for q, k, s in zip(q_lens, k_lens, sparse, strict=True) if s], strict=True))
    shorts = pack(*zip(*[(q, k) for q, k, s in zip(q_lens, k_lens, sparse, strict=True) if not s], strict=True))
    singles = [pack([q], [k]) for q, k, s in zip(q_lens, k_lens, sparse, strict=True) if not s]
    decode = pack([1] * len(k_lens), k_lens)
    n_long = sum(sparse)

    def timed(call, pack):
        """Per layer: `call` on every layer once, as a forward makes it (the pack's reading shared)."""
        return time_call(lambda: [call(m, *pack[:4], scaling=m.scaling, **pack[4]) for m in layers], device,
                         repeats=5) / len(layers)

    def engine(module, *tensors, scaling, **kwargs):
        return sdpa_attention_forward(module, *tensors, scaling=scaling, is_causal=False)

    with torch.no_grad():
        t_whole, t_long, t_short = timed(attention, whole), timed(attention, longs), timed(engine, shorts)
        t_each = sum(timed(engine, one) for one in singles)
        t_decode, t_decode_engine = timed(attention, decode), timed(engine, decode)
    unpatch_model(model)
    row = {"pack": f"{n_long} sparse + {len(sparse) - n_long} dense requests", "packed_ms": 1e3 * t_whole,
           "sparse_only_ms": 1e3 * t_long,
           "dense_engine_ms": 1e3 * t_short,
           "dense_one_by_one_ms": 1e3 * t_each,  # the engine's own function, a call per short request
           "overhead_pct": 100 * (t_whole - t_long - t_short) / t_whole,
           # a decode step of every request of the mix: the patched call against the engine's function
           "decode_ms": 1e3 * t_decode, "decode_engine_ms": 1e3 * t_decode_engine}
    print(format_table([row], list(row)))
    return [row]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_folder(source: str | None, yarn: float | None, model=None, tok=None) -> str:
    """A model folder the server can load: `source`'s own files with YaRN written into its config when asked; when
    `source` is no folder (a built-in random-weight model: the script's own check), `model` and `tok` saved."""
    from transformers import AutoConfig

    folder = Path(tempfile.mkdtemp(prefix="serve-model-"))
    path = Path(source) if source else None
    if path is not None and path.is_dir():
        for item in path.iterdir():
            if item.name != "config.json":
                (folder / item.name).symlink_to(item.resolve())
        config = AutoConfig.from_pretrained(path)
        if yarn:
            config = with_yarn(config, yarn)
        config.save_pretrained(folder)
    else:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def config_flags(config: SparsePrefillConfig) -> list[str]:
    """`sparse-prefill serve` flags for every field of `config` that is not the default (None: "auto")."""
    chosen = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if getattr(config, f.name) != getattr(SparsePrefillConfig(), f.name)}
    return [x for name, value in chosen.items() for x in ("--" + name.replace("_", "-"),
                                                          "auto" if value is None else str(value))]


def serve_command(mode: str, folder: str, port: int, device: str, chunk: int, max_model_len: int, cache_tokens: int,
                  config: SparsePrefillConfig) -> list[str]:
    """`transformers serve` (mode "dense") or `sparse-prefill serve` with `config` (else) on 127.0.0.1:`port`:
    continuous batching in prefill chunks of `chunk` tokens, a paged cache of `cache_tokens` tokens."""
    blocks = math.ceil(cache_tokens * 1.05 / PAGE) + 8
    common = [folder, "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype",
              "bfloat16" if device.startswith("cuda") else "float32", "--continuous-batching", "--cb-block-size",
              str(PAGE), "--cb-num-blocks", str(blocks), "--cb-max-batch-tokens", str(chunk), "--model-timeout",
              "-1", "--max-model-len", str(max_model_len),
              "--attn-implementation", "sdpa"]  # transformers' defaults otherwise: sdpa captures no CUDA graph
    if mode == "dense":
        return [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", *common]
    return [sys.executable, "-m", "sparse_prefill.cli", "serve", *config_flags(config), *common]


def wait_until_ready(server: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    """Returns once the server on `port` answers GET /v1/models; raises if it stops first or takes `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server stopped while starting (exit {server.returncode}):\n"
                               f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (OSError, http.client.HTTPException):  # not listening yet, or answering 5xx while it loads
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs: zombies aside (a container's init may reap them late, or
    never), read from /proc where there is one."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):  # a process that ended while read
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def stop_server(server: subprocess.Popen) -> None:
    """Stops the server and every process it started (its process group): SIGTERM, then SIGKILL to what is left
    after 60 s; returns once none runs (or 60 s after the SIGKILL), so that the next server finds the GPU free."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            server.poll()  # reaps the leader
            if not group_running(server.pid):
                return
            time.sleep(0.5)


@contextlib.contextmanager
def running_server(command: list[str], env: dict, log: Path, port: int, timeout: float):
    """A server process on 127.0.0.1:`port`, its output in `log`, yielded once it answers; it and everything it
    started are stopped on leaving, also on error."""
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_ready(server, port, log, timeout)
        yield server
    finally:
        stop_server(server)


def stream_request(client, model_id: str, text: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    stamps = []
    stream = client.completions.create(model=model_id, prompt=text, max_tokens=new_tokens, temperature=0,
                                       stream=True)
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].text)
    ttft = stamps[0] - start if stamps else None
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return {"ttft_s": ttft, "decode_tps": decode, "tokens": pieces, "end": stamps[-1] if stamps else start}


def stage_serve(model, tok, args, config, device) -> list[dict]:
    import openai

    inputs = mixed_inputs(tok, args)
    texts = [tok.decode(ids, skip_special_tokens=False) for ids in inputs]
    folder = serve_folder(args.model, args.yarn, model, tok)
    total = sum(len(x) for x in inputs) + len(inputs) * (args.new_tokens + PAGE)
    max_model_len = max(args.long_lengths) + args.new_tokens + 64
    summary = []
    for mode in ("dense", "sparse"):
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
        command = serve_command(mode, folder, port, args.device, args.chunk, max_model_len, total, config)
        with running_server(command, env, Path(args.out) / f"serve_{mode}.log", port, 300):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600,
                                   max_retries=0)
            stream_request(client, folder, texts[-1], 4)  # warm up
            for n in range(1, args.passes + 1):  # pass 1: the server's first long requests (kernel compiles)
                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
                    rows = list(pool.map(stream_request, [client] * len(texts), [folder] * len(texts), texts,
                                         [args.new_tokens] * len(texts)))
                wall = max(r["end"] for r in rows) - start
                for r, ids in zip(rows, inputs, strict=True):
                    r["prompt"] = len(ids)
                summary += [{**row, "pass": n} for row in summarize_requests(rows, wall, mode, "serve")]
    shutil.rmtree(folder, ignore_errors=True)
    print(format_table(summary, ["path", "mode", "pass", "requests", "ttft_s", "ttft_max_s", "decode_tps",
                                 "throughput_tps"]))
    return summary


def stage_chunked(model, tok, args, config, device) -> list[dict]:
    rows = []
    recorder = LayoutRecorder(num_layers(model))
    modes = [("sparse", config, None), ("exact", config.replace(gamma=1.0), None)]
    modes += [(f"chunk{n // 1024}k" if n % 1024 == 0 else f"chunk{n}", config, n) for n in args.chunk_sizes]
    for length in args.chunked_lengths:
        for task in args.tasks:
            for seed in range(args.seeds):
                example = prompt(tok, length, seed=seed, task=task, depth=(seed + 0.5) / args.seeds)
                unpatch_model(model)
                text = greedy_answer(model, tok, example.input_ids, example.max_new_tokens)[0]
                base = {"length": length, "task": task, "seed": seed}
                rows.append({**base, "mode": "dense", "score": score(text, example.answers), "answer": text})
                for name, cfg, chunk in modes:
                    patch_model(model, cfg)
                    recorder.reset()
                    with intercept_layouts(model, recorder):
                        if chunk is None:
                            text = greedy_answer(model, tok, example.input_ids, example.max_new_tokens)[0]
                        else:
                            out, _ = run_batch(model, [list(example.input_ids)], example.max_new_tokens, chunk, device)
                            text = tok.decode(out[0]["tokens"], skip_special_tokens=True)
                    rows.append({**base, "mode": name, "score": score(text, example.answers), "answer": text,
                                 "density": recorder.mean_density()})
                # A long run stopped part-way still leaves every prompt it finished.
                (Path(args.out) / "chunked_rows.json").write_text(json.dumps(rows, indent=1, default=str))
                print(f"{length} {task} seed {seed}: " + " ".join(
                    f"{r['mode']}={r['score']:.2f}" for r in rows if r["length"] == length and r["task"] == task
                    and r["seed"] == seed), flush=True)
    unpatch_model(model)
    table = []
    for length in args.chunked_lengths:
        dense = {(r["task"], r["seed"]): r["score"] for r in rows if r["length"] == length and r["mode"] == "dense"}
        for mode in ["dense"] + [m[0] for m in modes]:
            cell = [r for r in rows if r["length"] == length and r["mode"] == mode]
            diffs = [r["score"] - dense[(r["task"], r["seed"])] for r in cell]
            densities = [r["density"] for r in cell if r.get("density") is not None]
            table.append({"length": length, "mode": mode, "prompts": len(cell),
                          "accuracy": statistics.mean(r["score"] for r in cell),
                          "vs_dense": paired_difference(diffs)[0] if mode != "dense" else None,
                          "lost": sum(d < 0 for d in diffs), "gained": sum(d > 0 for d in diffs),
                          "density": statistics.mean(densities) if densities else None})
    print(format_table(table, ["length", "mode", "prompts", "accuracy", "vs_dense", "lost", "gained", "density"]))
    return rows + [{"table": table}]


STAGES = {"ttft": stage_ttft, "mixed": stage_mixed, "overhead": stage_overhead, "serve": stage_serve,
          "chunked": stage_chunked, "lastchunk": stage_lastchunk}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder, .gguf or pinned name (sparse-prefill-tiny: a check)")
    p.add_argument("--arch", default=None, help="random weights of this architecture (eval/configs), e.g. for the "
                   "kernel compiles of the mixed stage, which need no trained weights")
    p.add_argument("--yarn", type=float, default=None, help="YaRN rope scaling factor (4 for 64K-128K on Qwen2.5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stages", default="ttft,mixed,overhead,serve,chunked")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("64k,128k"), help="ttft stage lengths")
    p.add_argument("--chunked-lengths", type=parse_lengths, default=parse_lengths("32k,64k,128k"))
    p.add_argument("--chunk", type=int, default=8192, help="generate_batch / serve prefill chunk (max batch tokens)")
    p.add_argument("--long", type=int, default=2)
    p.add_argument("--long-lengths", type=parse_lengths, default=parse_lengths("64k,120k"),
                   help="prompt lengths of the long requests (a served request must fit the model's context)")
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--short-length", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--passes", type=int, default=2, help="mixed, serve: send the mix this many times (pass 1 "
                   "pays any kernel compile its new lengths need)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunk-sizes", type=parse_lengths, default=parse_lengths("2k,8k,32k"))
    p.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--config", default="", help="SparsePrefillConfig fields, e.g. gamma=0.9 (default: the defaults)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_serving_out"))
    args = p.parse_args(argv)
    args.tasks = args.tasks.split(",")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from sparse_prefill.config import config_from_text

    config = config_from_text(args.config)
    device = torch.device(args.device)
    model, tok, name = resolve_model(args.model, arch=args.arch, device=device, yarn=args.yarn)
    model.set_attn_implementation("sdpa")
    print(f"model {name} ({type(model).__name__}, {num_layers(model)} layers) on {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}; config {config}", flush=True)
    results = {"args": {k: v for k, v in vars(args).items()}, "config": str(config)}
    failed = []
    for name in args.stages.split(","):
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        try:
            with torch.no_grad():
                results[name] = STAGES[name](model, tok, args, config, device)
        except Exception:  # one stage's failure must not cost the others' figures
            results[name] = {"error": traceback.format_exc()}
            failed.append(name)
            print(results[name]["error"], flush=True)
            unpatch_model(model)
        print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
        (Path(args.out) / "serving.json").write_text(json.dumps(results, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
