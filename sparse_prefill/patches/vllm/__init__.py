"""Sparse prefill in vLLM: an attention backend registered through vLLM's plugin entry point.

`pip install "sparse-prefill[vllm]"` declares `register` in the `vllm.general_plugins` entry-point group, which
vLLM loads in every process it starts (API server, engine core, each worker). `register` puts one class path
under `AttentionBackendEnum.CUSTOM` with vLLM's own `register_backend`: no vLLM class is patched, nothing is
imported, and a vLLM that runs another backend runs exactly as without the package. `--attention-backend
CUSTOM` selects it (`vllm serve MODEL --attention-backend CUSTOM`, or `LLM(..., attention_backend="CUSTOM")`).

The backend (`backend.py`) is vLLM's FlashAttention backend with one change: its forward runs the long prefill
requests of a batch, and long prefill chunks, through `sparse_attention`, each request's keys and values read
from the paged cache; decode steps, short prompts and everything the sparse path cannot take run vLLM's
FlashAttention unchanged. The engine-independent pieces live in `paged.py` (metadata -> requests, the paged
gather) and `..per_request` (shared with the transformers glue).

Configuration: the `SparsePrefillConfig` fields come from the environment variable SPARSE_PREFILL_CONFIG
("gamma=0.9,min_seq_len=auto", parsed by `config.config_from_text`). vLLM has no channel that carries options
to one attention backend (every `--attention-config` key is a field of vLLM's own AttentionConfig, validated
against it), while environment variables reach every process it starts, the workers of every GPU included.

Versions: built and checked against vLLM 0.24 (SUPPORTED_VLLM). The backend reuses FlashAttention's metadata
and forward, which change between vLLM releases, so on another version `register` still registers the path
(and logs that the version is unsupported) and selecting the backend raises an error naming the supported
versions; a vLLM without the backend registry is left alone.
"""

from __future__ import annotations

import logging
import os

from ...config import SparsePrefillConfig, config_from_text

SUPPORTED_VLLM = ((0, 24),)  # (major, minor) releases the backend was built against
ENV_CONFIG = "SPARSE_PREFILL_CONFIG"
ENV_WARM_UP = "SPARSE_PREFILL_WARM_UP"  # tokens the kernels are compiled for at start (default max_model_len; 0 none)
BACKEND_PATH = "sparse_prefill.patches.vllm.backend.SparsePrefillBackend"

_log = logging.getLogger("vllm.plugins.sparse_prefill")  # under vLLM's logger, so it prints with vLLM's logs


def version_problem(version: str) -> str | None:
    """None when vLLM `version` is one the backend supports, else what to do about it."""
    supported = " or ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_VLLM)
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        major = minor = -1
    if (major, minor) in SUPPORTED_VLLM:
        return None
    return (f"sparse_prefill's vLLM backend supports vLLM {supported}; this is vLLM {version}. Install a supported "
            f"vLLM (pip install 'vllm=={SUPPORTED_VLLM[-1][0]}.{SUPPORTED_VLLM[-1][1]}.*') or choose another "
            "--attention-backend.")


def config_from_env(environ: os._Environ | dict | None = None) -> SparsePrefillConfig:
    """The SparsePrefillConfig that SPARSE_PREFILL_CONFIG gives (the defaults when it is unset or empty).

    Raises ValueError naming the variable and what is wrong with it."""
    text = (os.environ if environ is None else environ).get(ENV_CONFIG, "")
    try:
        return config_from_text(text)
    except ValueError as err:
        raise ValueError(f"{ENV_CONFIG}={text!r}: {err}") from None


def register() -> None:
    """Entry point of the `vllm.general_plugins` group: register the backend under AttentionBackendEnum.CUSTOM.

    Called in every process vLLM starts, whatever backend it runs, so it imports nothing of the backend, never
    raises, and leaves CUSTOM alone when another plugin registered it first. Loading it again is harmless.
    """
    try:
        import vllm
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    except Exception as err:  # noqa: BLE001 - a plugin must never stop vLLM
        _log.info("sparse_prefill: no vLLM attention backend registry here (%s); backend not registered.", err)
        return
    custom = getattr(AttentionBackendEnum, "CUSTOM", None)
    if custom is None:
        _log.info("sparse_prefill: this vLLM has no AttentionBackendEnum.CUSTOM; backend not registered.")
        return
    try:
        current = custom.get_path() if custom.is_overridden() else None
    except Exception:  # noqa: BLE001
        current = None
    if current is not None and current != BACKEND_PATH:
        _log.warning("sparse_prefill: AttentionBackendEnum.CUSTOM is registered to %s already; sparse_prefill's "
                     "backend is not registered.", current)
        return
    register_backend(custom, BACKEND_PATH)
    problem = version_problem(getattr(vllm, "__version__", "unknown"))
    if problem is not None:
        _log.info("%s (--attention-backend CUSTOM will refuse to start.)", problem)
