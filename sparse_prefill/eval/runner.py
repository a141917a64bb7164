"""Run examples dense and sparse on the same model and inputs; score, time and summarise them.

Per example and mode ("dense": the model's own attention; "sparse": `patch_model` with the given
config) we greedy-decode the answer and record: score, time to first token (the prefill forward,
synchronised), peak accelerator memory during prefill, and for sparse the density the selection
chose per layer and head. Rows go to a JSON-lines file as they come, so a long run that stops
early keeps what it measured.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from ..config import SparsePrefillConfig
from ..patches import patch_model, unpatch_model
from .recording import LayoutRecorder, intercept_layouts, num_layers
from .scoring import score
from .tasks import Example

MODES = ("dense", "sparse")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def timed_prefill(model, input_ids: torch.Tensor, use_cache: bool = True):
    """(outputs, seconds, peak bytes or None): one prefill forward, logits for the last token only."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=use_cache, logits_to_keep=1)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out, seconds, peak


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return {i for i in ids if i is not None}


def _cache_of(outputs):
    """The KV cache of a forward (transformers renamed `past_key_values` to `cache` in 5.2x)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_answer(model, tokenizer, input_ids: Sequence[int], max_new_tokens: int):
    """(decoded answer, TTFT seconds, peak prefill bytes or None) with greedy decoding."""
    generated, ttft, peak = greedy_tokens(model, tokenizer, input_ids, max_new_tokens)
    return tokenizer.decode(generated, skip_special_tokens=True), ttft, peak


@torch.inference_mode()
def greedy_tokens(model, tokenizer, input_ids: Sequence[int], max_new_tokens: int):
    """(generated token ids, TTFT seconds, peak prefill bytes or None) with greedy decoding; the last id
    is an end-of-sequence token unless `max_new_tokens` ran out first."""
    ids = torch.tensor([list(input_ids)], device=model_device(model))
    out, ttft, peak = timed_prefill(model, ids)
    cache, cache_kwarg, eos = _cache_of(out), _cache_kwarg(model), _eos_ids(model, tokenizer)
    token = out.logits[:, -1].argmax(-1)
    generated = []
    for step in range(max_new_tokens):
        generated.append(int(token))
        if generated[-1] in eos or step == max_new_tokens - 1:
            break
        out = model(input_ids=token[:, None], use_cache=True, **{cache_kwarg: cache})
        token = out.logits[:, -1].argmax(-1)
    return generated, ttft, peak


@torch.inference_mode()
def forced_argmax(model, input_ids: Sequence[int], answer: Sequence[int]) -> list[int]:
    """The greedy choice at each position of `answer` when the model is fed that answer (teacher forcing).

    One prefill with a cache, then `answer[:-1]` as one more chunk, as a decode loop would feed it.
    Where the result equals `answer`, greedy decoding would have written `answer` itself, so a
    sparse prefill that agrees with dense here keeps dense's answer token for token, at the cost of
    two forwards instead of a decode loop.
    """
    device = model_device(model)
    out = model(input_ids=torch.tensor([list(input_ids)], device=device), use_cache=True, logits_to_keep=1)
    choices = [int(out.logits[0, -1].argmax())]
    if len(answer) > 1:
        rest = torch.tensor([list(answer[:-1])], device=device)
        out = model(input_ids=rest, use_cache=True, **{_cache_kwarg(model): _cache_of(out)})
        choices += out.logits[0].argmax(-1).tolist()
    return choices


def set_mode(model, mode: str, config: SparsePrefillConfig):
    """Switch `model` to dense or sparse attention (in place); returns the model."""
    if mode == "sparse":
        return patch_model(model, config)
    if mode == "dense":
        return unpatch_model(model)
    raise ValueError(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}.")


def _warm_up(model, examples: list[Example], modes, config) -> None:
    """One untimed prefill per (length, mode): compiles and autotunes before anything is timed."""
    device = model_device(model)
    seen = {}
    for ex in examples:
        seen.setdefault(ex.length, ex)
    with torch.inference_mode():
        for mode in modes:
            set_mode(model, mode, config)
            for ex in seen.values():
                timed_prefill(model, torch.tensor([list(ex.input_ids)], device=device), use_cache=False)
    unpatch_model(model)


def run_examples(model, tokenizer, examples: Iterable[Example], config: SparsePrefillConfig,
                 modes: Sequence[str] = MODES, metric: str = "contains", jsonl: str | Path | None = None,
                 progress: bool = True, warmup: bool | None = None, extra: dict | None = None) -> list[dict]:
    """Run each example in each mode; returns (and appends to `jsonl`) one row per (example, mode).

    warmup defaults to True on CUDA (first calls compile kernels) and False on CPU.
    """
    from tqdm.auto import tqdm

    examples = list(examples)
    device = model_device(model)
    if warmup if warmup is not None else device.type == "cuda":
        _warm_up(model, examples, modes, config)
    recorder = LayoutRecorder(num_layers(model))
    rows = []
    sink = open(jsonl, "a") if jsonl else nullcontext()
    bar = tqdm(total=len(examples) * len(modes), disable=not progress, desc="examples x modes", leave=False)
    try:
        with sink as out, intercept_layouts(model, recorder):
            for ex in examples:
                for mode in modes:
                    set_mode(model, mode, config)
                    recorder.reset()
                    answer, ttft, peak = greedy_answer(model, tokenizer, ex.input_ids, ex.max_new_tokens)
                    row = {"task": ex.task, "length": ex.length, "depth": ex.depth, "seed": ex.seed, "mode": mode,
                           "score": score(answer, ex.answers, metric), "answer": answer,
                           "expected": list(ex.answers), "ttft_s": ttft, "peak_mem_bytes": peak,
                           **(extra or {})}
                    if mode == "sparse":
                        row.update(density=recorder.mean_density(), sparse_layers=recorder.sparse_layers,
                                   layer_head_density=recorder.layer_head_density())
                    rows.append(row)
                    if out is not None:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                    bar.update(1)
    finally:
        bar.close()
        unpatch_model(model)
    return rows


# ---------------------------------------------------------------- summaries

def _prompt(row: dict) -> tuple:
    """What identifies one prompt across modes (and across the `extra` fields a run adds, e.g. gamma)."""
    return tuple(row.get(k) for k in ("task", "length", "depth", "seed"))


def summarize(rows: list[dict], keys: Sequence[str] = ("task", "length", "mode")) -> list[dict]:
    """Group rows by `keys`: n, accuracy (mean score), median TTFT, mean density, max peak memory;
    sparse groups also get the speedup over the dense group with the same other keys, and `lost`: how
    many of their prompts scored below dense's answer to the same prompt (what sparse must never do)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, group in groups.items():
        densities = [r["density"] for r in group if r.get("density") is not None]
        peaks = [r["peak_mem_bytes"] for r in group if r.get("peak_mem_bytes") is not None]
        out.append({**dict(zip(keys, key, strict=True)), "n": len(group),
                    "accuracy": sum(r["score"] for r in group) / len(group),
                    "ttft_s": statistics.median(r["ttft_s"] for r in group),
                    "density": sum(densities) / len(densities) if densities else None,
                    "peak_gib": max(peaks) / 2**30 if peaks else None})
    if "mode" in keys:
        dense = {tuple(s[k] for k in keys if k != "mode"): s for s in out if s["mode"] == "dense"}
        for s in out:
            base = dense.get(tuple(s[k] for k in keys if k != "mode"))
            s["speedup"] = base["ttft_s"] / s["ttft_s"] if base and s["mode"] != "dense" else None
        dense_score = {_prompt(r): r["score"] for r in rows if r.get("mode") == "dense"}
        for s, group in zip(out, groups.values(), strict=True):
            paired = [(r["score"], dense_score[p]) for r in group if (p := _prompt(r)) in dense_score]
            s["lost"] = sum(got < want for got, want in paired) if s["mode"] != "dense" and paired else None
    return out


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A plain-text table; floats get 3 significant decimals, None prints as '-'."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def mean_layer_head_density(rows: list[dict]) -> list[list[float] | None]:
    """Average of the sparse rows' per-(layer, head) densities; None for layers never sparse."""
    matrices = [r["layer_head_density"] for r in rows if r.get("layer_head_density")]
    if not matrices:
        return []
    out = []
    for layer in range(len(matrices[0])):
        heads = [m[layer] for m in matrices if m[layer] is not None]
        out.append([sum(col) / len(col) for col in zip(*heads, strict=True)] if heads else None)
    return out


def write_density_json(rows: list[dict], path: str | Path, model_name: str) -> dict | None:
    """Per-layer and per-(layer, head) densities of a run, as `bench/bench_e2e.py --densities` reads."""
    matrix = mean_layer_head_density(rows)
    if not matrix:
        return None
    lengths = sorted({r["length"] for r in rows if r.get("layer_head_density")})
    data = {"model": model_name, "lengths": lengths,
            "layers": [None if heads is None else sum(heads) / len(heads) for heads in matrix],
            "layer_head": matrix}
    Path(path).write_text(json.dumps(data, indent=1))
    return data
