"""`sparse-prefill serve`: `transformers serve` with every model it loads patched for sparse prefill.

    sparse-prefill serve MODEL [--gamma 0.9 ... any SparsePrefillConfig field] [any `transformers serve` option]

transformers serve (>= 5.25) loads each model in a process of its own, with a copy of the server's
`ModelLoader`. `SparseServe` is transformers' own `Serve` command whose loader is wrapped
(`PatchingLoader`): in the model's process it loads the model as transformers does, then `patch_model`s it
with the config given on the command line (the config travels with the pickled loader). Everything else —
the HTTP API, continuous batching, the paged cache, request errors — is transformers serve unchanged; the
patched model enters continuous batching like any sdpa or flash model (see `transformers_attention.py`).

With continuous batching, prefill batches run outside CUDA graphs (the selection reads each request's
length on the host): where the user sets nothing, the prefill path's graphs are off and the decode path's
are left to transformers (`use_cuda_graph=(False, None)` is not a setting transformers takes, so both are
given: (False, True) on a GPU).

The same holds for `generate_batch` with flash attention, where transformers turns graphs on by default:
pass `ContinuousBatchingConfig(use_cuda_graph=(False, True))`.
"""

from __future__ import annotations

import argparse
import sys

from ..config import SparsePrefillConfig, config_from_options

MIN_TRANSFORMERS = (5, 25)  # a model's process loads through a picklable `ModelLoader`


class PatchingLoader:
    """A transformers serve `ModelLoader` that patches what it loads; every other attribute is the wrapped one's."""

    def __init__(self, loader, config: SparsePrefillConfig):
        self._loader = loader
        self._config = config

    def __getattr__(self, name: str):
        if name.startswith("__") or "_loader" not in self.__dict__:  # pickling and copying look for dunders
            raise AttributeError(name)
        return getattr(self._loader, name)

    def load_model_and_processor(self, *args, **kwargs):
        from . import patch_model

        model, processor = self._loader.load_model_and_processor(*args, **kwargs)
        patch_model(model, self._config)
        print(f"sparse_prefill: {type(model).__name__} patched for sparse prefill ({model.config._attn_implementation}"
              f" attention): {self._config}", file=sys.stderr, flush=True)
        return model, processor


try:
    from transformers.cli.serve import Serve as _Serve
except ImportError:  # pragma: no cover - a transformers without the serve command: `check_version` says so
    _Serve = object


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
    """transformers' `Serve` command whose model loader patches every model it loads with `sparse_config`."""

    sparse_config = SparsePrefillConfig()  # set by `main` before the command runs; travels with the loader

    @property
    def loader(self):
        return self.__dict__["loader"]

    @loader.setter
    def loader(self, loader) -> None:
        self.__dict__["loader"] = PatchingLoader(loader, self.sparse_config)

    @property
    def generation_state(self):
        return self.__dict__["generation_state"]

    @generation_state.setter
    def generation_state(self, state) -> None:
        import torch

        if getattr(state, "_continuous_batching", False) and hasattr(state, "cb_config"):
            state.cb_config = _with_prefill_graphs_off(state.cb_config, torch.cuda.is_available())
        self.__dict__["generation_state"] = state


def _with_prefill_graphs_off(cb_config, on_gpu: bool):
    """The continuous-batching config with the prefill path out of CUDA graphs, unless the user chose."""
    from transformers import ContinuousBatchingConfig

    cb_config = cb_config if cb_config is not None else ContinuousBatchingConfig()
    if cb_config.use_cuda_graph is None:
        cb_config.use_cuda_graph = (False, on_gpu)
    return cb_config


def parse_config_flags(argv: list[str]) -> tuple[SparsePrefillConfig, list[str]]:
    """(config, the other arguments): every SparsePrefillConfig field as a flag (`--gamma 0.9`,
    `--min-seq-len auto`), the rest left for transformers serve."""
    import dataclasses

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for field in dataclasses.fields(SparsePrefillConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None)
    known, rest = parser.parse_known_args(argv)
    options = {name: value for name, value in vars(known).items() if value is not None}
    return config_from_options(options), rest


def main(argv: list[str] | None = None) -> int:
    """`sparse-prefill serve ...`: parse our flags, then run transformers serve's command on the rest."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        fields = ", ".join("--" + name.replace("_", "-") for name in SparsePrefillConfig.__dataclass_fields__)
        print("sparse-prefill serve MODEL [SparsePrefillConfig flags] [transformers serve options]\n\n"
              f"SparsePrefillConfig flags (see the README's Configuration table): {fields}.\n"
              "The transformers serve options follow.\n")
    try:
        check_version()
        config, rest = parse_config_flags(argv)
    except (ValueError, RuntimeError) as err:
        print(f"sparse-prefill serve: error: {err}", file=sys.stderr)
        return 2
    import typer

    SparseServe.sparse_config = config
    app = typer.Typer(add_completion=False)
    app.command()(SparseServe)
    app(args=rest, prog_name="sparse-prefill serve")
    return 0
