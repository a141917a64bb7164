"""The flags and defaults of the `sparse-prefill` commands, each stated once; argparse only, no torch.

Every default lives here, once: a command's `Defaults` (in DEFAULTS) or a flag's `default=`. Help texts
are written from those values and the runs read the same values, the way Triton's `perf_report` takes a
benchmark's values and labels from its one `Benchmark`. Defaults that depend on the model (prompt lengths,
seeds: the byte-level tokenizer of the tiny and --arch models spells prompts byte by byte, so they get
shorter prompts and one seed) are resolved by `Defaults.lengths_for` and `seeds_for` once the model is known.

Nothing here imports torch, transformers or matplotlib, so `sparse-prefill --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import SparsePrefillConfig
from .archs import TINY

OUT_ROOT = Path("sparse_prefill_out")  # runs write to OUT_ROOT/<command>/<YYYYmmdd-HHMMSS>/ unless --out


class CommandError(ValueError):
    """A request the command cannot carry out (options, output folder, lengths): `sparse-prefill` prints the
    message, without a traceback, and exits with status 2."""


def _comma_list(text: str, parse, what: str, example: str) -> list:
    """The comma-separated items of a flag's value, each read by `parse`. An item it cannot read is an
    ArgumentTypeError, which argparse reports as the user's mistake (exit 2) naming the item and the form to write."""
    values = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            values.append(parse(item))
        except (ValueError, OverflowError):  # OverflowError: 'infk'
            raise argparse.ArgumentTypeError(f"{item!r} is not {what}; write e.g. {example}") from None
    return values


def parse_floats(text: str) -> list[float]:
    """'0.1, 0.5' -> [0.1, 0.5]."""
    return _comma_list(text, float, "a number", "0.5,0.9")


def parse_ints(text: str) -> list[int]:
    """'0, 3' -> [0, 3]."""
    return _comma_list(text, int, "an integer", "0,3")


def parse_names(allowed: tuple[str, ...]):
    """A flag's `type` for a comma list of names from `allowed`: 'a, b' -> ['a', 'b']."""
    def name(item: str) -> str:
        if item not in allowed:
            raise ValueError(item)
        return item

    def parse(text: str) -> list[str]:
        return _comma_list(text, name, f"one of {', '.join(allowed)}", ",".join(allowed[:2]))

    return parse


def _length(item: str) -> int:
    """'4k' -> 4096, '8192' -> 8192: a prompt length in tokens (k = 1024), which must be positive."""
    item = item.lower()
    tokens = int(float(item[:-1]) * 1024) if item.endswith("k") else int(item)
    if tokens < 1:
        raise ValueError(item)
    return tokens


def parse_lengths(text: str) -> list[int]:
    """'4k,8192' -> [4096, 8192] (k = 1024)."""
    return _comma_list(text, _length, "a length in tokens", "4k,8192 (k = 1024)")


def show(values) -> str:
    """Values as a user types them: (4096, 8192) -> '4k,8k', (0.0, 0.5) -> '0,0.5'."""
    def one(v):
        return f"{v // 1024}k" if isinstance(v, int) and v >= 1024 and v % 1024 == 0 else f"{v:g}"

    return ",".join(one(v) for v in values) if isinstance(values, (tuple, list)) else one(values)


K = 1024
# The tiny and --arch models spell prompts byte by byte: a task whose needles or list take more than fits in
# 512 tokens starts its default lengths here (the smallest round length that fits every seed and haystack).
TINY_MIN_LENGTH = {"niah_multikey": 768, "niah_multivalue": 768, "niah_multiquery": 768, "cwe": 768}
# The config the tiny default model runs under (its prompts are short: the library's budgets would keep all).
TINY_PRESET = {"block_size": 64, "min_budget_tokens": 256, "exact_tail_tokens": 64, "question_blocks": 2}
NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey")
RECALL_POLICIES = ("ours", "oracle", "flexprefill", "xattention")


@dataclass(frozen=True)
class Defaults:
    """One command's defaults. lengths / seeds: on a trained model; tiny_lengths / tiny_seeds: on the tiny
    and --arch (random-weight, byte-level) models."""

    lengths: tuple[int, ...] = ()
    tiny_lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.5,)
    seeds: int = 3
    tiny_seeds: int = 1
    haystack: str = "noise"
    gammas: tuple[float, ...] = ()

    def lengths_for(self, random_weights: bool, task: str | None = None) -> list[int]:
        """The default lengths of this model kind; on the byte-level models a task too long for the
        shortest one starts at TINY_MIN_LENGTH."""
        if not random_weights:
            return list(self.lengths)
        floor = TINY_MIN_LENGTH.get(task, 0)
        return sorted({max(n, floor) for n in self.tiny_lengths})

    def seeds_for(self, random_weights: bool) -> int:
        return self.tiny_seeds if random_weights else self.seeds

    def lengths_help(self, tasks=()) -> str:
        longer: dict[int, list[str]] = {}
        for task, floor in TINY_MIN_LENGTH.items():
            if task in tasks and floor > min(self.tiny_lengths):
                longer.setdefault(floor, []).append(task)
        raised = "".join(f", from {floor} for {', '.join(names)}" for floor, names in longer.items())
        return (f"comma list of prompt lengths in tokens, e.g. 4k,8k,16k,32k (default: "
                f"{','.join(map(str, self.tiny_lengths))} on the tiny and --arch models{raised}; "
                f"else {show(self.lengths)})")


@dataclass(frozen=True)
class DemoDefaults:
    """`sparse-prefill demo`: the pinned trained `model`, prompts of `length` tokens, on CUDA; a --model on CPU at
    `cpu_length`; prompts shorter than `preset_below` run with TINY_PRESET (the library's budgets would keep
    nearly every block of a short prompt); the synthetic problem (eval/synthetic.py) of `synthetic_length`."""

    model: str = "qwen2.5-coder-0.5b-instruct"
    length: int = 32 * K
    cpu_length: int = 2 * K
    preset_below: int = 8 * K
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    synthetic_length: int = 4 * K


DEFAULTS: dict[str, Defaults | DemoDefaults] = {
    "niah": Defaults(lengths=(4 * K, 8 * K, 16 * K, 32 * K), tiny_lengths=(512, 1024, 2048),
                     depths=(0.0, 0.25, 0.5, 0.75, 1.0)),
    "ruler": Defaults(lengths=(4 * K, 8 * K, 16 * K, 32 * K), tiny_lengths=(512, 1024)),
    "ppl": Defaults(lengths=(4 * K, 8 * K, 16 * K, 32 * K), tiny_lengths=(1024, 2048), haystack="prose"),
    "speed": Defaults(lengths=(8 * K, 32 * K), tiny_lengths=(1024, 2048)),
    "sweep": Defaults(lengths=(16 * K, 32 * K), tiny_lengths=(1024, 2048), depths=(0.1, 0.5, 0.9),
                      gammas=(0.8, 0.9, 0.95, 0.99)),
    "recall": Defaults(lengths=(8 * K,), gammas=(0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)),
    "demo": DemoDefaults(),
}


# ---------------------------------------------------------------- flag groups

def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"a local HF folder, a .gguf file, or a pinned model name (default: the embedded "
                                   f"{TINY}, random weights)")
    g.add_argument("--arch", help="random-weight model of a shipped architecture (llama-3.1-8b, qwen2.5-7b, ...)")
    add_device_args(g)
    add_yarn_arg(g)


def add_device_args(g) -> None:
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="the weights' and activations' type (default: bfloat16 on CUDA, float32 on CPU)")


def add_yarn_arg(g) -> None:
    g.add_argument("--yarn", type=float, metavar="FACTOR",
                   help="load --model with YaRN rope scaling by FACTOR over its trained context (e.g. 4 takes "
                        "Qwen2.5's 32K to 128K, as its model card documents)")


# Every SparsePrefillConfig field as a flag: (metavar, meaning), from the field's own metadata (config.py), so
# that these flags and `sparse-prefill serve`'s read the same. Values stay strings until config_from_options.
CONFIG_FLAGS = {f.name: (f.metadata["metavar"], f.metadata["meaning"]) for f in dataclasses.fields(SparsePrefillConfig)}
SELECTION_FLAGS = ("block_size", "min_budget_tokens", "sink_blocks", "local_blocks", "exact_tail_tokens",
                   "question_blocks", "stride", "proxy_heads")
# Where the commands' default differs from the library's: evaluate the sparse path at every length.
COMMAND_CONFIG = {"min_seq_len": "0"}


def _config_help(field: str) -> str:
    text = CONFIG_FLAGS[field][1]
    library = getattr(SparsePrefillConfig(), field)
    if field in COMMAND_CONFIG:
        return (f"{text} (default {COMMAND_CONFIG[field]} here: evaluate the sparse path at every length; library "
                f"default {'auto' if library is None else library})")
    return f"{text} (library default {library})"


def add_config_args(p: argparse.ArgumentParser, fields_=tuple(CONFIG_FLAGS), title: str | None = None) -> None:
    preset = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in TINY_PRESET.items())
    g = p.add_argument_group(title or f"sparse prefill config (the tiny default model runs with {preset})")
    for field in fields_:
        g.add_argument("--" + field.replace("_", "-"), dest=field, metavar=CONFIG_FLAGS[field][0],
                       default=COMMAND_CONFIG.get(field), help=_config_help(field))


def config_from_args(args, base=None):
    """The SparsePrefillConfig of the config flags given on the command line (strings), on top of `base`."""
    from ..config import config_from_options

    given = {field: getattr(args, field) for field in CONFIG_FLAGS if getattr(args, field, None) is not None}
    try:
        return config_from_options(given, base)
    except ValueError as err:
        raise CommandError(str(err)) from None


def add_task_args(p: argparse.ArgumentParser, defaults: Defaults, tasks=()) -> None:
    g = p.add_argument_group("examples")
    g.add_argument("--lengths", type=parse_lengths, help=defaults.lengths_help(tasks))
    g.add_argument("--depths", type=parse_floats, default=list(defaults.depths),
                   help=f"needle depths in [0, 1] (default {show(defaults.depths)})")
    g.add_argument("--seeds", type=int, help=f"examples per (task, length, depth) (default {defaults.tiny_seeds} on "
                                             f"the tiny model, else {defaults.seeds})")
    add_haystack_arg(g, defaults)
    g.add_argument("--metric", choices=("contains", "exact"), default="contains",
                   help="an answer is right when it contains the expected value, or only when it is exactly it "
                        "(default: %(default)s)")
    g.add_argument("--no-chat-template", action="store_true", help="plain prompts even when the tokenizer has a "
                                                                    "chat template")


def add_haystack_arg(g, defaults: Defaults) -> None:
    g.add_argument("--haystack", choices=("noise", "prose"), default=defaults.haystack,
                   help="the text around the needles: RULER's repeated noise sentences, or Python's documentation "
                        "(default: %(default)s)")


def add_lengths_arg(p: argparse.ArgumentParser, defaults: Defaults) -> None:
    """--lengths alone (ppl, speed): a default per model kind."""
    p.add_argument("--lengths", type=parse_lengths,
                   help=f"comma list of prompt lengths in tokens, e.g. 4k,8k (default {show(defaults.tiny_lengths)} on "
                        f"random-weight models, else {show(defaults.lengths)})")


def add_output_args(p: argparse.ArgumentParser, command: str, progress: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help=f"output folder (default: a new folder per run, "
                                            f"{OUT_ROOT}/{command}/YYYYmmdd-HHMMSS/); one that already holds "
                                            "results is refused unless --overwrite")
    g.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    if progress:
        g.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. for logs)")


# ---------------------------------------------------------------- the config a command runs under

def runs_tiny(args) -> bool:
    """Whether the command runs the embedded tiny default model (no --model, no --arch)."""
    return not getattr(args, "arch", None) and getattr(args, "model", None) in (None, "", TINY)


def command_config(args):
    """The config a model-running command runs under: its config flags on top of TINY_PRESET when the tiny
    default model runs (its prompts are short), else on top of the library's defaults."""
    return config_from_args(args, SparsePrefillConfig(**TINY_PRESET) if runs_tiny(args) else None)
