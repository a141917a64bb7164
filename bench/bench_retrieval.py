"""Does sparse prefill keep every answer dense finds? Retrieval accuracy, paired against dense, with a
per-needle diagnosis of every answer sparse loses, plus TTFT and long-text perplexity, in one run.

For each (task, length, depth, seed) prompt from the package's generators, dense attention and each
selection config answer greedily (decode is dense in both). Accuracy comes with a 95 % Wilson
interval, and the paired difference sparse - dense over the same prompts with a 95 % interval. For
every prompt sparse loses, `eval.needles.NeedleProbe` says, per layer and head, how much exact
attention the question's rows put on the needle and whether its key blocks were kept for them.

    python3 bench/bench_retrieval.py --model MODELS/qwen05 --lengths 16k,24k,32k --seeds 6 \
        --configs previous,tail,q16,q16-lean --diagnose previous,tail --ttft 32k --ppl 32k

`--fast` decodes a sparse config only where it can differ from dense: each config first runs
teacher-forced on dense's answer (`runner.forced_argmax`, two forwards); where its greedy choice
agrees with dense's at every answer token, it would write dense's answer word for word, so it gets
dense's answer and score ("same"); elsewhere it is decoded and scored as usual. The table then also
says how many answers each config changed at all, which is a stricter test than accuracy.

Writes $OUT/retrieval.jsonl (one row per prompt and mode), $OUT/density_<config>_<length>.json (per-layer
mean density of each config, for bench_e2e.py --densities; density_<length>.json is the first config's)
and prints a short table last. Two controls sit among the configs: `exact` (every causal block through
the sparse kernel: the answers it changes are the comparison's numerical noise floor) and `oracle90` /
`oracle95` (each row's exact fewest blocks covering gamma: what the best possible selection keeps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_prefill import SparsePrefillConfig  # noqa: E402
from sparse_prefill.eval.models import load_model  # noqa: E402
from sparse_prefill.eval.needles import NeedleProbe, question_rows, relevant_needles  # noqa: E402
from sparse_prefill.eval.options import parse_lengths  # noqa: E402
from sparse_prefill.eval.recording import LayoutRecorder, intercept_layouts, num_layers  # noqa: E402
from sparse_prefill.eval.runner import forced_argmax, greedy_answer, greedy_tokens, set_mode  # noqa: E402
from sparse_prefill.eval.scoring import paired_difference, score, wilson_interval  # noqa: E402
from sparse_prefill.eval.tasks import make_example  # noqa: E402
from sparse_prefill.patches import unpatch_model  # noqa: E402

_PREVIOUS = dict(gamma=0.95, proxy_heads="kv", stride=4, min_budget_tokens=2048, exact_tail_tokens=0,
                 question_blocks=0)  # the defaults before the exact tail and the question columns
_Q16 = dict(gamma=0.9, proxy_heads="q", stride=16, min_budget_tokens=1024, exact_tail_tokens=256, question_blocks=0)
_ORACLE = dict(stride=1, min_budget_tokens=0, exact_tail_tokens=0, question_blocks=0, local_blocks=0)
CONFIGS = {  # name: SparsePrefillConfig fields (min_seq_len=0: the sparse path runs at every length)
    "previous": _PREVIOUS,
    "tail": {**_PREVIOUS, "exact_tail_tokens": 256},
    "tailcols": {**_PREVIOUS, "exact_tail_tokens": 256, "question_blocks": 8},
    "q16": _Q16,
    "q16-lean": {**_Q16, "gamma": 0.85},
    "q16cols": {**_Q16, "question_blocks": 8},  # = the package defaults from 2026-12-02 14:45 to 17:30 UTC
    "q16cols16": {**_Q16, "question_blocks": 16},
    "default": {},  # the package defaults as they are now (gamma 0.95 since 2026-12-02 17:30 UTC)
    "g90": {"gamma": 0.9},  # = q16cols
    "g93": {"gamma": 0.93},
    "g95": {"gamma": 0.95},
    "g97": {"gamma": 0.97},
    "wide": {"exact_tail_tokens": 1024, "question_blocks": 16},
    "g95wide": {"gamma": 0.95, "exact_tail_tokens": 1024, "question_blocks": 16},
    # Controls. exact: every causal block through the sparse kernel, i.e. dense attention computed
    # block-sparsely in bf16; what it changes is the comparison's numerical noise floor, not selection.
    "exact": {"gamma": 1.0},
    # The per-row oracle: stride 1 makes the "estimate" each row's exact block mass, and nothing is kept
    # beyond the fewest blocks covering gamma (sink and diagonal count toward it). Slow: a benchmark only.
    "oracle90": {**_ORACLE, "gamma": 0.9},
    "oracle95": {**_ORACLE, "gamma": 0.95},
    # FP8 attention of the kept blocks (attention_dtype="fp8"), and its own exact control: every causal block in FP8
    "fp8": {"attention_dtype": "fp8"},
    "exact-fp8": {"gamma": 1.0, "attention_dtype": "fp8"},
}


def config_named(name: str) -> SparsePrefillConfig:
    return SparsePrefillConfig(min_seq_len=0, **CONFIGS[name])


def answer(model, tok, example, mode: str, config, hooks) -> dict:
    set_mode(model, mode, config)
    recorder = LayoutRecorder(num_layers(model))
    probe = NeedleProbe(relevant_needles(example), question_rows(example)) if hooks else None

    def hook(layer, q, k, layout):
        recorder(layer, q, k, layout)
        return probe(layer, q, k, layout) if probe else layout

    with intercept_layouts(model, hook):
        text, ttft, _ = greedy_answer(model, tok, example.input_ids, example.max_new_tokens)
    row = {"answer": text, "score": score(text, example.answers), "ttft_s": ttft}
    if mode == "sparse":
        row["density"] = recorder.mean_density()
        row["layer_density"] = _layer_means(recorder)
    if probe is not None:
        row["needles"] = probe.summary()
    return row


def _layer_means(recorder: LayoutRecorder) -> list[float | None]:
    return [None if heads is None else sum(heads) / len(heads) for heads in recorder.layer_head_density()]


def dense_answer(model, tok, example) -> dict:
    """Dense's greedy answer, its tokens, and what teacher forcing gives on dense itself (the reference
    that a sparse config's forced choices are compared with)."""
    set_mode(model, "dense", None)
    tokens, ttft, _ = greedy_tokens(model, tok, example.input_ids, example.max_new_tokens)
    text = tok.decode(tokens, skip_special_tokens=True)
    forced = forced_argmax(model, example.input_ids, tokens)
    return {"answer": text, "score": score(text, example.answers), "ttft_s": ttft, "tokens": tokens,
            "forced": forced}


def answer_fast(model, tok, example, config, dense: dict) -> dict:
    """A config's answer, decoded only where teacher forcing says it may differ from dense's (see --fast)."""
    set_mode(model, "sparse", config)
    recorder = LayoutRecorder(num_layers(model))

    def prefill_only(layer, q, k, layout):  # the forced answer chunk is no prefill: leave it out
        return recorder(layer, q, k, layout) if q.shape[2] == k.shape[2] else layout

    with intercept_layouts(model, prefill_only):
        forced = forced_argmax(model, example.input_ids, dense["tokens"])
    row = {"density": recorder.mean_density(), "layer_density": _layer_means(recorder)}
    if forced == dense["forced"] == dense["tokens"]:
        return {**row, "answer": dense["answer"], "score": dense["score"], "same": True}
    text, ttft, _ = greedy_answer(model, tok, example.input_ids, example.max_new_tokens)
    return {**row, "answer": text, "score": score(text, example.answers), "ttft_s": ttft, "same": False}


@torch.inference_mode()
def prefill_ms(model, ids, repeats: int = 5) -> float:
    for _ in range(2):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ttft_rows(model, tok, length: int, configs: list[str]) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ex = make_example("niah_multikey", tok, length, 0.5, 0, "prose")
    ids = torch.tensor([list(ex.input_ids)], device="cuda")
    unpatch_model(model)
    rows = [{"variant": "dense sdpa (model default)", "ms": prefill_ms(model, ids)}]
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            rows.append({"variant": f"dense {name}", "ms": prefill_ms(model, ids)})
    for name in configs:
        set_mode(model, "sparse", config_named(name))
        rows.append({"variant": f"sparse {name}", "ms": prefill_ms(model, ids)})
    unpatch_model(model)
    best = min(r["ms"] for r in rows if r["variant"].startswith("dense"))
    for r in rows:
        r.update(length=length, speedup=best / r["ms"])
    return rows


def ppl_rows(model, tok, length: int, configs: list[str], tail: int = 2048) -> list[dict]:
    from sparse_prefill.eval.haystack import prose_sentences
    from sparse_prefill.eval.perplexity import token_losses

    text = " ".join(prose_sentences())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    ids = torch.tensor([ids[:length]], device=next(model.parameters()).device)
    rows = []
    for name in ["dense", *configs]:
        set_mode(model, "dense" if name == "dense" else "sparse", config_named(name) if name != "dense" else None)
        loss = float(token_losses(model, ids)[-tail:].mean())
        rows.append({"variant": name, "length": length, "ppl_last": math.exp(loss)})
    unpatch_model(model)
    for r in rows:
        r["vs_dense_pct"] = 100 * (r["ppl_last"] / rows[0]["ppl_last"] - 1)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--yarn", type=float, help="YaRN rope scaling factor (e.g. 4 for 128K on Qwen2.5)")
    parser.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,niah_multiquery")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("16k,24k,32k"))
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--haystack", default="prose", choices=("prose", "noise"))
    parser.add_argument("--configs", default="previous,q16")
    parser.add_argument("--diagnose", default="", help="configs whose every prompt gets the needle probe")
    parser.add_argument("--ttft", type=parse_lengths, default=[])
    parser.add_argument("--ppl", type=parse_lengths, default=[])
    parser.add_argument("--speed-configs", default="", help="configs for --ttft and --ppl (default: --configs)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--fast", action="store_true", help="decode a config only where teacher forcing says its "
                                                            "answer may differ from dense's")
    parser.add_argument("--dense-from", help="a retrieval.jsonl whose dense rows stand in for running dense again "
                                             "(greedy decoding of the same prompts is deterministic)")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "."))
    configs = [c for c in args.configs.split(",") if c]
    diagnose = {c for c in args.diagnose.split(",") if c}
    model, tok = load_model(args.model, yarn=args.yarn)
    model.eval()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"model {args.model} {next(model.parameters()).dtype} on {card}", flush=True)

    rows = []
    sink = open(out / "retrieval.jsonl", "a")
    depths = [float(d) for d in args.depths.split(",")]
    known_dense = {}
    if args.dense_from:
        for line in open(args.dense_from):
            r = json.loads(line)
            if r.get("mode") == "dense":
                known_dense[(r["task"], r["length"], r["depth"], r["seed"])] = r
    started = time.time()
    for length in ([] if args.skip_eval else args.lengths):
        for task in args.tasks.split(","):
            for depth in depths:
                for seed in range(args.seeds):
                    ex = make_example(task, tok, length, depth, seed, args.haystack)
                    base = {"task": task, "length": length, "depth": depth, "seed": seed}
                    key = (task, length, depth, seed)
                    if key in known_dense:
                        dense = {k: known_dense[key][k] for k in ("answer", "score", "ttft_s", "tokens", "forced")
                                 if k in known_dense[key]}
                    elif args.fast:
                        dense = dense_answer(model, tok, ex)
                    else:
                        dense = answer(model, tok, ex, "dense", None, hooks=False)
                    rows.append({**base, "mode": "dense", **dense})
                    for name in configs:
                        if args.fast and name not in diagnose and "tokens" in dense:
                            got = answer_fast(model, tok, ex, config_named(name), dense)
                        else:
                            got = answer(model, tok, ex, "sparse", config_named(name), hooks=name in diagnose)
                        rows.append({**base, "mode": name, **got, "dense_score": dense["score"]})
                    for r in rows[-(1 + len(configs)):]:
                        sink.write(json.dumps(r) + "\n")
                    sink.flush()
            print(f"  {length} {task} done at {time.time() - started:.0f} s", flush=True)
    unpatch_model(model)
    for name in configs:  # per-layer densities, for bench_e2e.py --densities (the first config's also unnamed)
        for length in args.lengths:
            per_prompt = [r["layer_density"] for r in rows if r["mode"] == name and r["length"] == length
                          and r.get("layer_density")]
            if per_prompt:
                layers = [[p[i] for p in per_prompt if p[i] is not None] for i in range(len(per_prompt[0]))]
                means = [sum(v) / len(v) if v else None for v in layers]
                text = json.dumps({"config": name, "layers": means})
                (out / f"density_{name}_{length}.json").write_text(text)
                if name == configs[0]:
                    (out / f"density_{length}.json").write_text(text)

    extra = []
    speed_configs = [c for c in args.speed_configs.split(",") if c] or configs
    for length in args.ttft:
        extra += ttft_rows(model, tok, length, speed_configs)
    for length in args.ppl:
        extra += ppl_rows(model, tok, length, speed_configs)
    for r in extra:
        sink.write(json.dumps(r) + "\n")
    sink.close()

    # -- diagnosis of every lost answer -------------------------------------------------------------
    lost = [r for r in rows if r["mode"] in diagnose and r["score"] < r["dense_score"]]
    kept = [r for r in rows if r["mode"] in diagnose and r["score"] >= r["dense_score"] and "needles" in r]
    if lost or kept:
        print("\nneedle diagnosis (question rows' exact mass on the needle, in (layer, head) pairs):")
        for name in sorted(diagnose):
            for label, group in (("lost", lost), ("kept", kept)):
                g = [r["needles"] for r in group if r["mode"] == name]
                if g:
                    drop = statistics.mean(x["needle_mass_dropped"] for x in g)
                    keep = statistics.mean(x["needle_mass_kept"] for x in g)
                    heads = statistics.mean(x["heads_dropping"] / x["heads"] for x in g)
                    print(f"  {name:12s} {label}: n={len(g):3d} mass dropped {drop:.3f} kept {keep:.3f} "
                          f"share of heads dropping the needle {heads:.3f}")
                    linked = [x for x in g if "link_mass_dropped" in x]
                    if linked:
                        print(f"  {'':12s} {label}: later mentions over earlier ones: mass dropped "
                              f"{statistics.mean(x['link_mass_dropped'] for x in linked):.3f} kept "
                              f"{statistics.mean(x['link_mass_kept'] for x in linked):.3f}")
        for r in lost[:12]:
            print(f"  lost {r['mode']} {r['task']} {r['length']} d{r['depth']} s{r['seed']}: "
                  f"{r['needles']['worst_dropped'][:3]}")

    # -- tables -----------------------------------------------------------------------------------------
    for r in extra:
        print(json.dumps(r))
    print("\n| task | length | mode | n | accuracy [95 % CI] | sparse - dense [95 % CI] | lost / gained | "
          "answers changed | density |")
    print("|---|---|---|---|---|---|---|---|---|")
    modes = ["dense", *configs]
    for task in args.tasks.split(","):
        for length in [*args.lengths, "all"]:
            cell = [r for r in rows if r["task"] == task and (length == "all" or r["length"] == length)]
            for mode in modes:
                m = [r for r in cell if r["mode"] == mode]
                if not m:
                    continue
                acc = sum(r["score"] for r in m) / len(m)
                lo, hi = wilson_interval(sum(r["score"] for r in m), len(m))
                diff = "" if mode == "dense" else "{:+.3f} [{:+.3f}, {:+.3f}]".format(
                    *paired_difference([r["score"] - r["dense_score"] for r in m]))
                dens = "" if mode == "dense" else f"{statistics.mean(r['density'] for r in m):.3f}"
                flips = "" if mode == "dense" else "{} / {}".format(
                    sum(r["score"] < r["dense_score"] for r in m), sum(r["score"] > r["dense_score"] for r in m))
                changed = [r for r in m if "same" in r]
                changed = f"{sum(not r['same'] for r in changed)} of {len(changed)}" if changed else ""
                print(f"| {task} | {length} | {mode} | {len(m)} | {acc:.3f} [{lo:.2f}, {hi:.2f}] | {diff} | {flips} | "
                      f"{changed} | {dens} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
