r"""A load benchmark: one request trace with Poisson arrivals, replayed against real OpenAI-compatible servers, dense
against sparse, in one command. The summary table comes last; everything is written to $OUT/load.json (or --out).

    python3 bench/bench_load.py --model MODEL_DIR --yarn 4 --engines vllm:FLASH_ATTN,vllm:CUSTOM --rate 3 \
        --requests 120 --enforce-eager --max-num-batched-tokens 16384

The trace (the same for every engine; deterministic from --seed): --requests requests arriving as a Poisson process
at --rate a second (the first at 0 s). A quarter are long: a length drawn from --long-lengths, a retrieval prompt
with a known answer (--tasks, eval.tasks, built to that exact token length with the model's tokenizer, the needle
at a random depth). The rest are short: prose filler, a length uniform in --short-range. Each asks for a number of
tokens uniform in --new-tokens-range, and the server is told to generate all of them whatever the model says
(vLLM: `ignore_eos`; transformers serve: no end-of-sequence token, `generation_config={"eos_token_id": -1}`). The
prompts go as text, since transformers serve takes no token ids: both servers tokenize it with the model's
tokenizer, so every engine prefills the same tokens (the count is in the trace, and the server's in each record).
Every request fits the model's context with its answer (transformers serve refuses a --max-model-len past it):
long lengths are cut to the context less the most new tokens and 64 (128K -> 130752 with YaRN x4 on a 32K model).
The trace is in load.json; its prompt texts in load_trace.json. The same seed at another --rate gives the same
requests, their arrival times scaled.

Engines (--engines; each a server process on 127.0.0.1 and a free port, started, waited for, warmed up with one
short and one long request outside the trace, sent the trace, stopped with everything it started, also on error):
  vllm:FLASH_ATTN      vllm serve --attention-backend FLASH_ATTN (dense)
  vllm:CUSTOM          vllm serve --attention-backend CUSTOM, SPARSE_PREFILL_CONFIG=--config (needs the package
                       installed: vLLM loads the backend through its entry point)
  transformers:dense   transformers serve, continuous batching (prefill chunks of --chunk tokens, sdpa, a paged
                       cache of the whole trace or four of its longest requests, whichever is less)
  transformers:sparse  sparse-prefill serve: the same flags, and --config's fields as flags
Both vLLM engines: --max-model-len from the trace, YaRN through --hf-overrides when --yarn > 0, prefix caching
off, --gpu-memory-utilization, --enforce-eager if given. A failing engine is recorded and the others run;
--time-limit bounds the whole run (each engine gets an equal share of what is left; engines not started in time
are recorded as skipped, requests past it as cut). Server logs: $OUT/load_<engine>.log. Where vLLM and
transformers serve need different packages, --vllm-path and --transformers-path go first on each one's PYTHONPATH.

The client (asyncio, the OpenAI client) sends each request at its arrival time, streaming, each bounded by
--request-timeout, and records when it was sent, its first token (TTFT) and its end, the output tokens (the
stream's usage, else its chunks) and the text. Per engine: TTFT p50/p90 of the long and of the short requests,
output tokens/s (all output tokens over the makespan: first send to last end), requests/s, and the answers on the
long prompts (eval.scoring, `contains`, on the whole output) paired against the dense engine of the same family:
how many it lost and gained. The summary table gives the speed-ups against that dense engine (x > 1: faster).

A check of the script, not a measurement (a CPU, the tiny random-weight model, toy lengths; under a minute an engine):

    python3 bench/bench_load.py --model sparse-prefill-tiny --engines transformers:dense,transformers:sparse \
        --requests 6 --long-lengths 2k --short-range 128-400 --new-tokens-range 4-8 --rate 2 \
        --config min_seq_len=1024 --chunk 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_serving import PAGE, free_port, running_server, serve_command, serve_folder  # noqa: E402
from bench_vllm import model_folder, ratio, tokenizer_for, vllm_env, yarn_overrides  # noqa: E402

from sparse_prefill.eval.options import parse_lengths  # noqa: E402

ENGINES = ("vllm:FLASH_ATTN", "vllm:CUSTOM", "transformers:dense", "transformers:sparse")
DENSE = {"vllm": "vllm:FLASH_ATTN", "transformers": "transformers:dense"}  # the reference of each family
FORCE_LENGTH = {"vllm": {"ignore_eos": True},  # what each server takes to generate all max_tokens
                "transformers": {"generation_config": json.dumps({"eos_token_id": -1})}}  # -1: no end token


def parse_range(text: str) -> tuple[int, int]:
    """'512-4096' or '2k-4k' -> (512, 4096)."""
    low, sep, high = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is no range; write it LOW-HIGH, e.g. 512-4096")
    low, high = parse_lengths(low)[0], parse_lengths(high)[0]
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: LOW-HIGH with 0 < LOW <= HIGH")
    return low, high


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model folder, a pinned name converted into the "
                   "cache (`sparse-prefill fetch-model NAME --safetensors`), or sparse-prefill-tiny (a check)")
    p.add_argument("--yarn", type=float, default=0.0, help="YaRN factor (4 for 64K-128K on Qwen2.5; 0: none)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0, help="mean arrivals a second (Poisson)")
    p.add_argument("--long-lengths", type=parse_lengths, default=parse_lengths("32k,64k,128k"))
    p.add_argument("--short-range", type=parse_range, default=parse_range("512-4096"))
    p.add_argument("--new-tokens-range", type=parse_range, default=parse_range("64-256"))
    p.add_argument("--tasks", default="niah_single,niah_multikey", help="retrieval tasks of the long requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="", help="SparsePrefillConfig fields for the sparse engines, e.g. gamma=0.9")
    p.add_argument("--device", default=None, help="transformers engines (default: cuda if there is one, else cpu)")
    p.add_argument("--chunk", type=int, default=8192, help="transformers engines: prefill chunk (max batch tokens)")
    p.add_argument("--cb-cache-tokens", type=int, default=None, help="transformers engines: paged cache size "
                   "(default: the whole trace's tokens or four of its longest requests, whichever is less: sdpa's "
                   "mask takes chunk x cache x 2 bytes, twice with async batching)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6, help="vLLM engines (the rest leaves room "
                   "for the sparse path's buffers, which vLLM's profiling does not see)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM engines: no torch.compile or CUDA graphs")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM engines (default: vLLM's)")
    p.add_argument("--vllm-path", default="", help="prepended to PYTHONPATH for the vLLM servers")
    p.add_argument("--transformers-path", default="", help="prepended to PYTHONPATH for the transformers servers")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to answer")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--time-limit", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_load_out"))
    args = p.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        p.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    from sparse_prefill.config import config_from_text

    args.sparse_config = config_from_text(args.config)  # a typo fails here, not in two servers later
    return args


# ------------------------------------------------------------------------------------------------
# The trace
# ------------------------------------------------------------------------------------------------

def make_trace(requests: int, rate: float, long_lengths, short_range, new_tokens_range, tasks, seed: int,
               long_share: float = 0.25) -> list[dict]:
    """Arrival time, kind, length, tokens to generate and prompt recipe of each request, from `seed` alone."""
    rng = random.Random(seed)
    longs = set(rng.sample(range(requests), round(requests * long_share)))
    trace, clock, n_long = [], 0.0, 0
    for i in range(requests):
        clock += rng.expovariate(rate) if i else 0.0
        item = {"id": i, "arrival_s": clock, "new_tokens": rng.randint(*new_tokens_range),
                "prompt_seed": rng.randrange(1 << 30)}
        if i in longs:
            item.update(kind="long", length=rng.choice(long_lengths), task=tasks[n_long % len(tasks)],
                        depth=round(rng.uniform(0.05, 0.95), 3))
            n_long += 1
        else:
            item.update(kind="short", length=rng.randint(*short_range))
        trace.append(item)
    return trace


def prose_ids(tok, at_least: int) -> list[int]:
    from sparse_prefill.eval.haystack import haystack_sentences

    text = " ".join(haystack_sentences("prose"))
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    return ids * (at_least // len(ids) + 2)


def build_prompts(trace: list[dict], tok) -> list[dict]:
    """Each request's text, the token count the servers will see (the text tokenized as they do), and answers."""
    from sparse_prefill.eval.tasks import make_example

    filler = prose_ids(tok, max((r["length"] for r in trace if r["kind"] == "short"), default=0))
    prompts = []
    for r in trace:
        if r["kind"] == "long":
            example = make_example(r["task"], tok, r["length"], r["depth"], r["prompt_seed"], haystack="prose")
            ids, answers = list(example.input_ids), list(example.answers)
        else:
            start = random.Random(r["prompt_seed"]).randrange(len(filler) - r["length"])
            ids, answers = filler[start:start + r["length"]], []
        text = tok.decode(ids, skip_special_tokens=False)
        prompts.append({"text": text, "prompt_tokens": len(tok(text)["input_ids"]), "answers": answers})
    return prompts


def make_plan(args, tok, context: int | None) -> dict:
    """The trace, its prompts, two warm-up requests outside it (the shortest short and long lengths, 2 tokens
    each), and the server sizes: the longest request (max_model_len), and for transformers' paged cache the whole
    trace at once or four of its longest requests, whichever is less (a request that finds the cache full waits).

    Every request must fit the model's `context` with its answer (transformers serve refuses a longer
    --max-model-len; vLLM would take it): long lengths are cut to `context` less the most new tokens and 64."""
    longest = context - args.new_tokens_range[1] - 64 if context else None
    long_lengths = sorted({min(n, longest) if longest else n for n in args.long_lengths})
    trace = make_trace(args.requests, args.rate, long_lengths, args.short_range, args.new_tokens_range,
                       args.tasks, args.seed)
    prompts = build_prompts(trace, tok)
    shortest = [min((r for r in trace if r["kind"] == kind), key=lambda r: r["length"])
                for kind in ("short", "long") if any(r["kind"] == kind for r in trace)]
    warm_up = [{**r, "id": -1 - n, "arrival_s": 0.0, "new_tokens": 2, "prompt_seed": r["prompt_seed"] + 1}
               for n, r in enumerate(shortest)]
    sizes = [p["prompt_tokens"] + r["new_tokens"] for r, p in zip(trace, prompts, strict=True)]
    max_model_len = min(max(sizes) + 64, context or max(sizes) + 64)
    cache_tokens = args.cb_cache_tokens or min(sum(sizes) + PAGE * len(sizes), 4 * (max_model_len + PAGE))
    return {"trace": trace, "prompts": prompts, "warm_up": warm_up, "warm_up_prompts": build_prompts(warm_up, tok),
            "long_lengths": long_lengths, "max_model_len": max_model_len, "cache_tokens": cache_tokens}


# ------------------------------------------------------------------------------------------------
# Engines: the server commands
# ------------------------------------------------------------------------------------------------

def vllm_command(folder: str, backend: str, port: int, max_model_len: int, gpu_memory_utilization: float,
                 hf_overrides: dict | None = None, enforce_eager: bool = False,
                 max_num_batched_tokens: int | None = None) -> list[str]:
    """`vllm serve` with one attention backend on 127.0.0.1:`port` (through this Python: vLLM installed with
    `pip --target` has no `vllm` on PATH)."""
    command = [sys.executable, "-c", "from vllm.entrypoints.cli.main import main; main()", "serve", folder,
               "--host", "127.0.0.1", "--port", str(port), "--attention-backend", backend, "--dtype", "bfloat16",
               "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization),
               "--no-enable-prefix-caching", "--seed", "0"]
    if hf_overrides:
        command += ["--hf-overrides", json.dumps(hf_overrides)]
    if enforce_eager:
        command.append("--enforce-eager")
    if max_num_batched_tokens:
        command += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    return command


def server_launch(engine: str, args, folders: dict, port: int, max_model_len: int, cache_tokens: int):
    """(command, environment) of `engine`'s server."""
    family, kind = engine.split(":")
    if family == "vllm":
        if folders["vllm"] is None:
            raise RuntimeError(f"vLLM loads a Hugging Face folder; {args.model!r} is none")
        overrides = yarn_overrides(folders["vllm"], args.yarn) if args.yarn else None
        command = vllm_command(folders["vllm"], kind, port, max_model_len, args.gpu_memory_utilization, overrides,
                               args.enforce_eager, args.max_num_batched_tokens)
        return command, vllm_env(kind, args.config, os.environ, args.vllm_path)
    command = serve_command(kind, folders["transformers"], port, args.device, args.chunk, max_model_len,
                            cache_tokens, args.sparse_config)
    path = [p for p in (args.transformers_path, str(ROOT), os.environ.get("PYTHONPATH", "")) if p]
    return command, {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(path)}


# ------------------------------------------------------------------------------------------------
# The client: the trace replayed against one server
# ------------------------------------------------------------------------------------------------

async def stream_one(client, model_id: str, prompt: str, new_tokens: int, extra_body: dict, record: dict,
                     start: float) -> None:
    """One streamed completion; fills `record` as it goes (so a request cut short keeps what it got)."""
    pieces, chunks = [], 0
    stream = await client.completions.create(model=model_id, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body=extra_body)
    async with stream:
        async for chunk in stream:
            now = time.perf_counter() - start
            if chunk.usage is not None:
                record.update(output_tokens=chunk.usage.completion_tokens, tokens_from="usage",
                              server_prompt_tokens=chunk.usage.prompt_tokens)
            for choice in chunk.choices or []:
                if choice.text or choice.finish_reason is None:  # a token (the last may come with its reason)
                    chunks += 1
                    pieces.append(choice.text or "")
                    if record["first_token_s"] is None:
                        record["first_token_s"] = now
                        record["ttft_s"] = now - record["sent_s"]
                record["finish_reason"] = choice.finish_reason or record.get("finish_reason")
            record["text"] = "".join(pieces)
    record["finished_s"] = time.perf_counter() - start
    if record["first_token_s"] is None:
        record["error"] = "the stream ended without a token"
    if record["output_tokens"] is None:
        record.update(output_tokens=chunks, tokens_from="chunks")


async def replay(base_url: str, model_id: str, trace: list[dict], prompts: list[dict], extra_body: dict,
                 deadline: float, request_timeout: float) -> list[dict]:
    """Every request sent at its arrival time (seconds after the replay starts); one record each."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", timeout=request_timeout, max_retries=0)
    start = time.perf_counter()

    async def one(item: dict, prompt: dict) -> dict:
        await asyncio.sleep(max(0.0, item["arrival_s"] - (time.perf_counter() - start)))
        record = {"id": item["id"], "sent_s": time.perf_counter() - start, "first_token_s": None, "ttft_s": None,
                  "finished_s": None, "output_tokens": None, "tokens_from": None, "text": "", "error": None}
        left = min(request_timeout, deadline - time.time())
        if left <= 0:
            record["error"] = "not sent: out of time (--time-limit)"
            return record
        try:
            await asyncio.wait_for(stream_one(client, model_id, prompt["text"], item["new_tokens"], extra_body,
                                              record, start), left)
        except asyncio.TimeoutError:
            record["error"] = f"cut after {left:.0f} s (--request-timeout / --time-limit)"
        except Exception as err:  # noqa: BLE001 - a failed request is a result, the others go on
            record["error"] = f"{type(err).__name__}: {err}"
        return record

    try:
        return list(await asyncio.gather(*(one(item, prompt) for item, prompt in zip(trace, prompts, strict=True))))
    finally:
        await client.close()


def run_engine(engine: str, args, folders: dict, plan: dict, deadline: float, out: Path) -> dict:
    """Start `engine`'s server, warm it up, replay the trace, stop it: what happened, request by request."""
    port = free_port()
    command, env = server_launch(engine, args, folders, port, plan["max_model_len"], plan["cache_tokens"])
    family = engine.split(":")[0]
    model_id = folders[family]
    log = out / f"load_{engine.replace(':', '_')}.log"
    result = {"engine": engine, "status": "failed", "command": command, "log": str(log),
              "env": {k: env[k] for k in ("SPARSE_PREFILL_CONFIG", "PYTHONPATH") if k in env}}
    started = time.perf_counter()
    try:
        with running_server(command, env, log, port, min(args.start_timeout, max(1.0, deadline - time.time()))):
            result["startup_s"] = time.perf_counter() - started
            base = f"http://127.0.0.1:{port}/v1"
            warm = asyncio.run(replay(base, model_id, plan["warm_up"], plan["warm_up_prompts"], FORCE_LENGTH[family],
                                      deadline, args.request_timeout))
            failed = [r["error"] for r in warm if r["error"]]
            if failed:
                raise RuntimeError(f"the warm-up requests failed: {failed}")
            result["warm_up_s"] = time.perf_counter() - started - result["startup_s"]
            result["records"] = asyncio.run(replay(base, model_id, plan["trace"], plan["prompts"],
                                                   FORCE_LENGTH[family], deadline, args.request_timeout))
    except Exception:  # noqa: BLE001 - recorded; the next engine still runs
        result["error"] = traceback.format_exc()
        return result
    errors = sum(r["error"] is not None for r in result["records"])
    result["status"] = "ok" if not errors else f"{errors} failed"
    return result


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def percentile(values, q: float) -> float | None:
    """The q-th percentile (0-100), linear between the nearest ranks (numpy's default); None for no values."""
    values = sorted(values)
    if not values:
        return None
    at = (len(values) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (at - low)


def answer_scores(trace: list[dict], prompts: list[dict], records: list[dict]) -> dict[int, float]:
    """Request id -> score (eval.scoring, `contains`) of each long request that finished."""
    from sparse_prefill.eval.scoring import score

    finished = {r["id"]: r["text"] for r in records if r["error"] is None}
    return {item["id"]: score(finished[item["id"]], prompt["answers"])
            for item, prompt in zip(trace, prompts, strict=True) if item["kind"] == "long" and item["id"] in finished}


def engine_metrics(trace: list[dict], prompts: list[dict], records: list[dict]) -> dict:
    """TTFT percentiles of long and short requests, output tokens/s and requests/s over the makespan, answers."""
    kinds, asked = ({item["id"]: item[key] for item in trace} for key in ("kind", "new_tokens"))
    arrivals = {item["id"]: item["arrival_s"] for item in trace}
    done = [r for r in records if r["error"] is None]
    makespan = max(r["finished_s"] for r in done) - min(r["sent_s"] for r in done) if done else None
    metrics = {"done": len(done), "requests": len(records), "makespan_s": makespan}
    for kind in ("long", "short"):
        ttft = [r["ttft_s"] for r in done if kinds[r["id"]] == kind]
        metrics[f"ttft_{kind}_p50_s"], metrics[f"ttft_{kind}_p90_s"] = percentile(ttft, 50), percentile(ttft, 90)
    tokens = sum(r["output_tokens"] for r in done)
    metrics["output_tokens"] = tokens
    metrics["output_tps"] = tokens / makespan if makespan else None
    metrics["requests_per_s"] = len(done) / makespan if makespan else None
    scores = answer_scores(trace, prompts, records)
    metrics["answers"] = f"{sum(scores.values()):g}/{len(scores)}" if scores else None
    metrics["short_outputs"] = sum(r["output_tokens"] < asked[r["id"]] for r in done)  # ended before max_tokens
    counted = {item["id"]: p["prompt_tokens"] for item, p in zip(trace, prompts, strict=True)}
    metrics["prompt_tokens_differ"] = sum(r.get("server_prompt_tokens") not in (None, counted[r["id"]])
                                          for r in done)  # the server tokenized the text otherwise
    metrics["max_send_lag_s"] = max((r["sent_s"] - arrivals[r["id"]] for r in records), default=None)
    return metrics


def paired_answers(dense: dict[int, float], sparse: dict[int, float]) -> dict:
    """Lost and gained against dense, on the long requests both answered."""
    both = sorted(set(dense) & set(sparse))
    return {"paired": len(both), "lost": sum(sparse[i] < dense[i] for i in both),
            "gained": sum(sparse[i] > dense[i] for i in both)}


def summary_rows(results: dict, trace: list[dict], prompts: list[dict]) -> list[dict]:
    """One row an engine: its metrics, and against the dense engine of its family the speed-ups (x > 1: faster)
    and the answers lost and gained."""
    rows = []
    for engine, run in results.items():
        row = {"engine": engine, "status": run["status"]}
        if run.get("records"):
            row.update(engine_metrics(trace, prompts, run["records"]))
            row["done"] = f"{row['done']}/{row['requests']}"
        dense = results.get(DENSE[engine.split(":")[0]], {})
        if engine not in DENSE.values() and run.get("records") and dense.get("records"):
            reference = engine_metrics(trace, prompts, dense["records"])
            row.update(paired_answers(answer_scores(trace, prompts, dense["records"]),
                                      answer_scores(trace, prompts, run["records"])))
            for kind in ("long", "short"):
                for q in ("p50", "p90"):
                    row[f"{kind}_{q}_x"] = ratio(reference[f"ttft_{kind}_{q}_s"], row[f"ttft_{kind}_{q}_s"])
            row["output_tps_x"] = ratio(row["output_tps"], reference["output_tps"])
        rows.append(row)
    return rows


SUMMARY_COLUMNS = ["engine", "status", "done", "ttft_long_p50_s", "ttft_long_p90_s", "ttft_short_p50_s",
                   "ttft_short_p90_s", "output_tps", "requests_per_s", "answers", "lost", "gained", "long_p50_x",
                   "long_p90_x", "short_p50_x", "short_p90_x", "output_tps_x"]


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig

    from sparse_prefill.eval.archs import TINY, tiny_model
    from sparse_prefill.eval.runner import format_table

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.time_limit
    folders = {"vllm": None if args.model == TINY else model_folder(args.model, "vllm")}
    # What transformers serve loads: the model's files, YaRN in its config (or the tiny model, saved)
    folders["transformers"] = serve_folder(folders["vllm"], args.yarn or None,
                                           *(tiny_model() if args.model == TINY else ()))
    try:
        context = AutoConfig.from_pretrained(folders["transformers"]).get_text_config().max_position_embeddings
        tok = tokenizer_for(args.model, folders["vllm"])
        plan = make_plan(args, tok, context)
        trace, prompts = plan["trace"], plan["prompts"]
        results = {"args": {k: v for k, v in vars(args).items() if k != "sparse_config"},
                   "config": str(args.sparse_config), "context": context, "long_lengths": plan["long_lengths"],
                   "max_model_len": plan["max_model_len"], "cb_cache_tokens": plan["cache_tokens"],
                   "trace": [{**r, "prompt_tokens": p["prompt_tokens"], "answers": p["answers"]}
                             for r, p in zip(trace, prompts, strict=True)],
                   "trace_texts": str(out / "load_trace.json"), "engines": {}, "summary": []}
        (out / "load_trace.json").write_text(json.dumps([p["text"] for p in prompts]))
        print(f"trace: {len(trace)} requests over {trace[-1]['arrival_s']:.1f} s, "
              f"{sum(r['kind'] == 'long' for r in trace)} long of {','.join(map(str, plan['long_lengths']))} tokens; "
              f"context {context}, max_model_len {plan['max_model_len']}", flush=True)
        for n, engine in enumerate(args.engines):
            share = time.time() + (deadline - time.time()) / (len(args.engines) - n)  # of the time left
            if time.time() >= deadline:
                results["engines"][engine] = {"status": "skipped", "error": "skipped: out of time (--time-limit)"}
            else:
                print(f"\n== {engine}", flush=True)
                try:
                    results["engines"][engine] = run_engine(engine, args, folders, plan, share, out)
                except Exception:  # noqa: BLE001 - the next engine still runs
                    results["engines"][engine] = {"status": "failed", "error": traceback.format_exc()}
            run = results["engines"][engine]
            if run.get("records"):
                run["metrics"] = engine_metrics(trace, prompts, run["records"])
            print(f"{engine}: {run['status']}" + (f": {run['error'].strip().splitlines()[-1]}" if run.get("error")
                                                 else f" (start {run['startup_s']:.0f} s)"), flush=True)
            results["summary"] = summary_rows(results["engines"], trace, prompts)
            (out / "load.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        shutil.rmtree(folders["transformers"], ignore_errors=True)
    notes = [f"long lengths cut to {plan['long_lengths'][-1]} tokens to fit the context ({context}) with their "
             "answers"] if max(args.long_lengths) > plan["long_lengths"][-1] else []
    for row in results["summary"]:
        if row.get("short_outputs"):
            notes.append(f"{row['engine']}: {row['short_outputs']} requests ended before their new_tokens (the "
                         "server did not generate all max_tokens: output lengths not forced)")
        if row.get("prompt_tokens_differ"):
            notes.append(f"{row['engine']}: {row['prompt_tokens_differ']} prompts tokenized to another length than "
                         "the trace's")
        if (row.get("max_send_lag_s") or 0) > 0.5:
            notes.append(f"{row['engine']}: a request was sent {row['max_send_lag_s']:.1f} s late (the client fell "
                         "behind the trace)")
    print("\n" + "\n".join(notes + [f"written: {out / 'load.json'}"]))
    print(f"\nsummary ({len(trace)} requests at {args.rate:g}/s; x: against the dense engine of the family, > 1 "
          f"faster)\n{format_table(results['summary'], SUMMARY_COLUMNS)}")
    return 0 if all(run["status"] == "ok" for run in results["engines"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
