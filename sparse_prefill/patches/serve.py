"""`sparse-prefill serve`: `transformers serve` with every model it loads patched for sparse prefill.

    sparse-prefill serve MODEL [--gamma 0.9 ... any SparsePrefillConfig field] [any `transformers serve` option]

transformers serve (>= 5.25) loads each model in a process of its own, with a copy of the server's
`ModelLoader`. `SparseServe` is transformers' own `Serve` command whose loader is wrapped
(`PatchingLoader`): in the model's process it loads the model as transformers does, then `patch_model`s it
with the config given on the command line (the config travels with the pickled loader). Everything else —
the HTTP API, continuous batching, the paged cache, request errors — is transformers serve unchanged; the
patched model enters continuous batching like any sdpa or flash model (see `transformers_attention.py`).

With continuous batching, prefill batches must run outside CUDA graphs (the selection reads each request's
length on the host). transformers captures graphs by default only for flash attention (which continuous
batching switches to whenever it is installed): there, where the user set nothing, the prefill path's graphs go
off and the decode path keeps its own, `use_cuda_graph=(False, True)`; with sdpa nothing changes. The same holds
for `generate_batch` with flash attention: pass `ContinuousBatchingConfig(use_cuda_graph=(False, True))`.

Continuous batching takes eager attention only as "paged|eager", not a patched eager model's own name: with
batching on, the loader moves such a model there (`serve_eager_in_batches`), where it stays sparse.

A request that would leave continuous batching nothing to prefill (an empty prompt: no token after tokenizing and
the chat template) stopped its worker for good, and with it the server (as plain transformers serve 5.25 does):
`SparseServe.run` answers it, and a request that lacks its prompt field, with a 400 instead (`refuse_empty_prompts`).

Before serving, the model process runs `warm_up` for prompts up to `--warm-up` tokens (default: the server's
`--max-model-len`, else the model's context), so that no request waits for a Triton compile. While serving it logs
one line per prompt of at least `min_seq_len` tokens (`stats.log_prefills`): its tokens, the layers that went
sparse, the blocks they kept and its prefill time.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..config import SparsePrefillConfig, config_from_options

MIN_TRANSFORMERS = (5, 25)  # a model's process loads through a picklable `ModelLoader`


class PatchingLoader:
    """A transformers serve `ModelLoader` that patches what it loads; every other attribute is the wrapped one's."""

    def __init__(self, loader, config: SparsePrefillConfig, warm_up_len: int | None = None,
                 continuous_batching: bool = False):
        self._loader = loader
        self._config = config
        self._warm_up_len = warm_up_len  # None: the model's context; 0: no warm-up
        self._continuous_batching = continuous_batching

    def __getattr__(self, name: str):
        if name.startswith("__") or "_loader" not in self.__dict__:  # pickling and copying look for dunders
            raise AttributeError(name)
        return getattr(self._loader, name)

    def load_model_and_processor(self, *args, **kwargs):
        from ..stats import log_prefills
        from . import patch_model, warm_up
        from .transformers_attention import serve_eager_in_batches

        model, processor = self._loader.load_model_and_processor(*args, **kwargs)
        patch_model(model, self._config)
        log_prefills(model, min_tokens=self._config.effective_min_seq_len)  # a line per long prompt, in the log
        if self._continuous_batching and serve_eager_in_batches(model):
            print("sparse_prefill: eager attention runs as continuous batching's \"paged|eager\" (the only eager name "
                  "it takes)", file=sys.stderr, flush=True)
        print(f"sparse_prefill: {type(model).__name__} patched for sparse prefill ({model.config._attn_implementation}"
              f" attention): {self._config}", file=sys.stderr, flush=True)
        if self._warm_up_len != 0:  # compile the kernels now, not in the first long request's time to first token
            started = time.perf_counter()
            try:
                calls = warm_up(model, max_len=self._warm_up_len)
            except Exception as err:  # out of memory at a long context, a kernel this GPU cannot compile: serve
                calls = 0
                print(f"sparse_prefill: the kernel warm-up failed ({type(err).__name__}: {err}); the first long "
                      "requests compile the kernels instead (--warm-up sets a shorter length, 0 none)",
                      file=sys.stderr, flush=True)
            if calls:
                print(f"sparse_prefill: kernels ready for prompts up to {self._warm_up_len or 'the context'} tokens "
                      f"({calls} warm-up calls, {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
        return model, processor


try:
    from transformers.cli.serve import Serve as _Serve
except Exception:  # pragma: no cover - no serve command, or one whose dependencies are missing (5.0 without pydantic
    _Serve = object  # raises NameError, not ImportError): `check_version` says what to install


def installed_transformers() -> str:
    from importlib.metadata import version

    return version("transformers")


def check_version() -> None:
    """Raise a RuntimeError naming the fix when the installed transformers cannot serve a patched model."""
    installed = installed_transformers()
    if tuple(int(part) for part in installed.split(".")[:2]) < MIN_TRANSFORMERS or _Serve is object:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise RuntimeError(f"sparse-prefill serve needs transformers >= {need} (installed: {installed}); install "
                           f"it with: pip install 'transformers[serving]>={need}'.")


class SparseServe(_Serve):
    """transformers' `Serve` command whose model loader patches every model it loads with `sparse_config`, and whose
    API server refuses empty prompts (`refuse_empty_prompts`)."""

    sparse_config = SparsePrefillConfig()  # set by `main` before the command runs; travels with the loader
    warm_up_len: int | None = None

    @property
    def loader(self):
        return self.__dict__["loader"]

    @loader.setter
    def loader(self, loader) -> None:  # `Serve.__init__` sets the generation state, then the loader
        state = getattr(self, "generation_state", None)
        batching = bool(getattr(state, "_continuous_batching", False))
        self.__dict__["loader"] = PatchingLoader(loader, self.sparse_config, self.warm_up_len, batching)
        if batching and hasattr(state, "cb_config"):
            state.cb_config = _with_prefill_graphs_off(state.cb_config, _flash_attention_likely(loader))

    def run(self, *args, **kwargs):  # each API server's process runs it (`--api-server-count` starts several)
        refuse_empty_prompts()
        return super().run(*args, **kwargs)


# The request field each endpoint's handler reads its prompt from (by the handler class's name, in transformers serve)
PROMPT_FIELDS = {"CompletionHandler": "prompt", "ChatCompletionHandler": "messages", "ResponseHandler": "input"}


class EmptyPromptError(ValueError):
    """A request with no prompt to prefill: transformers serve answers a ValueError with a 400."""


def check_prompt_field(handler_name: str, body: dict) -> None:
    """Raise an `EmptyPromptError` naming the field when the request lacks the prompt its endpoint reads (a chat
    without `messages`, a response without `input`, answered 500 for a KeyError otherwise; a completion without
    `prompt`, read as an empty one otherwise)."""
    field = PROMPT_FIELDS.get(handler_name)
    if field is not None and body.get(field) is None:
        raise EmptyPromptError(f"The request has no `{field}`: nothing to answer.")


def check_prompt_tokens(inputs: dict) -> None:
    """Raise an `EmptyPromptError` for a prompt of no tokens (after tokenizing and the chat template), which no
    attention can prefill. The model's forward fails on it; with continuous batching that failure stops the batching
    worker for good (transformers' generation loop takes any error in a step as fatal): every later request would fail
    with 503 "worker is dead" and the server stop. Without continuous batching it was a 500."""
    input_ids = inputs["input_ids"]
    length = input_ids.shape[-1] if hasattr(input_ids, "shape") else len(input_ids)  # a tensor, else a list
    if length == 0:
        raise EmptyPromptError("The prompt is empty: it has no tokens after tokenizing (and the chat template); "
                               "send at least one token of text.")


def refuse_empty_prompts() -> bool:
    """Make transformers serve's request handlers answer 400 to a request without a prompt or with an empty prompt,
    before it reaches the model's process (see `check_prompt_field`, `check_prompt_tokens`): a server never dies of
    one bad request. Its hooks are `BaseHandler._validate_request(body)`, which each endpoint calls first, and
    `BaseHandler._check_prompt_length(engine, inputs)`, which each text endpoint calls on the tokenized prompt before
    sending it. Idempotent; False (nothing done, said on stderr) for a transformers without these hooks."""
    try:
        from transformers.cli.serving.utils import BaseHandler
    except ImportError:  # pragma: no cover - transformers serve moved: its own checks only
        BaseHandler = None
    hooks = ("_validate_request", "_check_prompt_length")
    if BaseHandler is None or not all(callable(getattr(BaseHandler, hook, None)) for hook in hooks):
        print("sparse_prefill: this transformers serve has no hook to refuse empty prompts: an empty prompt may stop "
              "continuous batching", file=sys.stderr, flush=True)
        return False
    if getattr(BaseHandler, "_sparse_prefill_refuses_empty_prompts", False):
        return True
    validate_request, check_prompt_length = BaseHandler._validate_request, BaseHandler._check_prompt_length

    def _validate_request(self, body, *args, **kwargs):
        validate_request(self, body, *args, **kwargs)
        check_prompt_field(type(self).__name__, body)

    def _check_prompt_length(self, engine, inputs, *args, **kwargs):
        check_prompt_tokens(inputs)
        return check_prompt_length(self, engine, inputs, *args, **kwargs)

    BaseHandler._validate_request, BaseHandler._check_prompt_length = _validate_request, _check_prompt_length
    BaseHandler._sparse_prefill_refuses_empty_prompts = True
    return True


def _flash_attention_likely(loader) -> bool:
    """Whether continuous batching will run flash attention (asked for, or installed: it then switches to it)."""
    import torch
    from transformers.utils.import_utils import is_flash_attn_2_available, is_flash_attn_3_available

    if "flash" in str(getattr(loader, "attn_implementation", None) or ""):
        return True
    return torch.cuda.is_available() and (is_flash_attn_2_available() or is_flash_attn_3_available())


def _with_prefill_graphs_off(cb_config, flash: bool):
    """The continuous-batching config with flash attention's prefill path out of CUDA graphs, unless the user chose
    (sdpa captures no graph by default: unchanged)."""
    from transformers import ContinuousBatchingConfig

    if not flash or (cb_config is not None and cb_config.use_cuda_graph is not None):
        return cb_config
    cb_config = cb_config if cb_config is not None else ContinuousBatchingConfig()
    cb_config.use_cuda_graph = (False, True)
    return cb_config


def _add_warm_up_flag(parser) -> None:
    parser.add_argument("--warm-up", dest="warm_up", type=int, default=None, metavar="TOKENS",
                        help="compile the kernels for prompts up to TOKENS before serving (default: --max-model-len, "
                             "else the model's context; 0: off)")


def _add_config_flags(parser) -> None:
    """Every SparsePrefillConfig field as a flag, its help the field's meaning and default (config.py's metadata)."""
    import dataclasses

    for field in dataclasses.fields(SparsePrefillConfig):
        default = "auto" if field.default is None else field.default  # None is written auto on a command line
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None,
                            metavar=field.metadata["metavar"], help=f"{field.metadata['meaning']} (default {default})")


def parse_warm_up(argv: list[str]) -> tuple[int | None, list[str]]:
    """(`--warm-up TOKENS`, the other arguments). Default: transformers serve's `--max-model-len` where given,
    else the model's context (None); 0 turns the warm-up off."""
    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    _add_warm_up_flag(ours)
    known, rest = ours.parse_known_args(argv)
    if known.warm_up is not None:
        if known.warm_up < 0:
            raise ValueError(f"--warm-up takes a number of tokens >= 0 (0: no warm-up); got {known.warm_up}.")
        return known.warm_up, rest
    theirs = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # read, left in place for transformers
    theirs.add_argument("--max-model-len", dest="max_model_len", type=int, default=None)
    return theirs.parse_known_args(rest)[0].max_model_len, rest


def parse_config_flags(argv: list[str]) -> tuple[SparsePrefillConfig, list[str]]:
    """(config, the other arguments): every SparsePrefillConfig field as a flag (`--gamma 0.9`,
    `--min-seq-len auto`), the rest left for transformers serve."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    _add_config_flags(parser)
    known, rest = parser.parse_known_args(argv)
    options = {name: value for name, value in vars(known).items() if value is not None}
    return config_from_options(options), rest


def help_text() -> str:
    """What `sparse-prefill serve --help` prints above transformers serve's own help."""
    parser = argparse.ArgumentParser(
        prog="sparse-prefill serve", add_help=False,
        usage="%(prog)s [MODEL] [SparsePrefillConfig flags] [--warm-up TOKENS] [transformers serve options]",
        description="transformers serve with every model it loads patched for sparse prefill. MODEL: a local model "
                    "folder or a Hub repo id (owner/name); without it, each request names its model.")
    _add_config_flags(parser.add_argument_group("SparsePrefillConfig flags"))
    _add_warm_up_flag(parser.add_argument_group("kernel warm-up"))
    return parser.format_help() + "\ntransformers serve's own options follow.\n"


def check_model(model: str | None) -> None:
    """Raise ValueError, naming the fix, for a MODEL that is neither an existing local path nor shaped like a Hub
    repo id (`owner/name`, as huggingface_hub checks it): transformers serve would fail on it only in the model's
    process, far down a long traceback. Its `@revision` and `:file.gguf` are read as transformers serve reads them."""
    import os

    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers.cli.serving.utils import parse_model_id

    if model is None:  # no MODEL: each request names its own
        return
    repo = parse_model_id(model)[0]
    if os.path.exists(repo):
        return
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ValueError(f"MODEL {model} does not exist here and is no Hub repo id (owner/name); pass a local model "
                         "folder that exists, or a repo id such as Qwen/Qwen2.5-0.5B-Instruct.") from None


def _model_of(command, argv: list[str]) -> str | None:
    """MODEL as transformers serve's own parser (the click `command`) reads it from `argv`."""
    context = command.make_context("sparse-prefill serve", list(argv), resilient_parsing=True)
    return context.params.get("force_model")


def _refuse(err: Exception) -> int:
    """A user's mistake: its one line, exit status 2."""
    print(f"sparse-prefill serve: error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """`sparse-prefill serve ...`: parse our flags, then run transformers serve's command on the rest."""
    argv = sys.argv[1:] if argv is None else list(argv)
    asks_help = "--help" in argv or "-h" in argv
    if asks_help:
        print(help_text())
    try:
        check_version()
        warm_up_len, argv = parse_warm_up(argv)
        config, rest = parse_config_flags(argv)
    except (ValueError, RuntimeError, argparse.ArgumentError) as err:
        return _refuse(err)
    import typer

    SparseServe.sparse_config, SparseServe.warm_up_len = config, warm_up_len
    app = typer.Typer(add_completion=False)
    app.command()(SparseServe)
    if not asks_help:
        try:
            check_model(_model_of(typer.main.get_command(app), rest))
        except ValueError as err:
            return _refuse(err)
    app(args=rest, prog_name="sparse-prefill serve")
    return 0
