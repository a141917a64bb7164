"""End-to-end prefill time (TTFT) on a GPU: dense cuDNN / flash SDPA against sparse prefill, in one run.

    PYTHONUNBUFFERED=1 python bench/bench_e2e.py --arch llama-3.1-8b --lengths 32k,64k,128k \
        --densities qwen05b_density.json [--model .models/qwen2.5-coder-0.5b-instruct.gguf --model-lengths 32k]

For each `--arch` (random weights, built on the GPU from the shipped config) and each length: one
prefill forward (no KV cache, logits of the last token only) per dense SDPA backend, then with
`patch_model`. Random weights attend almost uniformly, so their own selection keeps nearly every
block; `--densities` (a density.json written by `sparse-prefill niah` on a trained model, or a JSON
list) or `--density` forces per-layer densities (stretched over the layers by relative depth) while
the real selection still runs and is timed. The table says when densities were forced.

Each `--model` (a .gguf file, a HF folder or a pinned name) runs at `--model-lengths` on a real
prompt (prose haystack with a passkey, chat template), with its own selection; `top1` says whether
the sparse prefill predicts the same next token as dense.

`--attention` adds attention-only rows (one layer of the arch's shape). A short table is printed
last; all rows go to $OUT/bench_e2e.json when OUT is set (else ./bench_e2e.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_prefill import SparsePrefillConfig  # noqa: E402
from sparse_prefill.config import config_from_options  # noqa: E402
from sparse_prefill.eval.archs import random_model  # noqa: E402
from sparse_prefill.eval.models import load_model  # noqa: E402
from sparse_prefill.eval.options import parse_lengths  # noqa: E402
from sparse_prefill.eval.recording import load_layer_densities  # noqa: E402
from sparse_prefill.eval.runner import format_table  # noqa: E402
from sparse_prefill.eval.speed import attention_only, attention_shape, end_to_end  # noqa: E402
from sparse_prefill.eval.tasks import make_example  # noqa: E402

CONFIG_FIELDS = ("gamma", "block_size", "min_budget_tokens", "sink_blocks", "local_blocks", "stride", "proxy_heads",
                 "attention_dtype")
COLUMNS = ["model", "what", "length", "variant", "ms", "speedup", "density", "top1_match", "peak_gib", "note"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", default=[], help="random-weight architecture (repeatable)")
    p.add_argument("--lengths", type=parse_lengths, default=[32768, 65536, 131072], help="lengths for --arch models")
    p.add_argument("--model", action="append", default=[], help="trained model: .gguf, HF folder or pinned name")
    p.add_argument("--model-lengths", type=parse_lengths, default=[32768], help="lengths for --model models")
    p.add_argument("--densities", help="JSON of per-layer densities to force on --arch models")
    p.add_argument("--density", type=float, help="one density to force on every layer of --arch models")
    for field in CONFIG_FIELDS:  # strings, parsed by config_from_options like the CLI's
        p.add_argument("--" + field.replace("_", "-"), dest=field, help="sparse config field (default: the library's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention", action="store_true", help="also time attention alone for each --arch shape")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--dense-backends", type=lambda s: s.split(","), default=None,
                   help="dense SDPA backends to time (default: cudnn,flash); cudnn alone halves a long run")
    return p.parse_args(argv)


def build_config(args) -> SparsePrefillConfig:
    """The config of the config flags given, with the sparse path at every length (min_seq_len=0)."""
    given = {k: getattr(args, k) for k in CONFIG_FIELDS if getattr(args, k) is not None}
    return config_from_options({**given, "min_seq_len": 0})


def main(argv=None) -> int:
    args = parse_args(argv)
    config = build_config(args)
    if not torch.cuda.is_available():
        print("bench_e2e.py times GPU prefill; no CUDA device here.")
        return 1
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    forced = load_layer_densities(args.densities) if args.densities else args.density
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, config {config}")
    if forced is not None:
        print(f"forcing densities on random-weight models: {forced if isinstance(forced, float) else 'per layer'} "
              f"({args.densities or 'one value'})")
    rows = []
    for arch in args.arch:
        start = time.perf_counter()
        model = random_model(arch, dtype=dtype, device=device)
        print(f"{arch}: built in {time.perf_counter() - start:.1f} s", flush=True)
        for length in args.lengths:
            if args.attention:
                rows += _tag(attention_only(attention_shape(model.config), length, config, device, dtype,
                                            _mean(forced), args.repeats, args.dense_backends), f"{arch} (random)")
            ids = torch.randint(0, 32000, (1, length), device=device, generator=torch.Generator(device).manual_seed(0))
            rows += _tag(end_to_end(model, ids, config, forced, args.repeats, args.dense_backends), f"{arch} (random)")
            _progress(rows)
        del model
        torch.cuda.empty_cache()
    for name in args.model:
        start = time.perf_counter()
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        print(f"{name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
        for length in args.model_lengths:
            example = make_example("passkey", tokenizer, length, depth=0.5, haystack="prose")
            ids = torch.tensor([list(example.input_ids)], device=device)
            rows += _tag(end_to_end(model, ids, config, None, args.repeats, args.dense_backends), Path(str(name)).stem)
            _progress(rows)
        del model
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", ".")) / "bench_e2e.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "config": str(config),
                               "forced_densities": forced, "rows": rows}, indent=1))
    print(f"\nwrote {out}\n")
    print(format_table(rows, COLUMNS))
    return 0


def _mean(forced):
    if forced is None or isinstance(forced, float):
        return forced
    return sum(forced) / len(forced)


def _tag(rows, model):
    return [{"model": model, **r} for r in rows]


def _progress(rows):
    last = [r for r in rows if r["variant"] in ("sparse", "dense cudnn")][-2:]
    print("  " + "; ".join(f"{r['variant']} {r['ms']:.0f} ms" for r in last if r.get("ms")), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
