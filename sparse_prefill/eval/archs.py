"""Models that need no download: random-weight architectures from shipped configs, and the tiny default.

`--arch llama-3.1-8b` builds a randomly initialised model of that shape from `eval/configs/<name>.json`:
right for timing (attention cost depends on shape, not on weights), meaningless for accuracy.
With no `--model`, commands run on `sparse-prefill-tiny`: a 2-layer random Llama with a byte-level
tokenizer built offline, so every command works on a fresh CPU-only machine in seconds. Random
weights cannot retrieve a needle; the tiny default checks the pipeline, not the method.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

TINY = "sparse-prefill-tiny"
_TINY_ARCH = "tiny-llama"
_SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 256, 257, 258; ids 0..255 are the bytes


def _configs_dir() -> Path:
    return Path(str(resources.files("sparse_prefill.eval") / "configs"))


def list_archs() -> list[str]:
    """Names accepted by `--arch` (config files shipped in eval/configs)."""
    return sorted(p.stem for p in _configs_dir().glob("*.json"))


def check_arch(name: str) -> None:
    if name not in list_archs():
        raise ValueError(f"Unknown --arch {name!r}; choose one of: {', '.join(list_archs())}.")


def arch_config(name: str):
    """The transformers config of a shipped architecture."""
    from transformers import AutoConfig

    check_arch(name)
    values = json.loads((_configs_dir() / f"{name}.json").read_text())
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_model(name: str, dtype=None, device=None, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised causal LM of architecture `name`, built directly on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = arch_config(name)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizers use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@cache
def byte_tokenizer():
    """A byte-level PreTrainedTokenizerFast (one token per UTF-8 byte), built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    vocab.update({tok: 256 + i for i, tok in enumerate(_SPECIALS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=1 << 20)


def tiny_model(dtype=None, device=None):
    """(model, tokenizer) of the embedded default: random 2-layer Llama, byte tokenizer."""
    return random_model(_TINY_ARCH, dtype=dtype, device=device), byte_tokenizer()


def check_model_choice(model: str | None, arch: str | None) -> None:
    """Raise ValueError, naming the fix, for what `resolve_model` would refuse: --model with --arch, an unknown
    --arch, a --model that is no model (`models.check_model`). Reads the file system only: nothing is loaded."""
    if model and arch:
        raise ValueError("Pass either --model (trained weights) or --arch (random weights), not both.")
    if arch:
        check_arch(arch)
    elif model and model != TINY:
        from .models import check_model

        check_model(model)


def resolve_model(model: str | None = None, arch: str | None = None, dtype=None, device=None,
                  yarn: float | None = None):
    """(model, tokenizer, name) for the CLI: `--arch` random weights, `--model` path or pin, else tiny.
    `yarn` applies to trained models only (`models.load_model`)."""
    check_model_choice(model, arch)
    if arch:
        return random_model(arch, dtype=dtype, device=device), byte_tokenizer(), f"{arch} (random weights)"
    if not model or model == TINY:
        return (*tiny_model(dtype=dtype, device=device), f"{TINY} (random weights)")
    from .models import load_model

    loaded, tokenizer = load_model(model, dtype=dtype, device=device, yarn=yarn)
    return loaded, tokenizer, str(model) + (f" (YaRN x{yarn:g})" if yarn else "")


def is_random(name: str) -> bool:
    return name.endswith("(random weights)")
