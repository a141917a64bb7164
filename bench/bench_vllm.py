"""Sparse prefill in vLLM against vLLM's own FlashAttention backend, in one command on one GPU.

    python3 bench/bench_vllm.py --models MODELS/qwen05,MODELS/qwen15 --yarn 4

Per model, two engines in the same run, each in a process of its own (a crash or out-of-memory in one cannot
take the other's figures): FLASH_ATTN (vLLM's FlashAttention backend: dense) and CUSTOM (sparse_prefill's
backend; SPARSE_PREFILL_CONFIG from --config). Both get the same token ids, built here from the model's
tokenizer, and the same engine settings (prefix caching off, so repeats prefill again).

Stages (--stages; a failing stage is recorded and the rest run):
  ttft     one niah_single prompt per --lengths, max_tokens=1, best of --repeats: time to first token
  gather   CUSTOM only, one prompt per length with the backend's timings on: per sparse request and layer, the
           paged gather and the sparse attention it feeds, timed apart with CUDA events (synchronised, so these
           runs are not the TTFT runs)
  answers  the long retrieval prompts (--tasks x --lengths x --seeds), greedy; scored (eval.scoring) and paired:
           how many prompts sparse lost or gained against dense on the same prompt
  yarn     FLASH_ATTN's first-token log-probabilities after each --lengths prompt against the transformers
           model's (sdpa, the same YaRN) on the same ids: does vLLM apply YaRN as transformers does?
  mixed    --long long prompts (--mixed-long) and --short prompts of --short-length tokens submitted at once
           (--passes times; the last pass is reported, the first one's wall time beside it),
           --new-tokens each: wall time, tokens/s, mean time to first token of each kind
Each stage prints a table; the summary table comes last; $OUT/vllm.json (or --out) is rewritten after every
engine. --time-limit bounds the whole run: stages not started in time are recorded as skipped.

`--engine stub` runs the wiring on a CPU with a stand-in engine and the tiny model's tokenizer (a check of the
script, not a measurement): `--models sparse-prefill-tiny --engine stub --lengths 2k,3k`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_prefill.eval.options import parse_lengths  # noqa: E402  (no torch: --help stays light)

BACKENDS = ("FLASH_ATTN", "CUSTOM")  # dense first: its answers are the reference
STAGES = ("ttft", "gather", "answers", "mixed", "yarn")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct",
                   help="Hugging Face model folders, or pinned names converted into the cache "
                        "(`sparse-prefill fetch-model NAME --safetensors`)")
    p.add_argument("--yarn", type=float, default=4.0, help="YaRN factor through hf_overrides (0: none)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("32k,64k,128k"))
    p.add_argument("--repeats", type=int, default=2, help="ttft: best of this many")
    p.add_argument("--tasks", default="niah_single,niah_multikey")
    p.add_argument("--seeds", type=int, default=2, help="answers: prompts per task and length")
    p.add_argument("--mixed-long", type=parse_lengths, default=parse_lengths("64k,120k"))
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--short-length", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64, help="mixed: tokens generated per request")
    p.add_argument("--passes", type=int, default=2, help="mixed: send the mix this many times; the figures are the "
                   "last pass's, first_wall_s the first's (which pays any kernel compile)")
    p.add_argument("--config", default="", help="SPARSE_PREFILL_CONFIG for CUSTOM, e.g. gamma=0.9 (default: "
                                                "the library defaults)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's prefill chunk budget (default: vLLM's own)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6,
                   help="vLLM's share of GPU memory; the rest leaves room for the sparse path's buffers, which "
                        "vLLM's profiling run does not see")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile or CUDA graphs (faster start)")
    p.add_argument("--time-limit", type=float, default=570.0, help="seconds for the whole run")
    p.add_argument("--engine", choices=("vllm", "stub"), default="vllm")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_vllm_out"))
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "BACKEND", "PLAN", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.stages = [s for s in args.stages.split(",") if s]
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    from sparse_prefill.config import config_from_text

    config_from_text(args.config)  # a mistake fails here, not in two engines later
    return args


# ------------------------------------------------------------------------------------------------
# Engines: vLLM's LLM, or a stand-in with the same three methods
# ------------------------------------------------------------------------------------------------

def yarn_overrides(folder: str, factor: float) -> dict:
    """YaRN as the config fields it changes, for vLLM's `hf_overrides` (a dict: vLLM also calls a callable on
    configs that are not the model's own, which have no trained context to scale)."""
    from transformers import AutoConfig

    from sparse_prefill.eval.models import with_yarn

    config = with_yarn(AutoConfig.from_pretrained(folder), factor)
    rope = {k: getattr(config, k) for k in ("rope_parameters", "rope_scaling") if getattr(config, k, None)}
    return {**rope, "max_position_embeddings": config.max_position_embeddings}


class VllmEngine:
    """One vLLM `LLM` with one attention backend, its engine core in this process (so the backend's timings are
    readable here)."""

    def __init__(self, args, folder: str, backend: str, max_model_len: int):
        from vllm import LLM

        from sparse_prefill.patches.vllm import register

        register()  # what vLLM's plugin loader does when the package is installed; a checkout on PYTHONPATH is not

        extra = {"hf_overrides": yarn_overrides(folder, args.yarn)} if args.yarn else {}
        if args.max_num_batched_tokens:
            extra["max_num_batched_tokens"] = args.max_num_batched_tokens
        self.llm = LLM(folder, attention_backend=backend, dtype="bfloat16", max_model_len=max_model_len,
                       enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
                       tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
                       disable_log_stats=False, seed=0, **extra)
        config = self.llm.llm_engine.vllm_config
        import vllm

        self.settings = {"vllm": vllm.__version__, "backend": backend, "max_model_len": max_model_len,
                         "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                         "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
                         "enforce_eager": args.enforce_eager, "tensor_parallel_size": args.tensor_parallel_size}

    def generate(self, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False) -> list[dict]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
        return [{"tokens": list(o.outputs[0].token_ids), "text": o.outputs[0].text, "wall_s": wall,
                 "ttft_s": o.metrics.first_token_latency if o.metrics is not None else None} for o in outs]

    def top_logprobs(self, ids: list[int], k: int) -> dict[int, float]:
        """The k most likely first tokens after the prompt, with their log-probabilities (vLLM's own)."""
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, logprobs=k),
                                use_tqdm=False)[0]
        return {int(token): float(entry.logprob) for token, entry in out.outputs[0].logprobs[0].items()}

    def timings(self, on: bool) -> list[dict] | None:
        """Start (on) or stop and return the sparse backend's per-request timings (None: not readable here)."""
        if "sparse_prefill.patches.vllm.backend" not in sys.modules:
            return None
        backend = sys.modules["sparse_prefill.patches.vllm.backend"]
        collected, backend.TIMINGS = backend.TIMINGS, ([] if on else None)
        return collected


class StubEngine:
    """A stand-in engine: prefill 'takes' 1 us per token (half that for CUSTOM), answers echo nothing. It fails to
    start for the backend named by $BENCH_VLLM_STUB_FAIL (to check that the run survives a failed engine)."""

    def __init__(self, args, folder: str, backend: str, max_model_len: int):
        if os.environ.get("BENCH_VLLM_STUB_FAIL") == backend:
            raise RuntimeError(f"stub engine {backend} told to fail")
        self.backend, self.settings = backend, {"vllm": "stub", "backend": backend, "max_model_len": max_model_len}
        self._timings = None

    def generate(self, prompts, max_tokens, ignore_eos=False):
        rate = 1e-6 if self.backend == "FLASH_ATTN" else 5e-7
        if self._timings is not None:
            self._timings += [{"layer": "l0", "queries": len(p), "keys": len(p), "gather_ms": 0.1, "attend_ms": 0.9}
                              for p in prompts]
        return [{"tokens": [1] * max_tokens, "text": "stub", "wall_s": rate * len(p), "ttft_s": rate * len(p)}
                for p in prompts]

    def timings(self, on):
        collected, self._timings = self._timings, ([] if on else None)
        return collected

    def top_logprobs(self, ids, k):
        return {token: -1.0 - i for i, token in enumerate(sorted(set(ids))[:k])}


# ------------------------------------------------------------------------------------------------
# The worker: one engine, the stages of the plan, a result file rewritten after each stage
# ------------------------------------------------------------------------------------------------

def run_worker(args) -> int:
    model, backend, plan_path, result_path = args.worker
    plan = json.loads(Path(plan_path).read_text())
    result = {"model": model, "backend": backend, "stages": {}, "errors": {}}

    def save():
        Path(result_path).write_text(json.dumps(result, default=str))

    started = time.perf_counter()
    try:
        engine = (StubEngine if args.engine == "stub" else VllmEngine)(args, plan["folder"], backend,
                                                                      plan["max_model_len"])
    except Exception:  # noqa: BLE001 - the parent records it and runs the next engine
        result["errors"]["engine"] = traceback.format_exc()
        save()
        return 1
    result["settings"], result["startup_s"] = engine.settings, time.perf_counter() - started
    save()
    for stage in args.stages:
        if (stage == "gather" and backend != "CUSTOM") or (stage == "yarn" and backend != "FLASH_ATTN"):
            continue
        if args.deadline is not None and time.time() > args.deadline:
            result["errors"][stage] = "skipped: out of time (--time-limit)"
        else:
            try:
                result["stages"][stage] = WORKER_STAGES[stage](engine, plan, args)
            except Exception:  # noqa: BLE001 - one stage's failure must not cost the others' figures
                result["errors"][stage] = traceback.format_exc()
                print(result["errors"][stage], file=sys.stderr, flush=True)
        save()
    return 0


def stage_ttft(engine, plan, args) -> list[dict]:
    rows = []
    engine.generate([plan["warmup"]], 1)
    for item in plan["ttft"]:
        runs = [engine.generate([item["ids"]], 1)[0] for _ in range(args.repeats)]
        rows.append({"length": item["length"], "ttft_s": min(r["ttft_s"] or r["wall_s"] for r in runs),
                     "wall_s": min(r["wall_s"] for r in runs)})
    return rows


def stage_gather(engine, plan, args) -> list[dict]:
    rows = []
    for item in plan["ttft"]:
        engine.timings(True)
        engine.generate([item["ids"]], 1)
        timings = engine.timings(False)
        if timings is None:
            raise RuntimeError("the backend's timings are not readable in this process (engine core elsewhere)")
        gather, attend = sum(t["gather_ms"] for t in timings), sum(t["attend_ms"] for t in timings)
        rows.append({"length": item["length"], "sparse_calls": len(timings), "gather_ms": gather,
                     "attend_ms": attend, "gather_share": gather / (gather + attend) if timings else None})
    return rows


def stage_answers(engine, plan, args) -> list[dict]:
    outs = engine.generate([item["ids"] for item in plan["answers"]], plan["answer_tokens"])
    return [{"key": item["key"], "text": out["text"]} for item, out in zip(plan["answers"], outs, strict=True)]


def stage_mixed(engine, plan, args) -> dict:
    mixed = plan["mixed"]
    engine.generate([mixed["short"][0]], 2)  # warm up
    walls = []
    for _ in range(args.passes):  # the first pass meets new lengths: any kernel compile lands there
        start = time.perf_counter()
        outs = engine.generate(mixed["long"] + mixed["short"], args.new_tokens, ignore_eos=True)
        walls.append(time.perf_counter() - start)
    wall = walls[-1]
    n_long = len(mixed["long"])
    generated = sum(len(o["tokens"]) for o in outs)
    prompt = sum(len(p) for p in mixed["long"] + mixed["short"])

    def mean_ttft(chosen):
        values = [o["ttft_s"] for o in chosen if o["ttft_s"] is not None]
        return statistics.mean(values) if values else None

    return {"requests": f"{n_long} long + {len(outs) - n_long} short", "first_wall_s": walls[0], "wall_s": wall,
            "generated_tps": generated / wall, "total_tps": (generated + prompt) / wall,
            "ttft_long_s": mean_ttft(outs[:n_long]), "ttft_short_s": mean_ttft(outs[n_long:]),
            "tokens": [o["tokens"] for o in outs]}


def stage_yarn(engine, plan, args) -> list[dict]:
    """FLASH_ATTN's first-token log-probabilities on the TTFT prompts, for `yarn_check` (vLLM's YaRN against
    transformers')."""
    return [{"length": item["length"], "top": engine.top_logprobs(item["ids"], YARN_TOP)} for item in plan["ttft"]]


YARN_TOP = 20


def yarn_check(plan, dense: dict, args) -> list[dict]:
    """Whether vLLM applies YaRN as transformers does: the first token's log-probabilities after each TTFT prompt,
    vLLM's FLASH_ATTN against the transformers model (sdpa, one-shot, the same YaRN overrides) on the same ids.
    bf16 puts some noise in both; a rope that differs moves the distribution far more than that."""
    import torch

    from sparse_prefill.eval.archs import resolve_model

    rows = dense["stages"].get("yarn") or []
    if not rows or args.engine == "stub":
        return []
    model, _, _ = resolve_model(plan["folder"], device=torch.device("cuda"), yarn=args.yarn or None)
    model.set_attn_implementation("sdpa")
    ids = {item["length"]: item["ids"] for item in plan["ttft"]}
    table = []
    try:
        for row in rows:
            with torch.no_grad():
                logits = model(torch.tensor([ids[row["length"]]], device="cuda"), use_cache=False,
                               logits_to_keep=1).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, -1)
            theirs = {int(t): float(v) for v, t in zip(*logprobs.topk(YARN_TOP), strict=True)}
            ours = {int(t): v for t, v in row["top"].items()}
            shared = set(ours) & set(theirs)
            top = max(ours, key=ours.get)
            table.append({"length": row["length"], "same_top1": top == max(theirs, key=theirs.get),
                          "vllm_top1_p": math.exp(ours[top]), "hf_p_of_it": math.exp(float(logprobs[top])),
                          "shared_of_top20": len(shared),
                          "max_abs_dlogprob": max((abs(ours[t] - theirs[t]) for t in shared), default=None)})
    finally:
        del model
        torch.cuda.empty_cache()
    return table


WORKER_STAGES = {"ttft": stage_ttft, "gather": stage_gather, "answers": stage_answers, "mixed": stage_mixed,
                 "yarn": stage_yarn}


# ------------------------------------------------------------------------------------------------
# The parent: prompts, one worker per engine, pairing and tables
# ------------------------------------------------------------------------------------------------

def model_folder(name: str, engine: str) -> str:
    """A Hugging Face folder vLLM can load, from a folder or a pinned name converted into the cache."""
    if Path(name).is_dir() or engine == "stub":
        return name
    from sparse_prefill.eval.models import PINS, cached

    found = cached(name) if name in PINS else None
    if found is not None and found.is_dir():
        return str(found)
    raise SystemExit(f"{name!r} is no model folder{' in the cache' if name in PINS else ''}: vLLM loads a Hugging "
                     f"Face folder; `sparse-prefill fetch-model {name} --safetensors` converts a pinned model once.")


def tokenizer_for(name: str, folder: str):
    from sparse_prefill.eval.archs import TINY, byte_tokenizer

    if name == TINY:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def make_plan(args, name: str, folder: str) -> dict:
    """The token ids every engine of this model gets, and what scoring them needs."""
    from sparse_prefill.eval.tasks import make_example

    tok = tokenizer_for(name, folder)

    def example(task, length, seed, depth=0.5):
        return make_example(task, tok, length, depth, seed, haystack="prose")

    answers, keys = [], {}
    for task in args.tasks if "answers" in args.stages else []:
        for length in args.lengths:
            for seed in range(args.seeds):
                ex = example(task, length, seed, depth=(seed + 0.5) / args.seeds)
                key = f"{task}/{length}/{seed}"
                answers.append({"key": key, "ids": list(ex.input_ids)})
                keys[key] = {"task": task, "length": length, "seed": seed, "answers": list(ex.answers),
                             "max_new_tokens": ex.max_new_tokens}
    answer_tokens = max((k["max_new_tokens"] for k in keys.values()), default=32)
    longest = max([*args.lengths, *args.mixed_long, args.short_length])
    return {"folder": folder, "max_model_len": longest + max(answer_tokens, args.new_tokens) + 64,
            "warmup": list(example("niah_single", min(args.lengths), 99).input_ids),
            "ttft": [{"length": n, "ids": list(example("niah_single", n, 0).input_ids)} for n in args.lengths],
            "answers": answers, "answer_keys": keys, "answer_tokens": answer_tokens,
            "mixed": {"long": [list(example("niah_single", n, 10 + i).input_ids)
                               for i, n in enumerate(args.mixed_long)],
                      "short": [list(example("niah_single", args.short_length, 20 + i).input_ids)
                                for i in range(args.short)]}}


def worker_command(args, argv, name, backend, plan_path, result_path, deadline) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name, backend, str(plan_path),
            str(result_path), "--deadline", str(deadline)]


def vllm_env(backend: str, config: str, environ, pythonpath: str = "") -> dict:
    """The environment a vLLM engine of `backend` runs in (bench_vllm's workers, bench_load's `vllm serve`):
    `environ` with SPARSE_PREFILL_CONFIG=`config` for CUSTOM, this checkout (after `pythonpath`) on PYTHONPATH."""
    return {**environ, "SPARSE_PREFILL_CONFIG": config if backend == "CUSTOM" else "",
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",  # a 128K prompt plus its answer just past YaRN x4's 131072
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            # greedy decoding samples nothing; with FlashInfer's sampler on, vLLM imports FlashInfer at start
            "VLLM_USE_FLASHINFER_SAMPLER": environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0"),
            "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT), environ.get("PYTHONPATH", "")) if p)}


def run_engine(args, argv, name, backend, plan_path, tmp: Path, deadline: float) -> dict:
    """One engine in its own process; whatever it wrote, even if it died or ran out of time."""
    result_path = tmp / f"{len(list(tmp.iterdir()))}_{backend}.json"
    env = {**vllm_env(backend, args.config, os.environ),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine core in the worker: the backend's timings readable
    started = time.perf_counter()
    try:
        proc = subprocess.run(worker_command(args, argv, name, backend, plan_path, result_path, deadline), env=env,
                              timeout=max(1.0, deadline - time.time() + 30))
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = "killed: out of time (--time-limit)"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"stages": {}, "errors": {}}
    result.update(status=status, seconds=time.perf_counter() - started)
    if not result_path.exists() or status.startswith("killed") or status != "exit 0":
        result["errors"].setdefault("process", status)
    return result


def ratio(a, b):
    return a / b if a and b else None


def pair_answers(plan, dense: dict, sparse: dict) -> list[dict]:
    from sparse_prefill.eval.scoring import paired_difference, score

    texts = {b: {r["key"]: r["text"] for r in run["stages"].get("answers", [])} for b, run in
             (("dense", dense), ("sparse", sparse))}
    rows = []
    for length in sorted({k["length"] for k in plan["answer_keys"].values()}):
        keys = [key for key, k in plan["answer_keys"].items() if k["length"] == length]
        keys = [key for key in keys if key in texts["dense"] and key in texts["sparse"]]
        if not keys:
            continue
        scores = {b: [score(texts[b][key], plan["answer_keys"][key]["answers"]) for key in keys] for b in texts}
        diffs = [s - d for s, d in zip(scores["sparse"], scores["dense"], strict=True)]
        rows.append({"length": length, "prompts": len(keys), "dense_right": sum(scores["dense"]),
                     "sparse_right": sum(scores["sparse"]), "lost": sum(d < 0 for d in diffs),
                     "gained": sum(d > 0 for d in diffs), "vs_dense": paired_difference(diffs)[0]})
    return rows


def compare(plan, dense: dict, sparse: dict) -> dict:
    """The model's tables: TTFT dense vs sparse, gather share, answers paired, mixed workload."""
    ttft = []
    by_length = {b: {r["length"]: r for r in run["stages"].get("ttft", [])} for b, run in
                 (("dense", dense), ("sparse", sparse))}
    gather = {r["length"]: r for r in sparse["stages"].get("gather", [])}
    for length in sorted(set(by_length["dense"]) | set(by_length["sparse"])):
        d, s = by_length["dense"].get(length, {}), by_length["sparse"].get(length, {})
        ttft.append({"length": length, "dense_s": d.get("ttft_s"), "sparse_s": s.get("ttft_s"),
                     "speedup": ratio(d.get("ttft_s"), s.get("ttft_s")),
                     "gather_share": gather.get(length, {}).get("gather_share")})
    mixed = []
    for label, run in (("dense", dense), ("sparse", sparse)):
        m = run["stages"].get("mixed")
        if m:
            mixed.append({"mode": label, **{k: v for k, v in m.items() if k != "tokens"}})
    if len(mixed) == 2:
        mixed[1]["throughput_x"] = ratio(mixed[1]["total_tps"], mixed[0]["total_tps"])
        same = [a == b for a, b in zip(dense["stages"]["mixed"]["tokens"], sparse["stages"]["mixed"]["tokens"],
                                       strict=True)]
        mixed[1]["same_tokens"] = f"{sum(same)} of {len(same)}"
    return {"ttft": ttft, "gather": list(gather.values()), "answers": pair_answers(plan, dense, sparse),
            "mixed": mixed}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    from sparse_prefill.eval.runner import format_table

    deadline = time.time() + args.time_limit
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "deadline")}, "models": {}}
    summary, failed = [], False
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as tmp_name:
        tmp = Path(tmp_name)
        for m, name in enumerate(args.models):
            print(f"\n== {name}", flush=True)
            entry = results["models"].setdefault(name, {})
            try:
                folder = model_folder(name, args.engine)
                plan = make_plan(args, name, folder)
            except (Exception, SystemExit) as err:  # noqa: BLE001 - the next model still runs
                entry["error"] = f"{type(err).__name__}: {err}"
                print(entry["error"], flush=True)
                failed = True
                continue
            plan_path = tmp / f"plan{m}.json"
            plan_path.write_text(json.dumps(plan))
            runs = {}
            for b, backend in enumerate(BACKENDS):
                left = len(args.models) * len(BACKENDS) - (m * len(BACKENDS) + b)  # engines still to run
                share = time.time() + (deadline - time.time()) / left
                runs[backend] = run_engine(args, argv, name, backend, plan_path, tmp, share)
                entry[backend] = runs[backend]
                failed |= bool(runs[backend]["errors"])
                for stage, error in runs[backend]["errors"].items():
                    print(f"{backend} {stage}: {str(error).strip().splitlines()[-1]}", flush=True)
                (out / "vllm.json").write_text(json.dumps(results, indent=1, default=str))
            tables = compare(plan, runs["FLASH_ATTN"], runs["CUSTOM"])
            if "yarn" in args.stages:
                try:
                    tables["yarn"] = yarn_check(plan, runs["FLASH_ATTN"], args)
                except Exception:  # noqa: BLE001 - the check must not cost the figures above
                    tables["yarn"] = []
                    entry["yarn_error"] = traceback.format_exc()
                    print(entry["yarn_error"], flush=True)
            entry["tables"] = tables
            for title, rows in tables.items():
                if rows:
                    print(f"\n{name}: {title}\n{format_table(rows, list(rows[-1]))}", flush=True)
            row = {"model": Path(name).name}
            for t in tables["ttft"]:
                row[f"ttft_x_{t['length'] // 1024}k"] = t["speedup"]
            longest = tables["ttft"][-1] if tables["ttft"] else {}
            row["gather_share_max_len"] = longest.get("gather_share")
            row["answers_lost"] = sum(r["lost"] for r in tables["answers"]) if tables["answers"] else None
            row["answers_gained"] = sum(r["gained"] for r in tables["answers"]) if tables["answers"] else None
            row["mixed_throughput_x"] = tables["mixed"][-1].get("throughput_x") if tables["mixed"] else None
            summary.append(row)
            (out / "vllm.json").write_text(json.dumps(results, indent=1, default=str))
    results["summary"] = summary
    (out / "vllm.json").write_text(json.dumps(results, indent=1, default=str))
    if summary:
        print(f"\nsummary (CUSTOM against FLASH_ATTN; x > 1: CUSTOM faster)\n{format_table(summary, list(summary[0]))}")
    print(f"written: {out / 'vllm.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
