"""lm-evaluation-harness integration: the `sparse_hf` model and our generated tasks.

`sparse_hf` is lm-eval's HF model (`HFLM`) with `patch_model` applied to what it loads, so any
lm-eval task runs with sparse prefill; sparse-config fields are model args, parsed by
`config_from_options` like the CLI's flags (`--model_args pretrained=DIR,gamma=0.9,proxy_heads=q`;
`min_seq_len=none` for the automatic threshold; a misspelt field is an error, not an HF argument).
`max_length` is always set explicitly (by default the model's context length): lm-eval otherwise
cuts long prompts from the left, which drops needles. `pretrained` also takes a .gguf file, a
pinned model name or `sparse-prefill-tiny`.

The tasks `sparse_niah`, `sparse_niah_multikey`, `sparse_niah_multivalue`, `sparse_niah_multiquery`,
`sparse_passkey`, `sparse_vt`, `sparse_cwe`, `sparse_fwe` (group `sparse_ruler`) are task YAMLs in
`eval/configs` whose `custom_dataset` calls the generators of `tasks.py`. They read `--metadata`
(`max_seq_lengths`, `num_samples`, `depths`, `haystack`) and build prompts with the tokenizer of
`pretrained` (or `tokenizer`). lm-eval re-tokenizes the prompt text, so lengths may differ from the
target by a few tokens at piece boundaries.

lm-eval finds third-party models only once they are imported, so run it through
`sparse-prefill lm-eval ...`, which registers `sparse_hf` and adds our task folder to
`--include_path`; from Python, import this module and pass `TaskManager(include_path=tasks_dir())`.
"""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import SparsePrefillConfig
from ..patches import patch_model
from .archs import TINY, byte_tokenizer, resolve_model
from .models import PINS, load_tokenizer
from .scoring import score_contains
from .tasks import make_example

logger = logging.getLogger(__name__)


def _config_args(kwargs: dict) -> dict:
    """Pop the sparse-config fields out of sparse_hf's model args; a name that is neither an HFLM argument nor a
    config field but looks like one (a typo: `gama`, `proxy_head`) is kept, so config_from_options names it."""
    import difflib
    import inspect

    fields = list(SparsePrefillConfig.__dataclass_fields__)
    hflm = inspect.signature(HFLM.__init__).parameters
    config = {}
    for name in list(kwargs):
        field = name.replace("-", "_")
        if field in fields or (name not in hflm and difflib.get_close_matches(field, fields, n=1, cutoff=0.8)):
            config[name] = kwargs.pop(name)
    return config


def tasks_dir() -> Path:
    """The folder of our lm-eval task YAMLs (pass it as --include_path)."""
    return Path(str(resources.files("sparse_prefill.eval") / "configs"))


def _ours(pretrained) -> bool:
    """Whether `pretrained` is something HFLM cannot load by itself but we can."""
    return isinstance(pretrained, str) and (pretrained == TINY or pretrained in PINS or pretrained.endswith(".gguf"))


@register_model("sparse_hf")
class SparseHFLM(HFLM):
    """HFLM whose model runs block-sparse prefill (`sparse=False` keeps it dense, for a baseline)."""

    def __init__(self, pretrained=TINY, sparse: bool = True, max_length: int | None = None, **kwargs):
        from ..config import config_from_options

        self.sparse_config = config_from_options(_config_args(kwargs))
        if _ours(pretrained):
            device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = kwargs.pop("dtype", None)
            dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
            model, tokenizer, _ = resolve_model(pretrained, dtype=dtype, device=device)
            kwargs.setdefault("tokenizer", tokenizer)
            pretrained = model
        super().__init__(pretrained=pretrained, max_length=max_length, **kwargs)
        if max_length is None:  # explicit, never lm-eval's fallback of 2048 with left truncation
            self._max_length = int(getattr(self.model.config, "max_position_embeddings", None) or 2048)
            logger.info("sparse_hf: max_length=%d (the model's context length)", self._max_length)
        if sparse and str(sparse).lower() != "false":
            patch_model(self.model, self.sparse_config)


# ---------------------------------------------------------------- tasks

def _task_tokenizer(kwargs: dict):
    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError("sparse_* tasks size prompts with the model's tokenizer: pass --model_args pretrained=... "
                         "(or tokenizer=...).")
    return byte_tokenizer() if name == TINY else load_tokenizer(name)


def _as_list(value, cast) -> list:
    if isinstance(value, str):
        value = value.split(",")
    return [cast(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def task_dataset(task: str, **kwargs) -> dict:
    """lm-eval custom_dataset for one of our tasks: {"test": Dataset} over lengths x depths x samples."""
    import datasets

    tokenizer = _task_tokenizer(kwargs)
    lengths = _as_list(kwargs.get("max_seq_lengths", [4096]), int)
    depths = _as_list(kwargs.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0]), float)
    samples = int(kwargs.get("num_samples", 10))
    haystack = kwargs.get("haystack", "noise")
    docs = []
    for length in lengths:
        for i in range(samples):
            depth = depths[i % len(depths)]
            ex = make_example(task, tokenizer, length, depth=depth, seed=i, haystack=haystack, chat_template=False,
                              special_prefix=False)
            docs.append({"input": tokenizer.decode(ex.input_ids), "outputs": list(ex.answers), "max_length": length,
                         "depth": -1.0 if ex.depth is None else ex.depth, "seed": i})
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"score": score_contains(results[0], doc["outputs"])}


def niah_single(**kwargs):
    return task_dataset("niah_single", **kwargs)


def niah_multikey(**kwargs):
    return task_dataset("niah_multikey", **kwargs)


def niah_multivalue(**kwargs):
    return task_dataset("niah_multivalue", **kwargs)


def niah_multiquery(**kwargs):
    return task_dataset("niah_multiquery", **kwargs)


def passkey(**kwargs):
    return task_dataset("passkey", **kwargs)


def vt(**kwargs):
    return task_dataset("vt", **kwargs)


def cwe(**kwargs):
    return task_dataset("cwe", **kwargs)


def fwe(**kwargs):
    return task_dataset("fwe", **kwargs)


def _with_our_tasks(argv: list[str]) -> list[str]:
    """argv with our task folder on lm_eval's --include_path (joined with ':' to one the user gave)."""
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    ours = str(tasks_dir())
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            return [*argv[:i + 1], f"{argv[i + 1]}:{ours}", *argv[i + 2:]]
        if arg.startswith("--include_path="):
            return [*argv[:i], f"{arg}:{ours}", *argv[i + 1:]]
    return [*argv, "--include_path", ours]


def help_text() -> str:
    """What `sparse-prefill lm-eval --help` prints before lm-eval's own help: our model, its arguments, our tasks."""
    import dataclasses
    import textwrap

    def block(text: str) -> str:  # an indented paragraph, wrapped
        return textwrap.fill(" ".join(text.split()), width=100, initial_indent="    ", subsequent_indent="    ")

    fields = ", ".join(f.name for f in dataclasses.fields(SparsePrefillConfig))
    tasks = ", ".join(sorted(p.stem for p in tasks_dir().glob("sparse_*.yaml")))
    return "\n".join([
        "sparse-prefill lm-eval: lm-evaluation-harness with our model and tasks registered; every argument goes to "
        "lm-eval.",
        "", "--model sparse_hf",
        block("lm-eval's Hugging Face model (HFLM) with sparse prefill patched into the model it loads."),
        "", "--model_args for sparse_hf (comma-separated key=value pairs)",
        block(f"HFLM's own (pretrained, dtype, device, ...); pretrained also takes a .gguf file, a pinned model name "
              f"({', '.join(sorted(PINS))}) or {TINY} (the embedded random-weight model)."),
        block("sparse=False: the same model dense, for a baseline. max_length=N: the longest prompt (default: the "
              "model's context length; lm-eval would cut longer prompts from the left)."),
        block(f"Every SparsePrefillConfig field: {fields} (min_seq_len=none: the automatic threshold; "
              "`sparse-prefill niah --help` says what each one means). A misspelt field is an error."),
        "", "--tasks (ours; sparse_ruler runs them all)",
        block(f"{tasks}. --metadata sets their max_seq_lengths, num_samples, depths and haystack (noise or prose)."),
        "", "Example:",
        "    sparse-prefill lm-eval run --model sparse_hf --model_args pretrained=DIR,gamma=0.9 \\",
        "        --tasks sparse_niah --metadata '{\"max_seq_lengths\":[16384],\"num_samples\":20}'",
        "", "lm-eval's own help follows.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line with `sparse_hf` registered and our tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:  # lm-eval prints its help: ours, which it cannot know, first
        print(help_text())
    argv = _with_our_tasks(argv)
    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
