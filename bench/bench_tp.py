"""Prefill over N GPUs with transformers' tensor parallelism: TTFT dense vs sparse, and peak memory per GPU.

    torchrun --nproc-per-node 2 bench/bench_tp.py --lengths 128k,256k,512k \
        --densities bench/densities/qwen15_yarn4_131072_gamma095.json
    torchrun --nproc-per-node 2 bench/bench_tp.py --lengths 1024k --one-shot-max 512k --chunk 16k \
        --densities bench/densities/qwen15_yarn4_131072_gamma095.json
    python bench/bench_tp.py --lengths 128k,256k,512k --one-shot-max 256k --densities ...   # one GPU, no TP

Every rank loads `--arch` (random weights; default the Llama-3.1-8B shape) through `from_pretrained` with the
model's own TP plan (`tp_plan="auto"`), so it holds 1/N of every layer's query and KV heads, and so 1/N of the KV
cache and of the selection's memory. Without torchrun it runs on one GPU (N = 1), for the memory model's check there.

For each length the prompt is prefilled through a DynamicCache, keeping the last token's logits (the time to the
first token): in one forward up to `--one-shot-max`, past it in chunks of `--chunk` tokens. Dense first: SDPA with
`--dense-backends` one-shot; for chunks, SDPA with torch's own choice of backend (transformers' mask rules out flash
attention) and every causal block through the sparse kernel (exact dense attention without that mask). Then sparse,
with `patch_model`. As in bench_e2e.py, `--densities` (or `--density`) forces per-layer densities on the random
weights while the real selection still runs and is timed. The forced layouts are built inside the timed prefill, a
few heads at a time and never cached, so beside what a trained model's run holds they add one layout and ~0.5 GB of
sort buffers at a time; the `forcing_ms` column says how long building them took.

Peak memory is per GPU, the largest over the ranks; `model_gib` beside it is the memory model: the rank's weights,
its KV cache (2 x layers x KV heads/N x head_dim x 2 bytes per token in bf16), for chunks the bool mask [chunk, keys]
that transformers builds (for dense SDPA also, at most, an additive copy of it in bf16), and for sparse the
selection's 12 bytes per (query head/N, query block, key block) of the largest forward; the rest of the peak is one
layer's activations.

A short table is printed last; all rows go to $OUT/bench_tp.json (else ./bench_tp.json) after every length.
`--device cpu --arch tiny-llama` with short lengths runs the same code on CPU processes (gloo): it checks the
script, not speed.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import CONFIG_FIELDS, build_config  # noqa: E402  (this script's folder, so on sys.path)

from sparse_prefill import patch_model, unpatch_model  # noqa: E402
from sparse_prefill.eval.archs import arch_config, random_model  # noqa: E402
from sparse_prefill.eval.options import parse_lengths  # noqa: E402
from sparse_prefill.eval.recording import (  # noqa: E402
    LayoutRecorder,
    intercept_layouts,
    load_layer_densities,
    num_layers,
    random_layout,
    resample_layers,
)
from sparse_prefill.eval.runner import format_table  # noqa: E402
from sparse_prefill.eval.speed import attention_shape, dense_backends, time_call  # noqa: E402
from sparse_prefill.layout import BlockLayout  # noqa: E402

COLUMNS = ["length", "prefill", "variant", "ms", "speedup", "density", "forcing_ms", "top1_match", "peak_gib",
           "model_gib", "kv_gib", "note"]
SELECTION_BYTES = 12  # per (query head, query block, key block) of the layer being selected (docs/limits.md, "Memory")
FORCE_ELEMENTS = 1 << 24  # (head, query block, key block) cells per random_layout call: ~0.5 GB of sort buffers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-3.1-8b", help="random-weight architecture (eval/configs)")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("128k,256k,512k"), help="prompt lengths")
    p.add_argument("--one-shot-max", type=lambda s: parse_lengths(s)[0], default=512 * 1024,
                   help="longer prompts are prefilled in chunks of --chunk tokens (default 512k)")
    p.add_argument("--chunk", type=lambda s: parse_lengths(s)[0], default=16 * 1024,
                   help="tokens per chunk past --one-shot-max (default 16k: its bool mask over 1M keys is 16 GiB)")
    p.add_argument("--densities", help="JSON of per-layer densities to force (bench/densities/*.json)")
    p.add_argument("--density", type=float, help="one density to force on every layer")
    for field in CONFIG_FIELDS:  # strings, parsed by config_from_options like the CLI's
        p.add_argument("--" + field.replace("_", "-"), dest=field, help="sparse config field (default: the library's)")
    p.add_argument("--repeats", type=int, default=1, help="timed prefills per variant and length (median)")
    p.add_argument("--warmup-length", type=lambda s: parse_lengths(s)[0], default=16 * 1024,
                   help="one untimed prefill of each kind at this length first (compiles the kernels)")
    p.add_argument("--dense-backends", type=lambda s: s.split(","), default=["cudnn"],
                   help="SDPA backends for one-shot dense prefill (cudnn, flash; default cudnn)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: check the script (gloo)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    return p.parse_args(argv)


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); under torchrun the process group is set up here (nccl or gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device_type == "cuda" else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device
    # Our own timeout: transformers would set two hours, and a rank stuck in a collective should fail sooner.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=20),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), world, device


def load_model(arch: str, world: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """`arch` with random weights: on one device, or sharded by its TP plan over the torchrun world.

    `from_pretrained` (the only way in to transformers' TP) needs a checkpoint: it gets one that holds a single
    tensor and initialises every other weight itself, each rank its own shard. With one seed on every rank the
    replicated weights agree (and the ranks' shards hold the same random values, which timing does not mind).
    """
    if world == 1:
        return random_model(arch, dtype=dtype, device=device, seed=seed)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    try:
        from transformers import DistributedConfig
        tensor_parallel = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:  # transformers before DistributedConfig
        tensor_parallel = {"tp_plan": "auto"}
    config = arch_config(arch)
    logging.set_verbosity_error()  # the list of weights it initialised: all but one, by design
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        save_file({"model.norm.weight": torch.ones(config.hidden_size)}, f"{folder}/model.safetensors",
                  metadata={"format": "pt"})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa",
                                                     **tensor_parallel)
    return model.eval()


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters (its shard of each sharded one)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


class ForcedLayouts:
    """Random layouts of each layer's forced density (`recording.random_layout`, as `ForcedDensity` builds them),
    made a few heads at a time and never cached.

    A cached layout per layer would add GBs at 512K that a trained model's run does not hold, and a whole layer's
    at once ~30 bytes of sort buffers per (head, query block, key block), more than the selection's 12.
    The time it takes is inside the sparse prefill: `seconds()` reports it (CUDA events around each call, so the
    time it adds to the device's timeline).
    """

    def __init__(self, densities: list[float], seed: int = 0):
        self.densities, self.seed = densities, seed
        self._spans: list[tuple] = []

    def __call__(self, layer, q, k, layout: BlockLayout) -> BlockLayout:
        if layer is None:
            return layout
        start = self._mark(q.device)
        b, heads, n_qb, n_kb = layout.shape
        step = max(1, FORCE_ELEMENTS // (n_qb * n_kb))
        parts = [random_layout(b, min(step, heads - h), q.shape[2], k.shape[2], layout.block_size,
                               self.densities[layer], device=q.device, seed=self.seed + 1000 * layer + h)
                 for h in range(0, heads, step)]
        width = max(part.indices.shape[-1] for part in parts)
        indices = torch.cat([torch.nn.functional.pad(part.indices, (0, width - part.indices.shape[-1]), value=-1)
                             for part in parts], dim=1)
        forced = BlockLayout(torch.cat([part.counts for part in parts], dim=1), indices, layout.block_size, n_kb,
                             canonical=True)
        self._spans.append((start, self._mark(q.device)))
        return forced

    @staticmethod
    def _mark(device: torch.device):
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> float:
        """Time spent building layouts since the last call (synchronise the device first)."""
        spans, self._spans = self._spans, []
        return sum(s.elapsed_time(e) / 1e3 if hasattr(s, "elapsed_time") else e - s for s, e in spans)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Last-token logits after prefilling ids [1, L] through a DynamicCache, `chunk` tokens a forward (None: one)."""
    from transformers import DynamicCache

    # transformers 5.25 renames `past_key_values` to `cache` (the old name warns until 5.40)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, step = DynamicCache(config=model.config), chunk or ids.shape[1]
    for start in range(0, ids.shape[1], step):
        logits = model(input_ids=ids[:, start:start + step], use_cache=True, logits_to_keep=1, **{name: cache}).logits
    return logits[0, -1].float()


def timed(fn, device: torch.device, repeats: int) -> dict:
    """{"ms": median time of fn(), "peak_gib": the device's peak over those calls, the largest over the ranks}."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"ms": 1e3 * time_call(fn, device, repeats, warmup=0)}
    if device.type == "cuda":
        peak = torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        row["peak_gib"] = float(peak) / 2**30
    return row


def memory_model(model, length: int, chunk: int | None, block_size: int, world: int, weights: int) -> dict:
    """Per-GPU bytes each variant must hold besides one layer's activations, and the KV cache's ("kv")."""
    hq, hkv, head_dim = attention_shape(model.config)
    element = next(model.parameters()).element_size()
    kv = 2 * num_layers(model) * hkv // world * head_dim * element * length
    queries = chunk or length
    # transformers' bool mask [chunk, keys] for a chunk over a cache (a one-shot prompt needs none: is_causal); SDPA
    # may convert it to an additive mask of the query's dtype (counted: an upper bound). The sparse path only reads it.
    mask = queries * length if chunk else 0
    selection = SELECTION_BYTES * hq // world * -(-queries // block_size) * -(-length // block_size)
    held = weights + kv + mask
    return {"kv": kv, "sdpa": held + element * mask, "every block": held, "sparse": held + selection}


def run_length(model, length, chunk, args, config, forced, world, device, weights) -> list[dict]:
    """Dense rows, then the sparse row, for one prompt length. Dense: each SDPA backend asked for (torch's own choice
    for chunks), and for chunks also every causal block through the sparse kernel (exact dense attention without
    SDPA's mask)."""
    generator = torch.Generator(device=device).manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device, generator=generator)
    sizes = memory_model(model, length, chunk, config.block_size, world, weights)
    base = {"length": length, "prefill": f"chunks of {_tokens(chunk)}" if chunk else "one shot",
            "kv_gib": sizes["kv"] / 2**30}
    variants = [(f"dense {name}", "sdpa", backend, None)
                for name, backend in ({"sdpa": None} if chunk else dense_backends(device, args.dense_backends)).items()]
    if chunk:
        variants.append(("dense, every block", "every block", None, config.replace(gamma=1.0)))
    rows, logits = [], {}

    def run():
        logits["last"] = prefill(model, ids, chunk)

    for variant, kind, backend, exact in variants:
        unpatch_model(model)
        if exact is not None:
            patch_model(model, exact)
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                row = _guarded(lambda: timed(run, device, args.repeats), dense=True)
        finally:
            unpatch_model(model)
        rows.append({**base, "variant": variant, "model_gib": sizes[kind] / 2**30, **row})
    reference = logits.pop("last", None)
    recorder = LayoutRecorder(num_layers(model))
    forcing = ForcedLayouts(forced) if forced else None

    def hook(layer, q, k, layout):
        return recorder(layer, q, k, forcing(layer, q, k, layout) if forcing else layout)

    patch_model(model, config)
    try:
        with intercept_layouts(model, hook):
            row = _guarded(lambda: timed(run, device, args.repeats))
    finally:
        unpatch_model(model)
    if "last" in logits and reference is not None:  # does the sparse prefill predict dense's next token?
        row["top1_match"] = bool(logits["last"].argmax() == reference.argmax())
    if forcing:
        row["forcing_ms"] = 1e3 * forcing.seconds() / args.repeats
    best = min((r["ms"] for r in rows if r.get("ms")), default=None)
    rows.append({**base, "variant": "sparse", "model_gib": sizes["sparse"] / 2**30, "density": recorder.mean_density(),
                 "speedup": best / row["ms"] if best and row.get("ms") else None,
                 "note": "forced densities" if forced else "", **row})
    return rows


def _progress(row: dict) -> str:
    peak = f", {row['peak_gib']:.1f} GiB" if row.get("peak_gib") else ""
    timing = f"{row['ms']:.0f} ms{peak}" if row.get("ms") else row.get("note", "")
    return f"{_tokens(row['length'])} {row['variant']}: {timing}"


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _guarded(measure, dense: bool = False) -> dict:
    """measure(), or a row with a note: "out of memory", or for `dense` the first line of the error of an SDPA backend
    that refuses these shapes. Every rank allocates and refuses alike, so all of them take the same branch (were an
    OOM one rank's alone, the others would wait in the forward's next collective until the group's timeout)."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"note": "out of memory"}
    except RuntimeError as err:
        if not dense:
            raise
        return {"note": str(err).splitlines()[0][:80]}


def main(argv=None) -> int:
    args = parse_args(argv)
    config = build_config(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_tp.py times GPU prefill; no CUDA device here (--device cpu checks the script).")
        return 1
    rank, world, device = init_distributed(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    say = print if rank == 0 else (lambda *a, **k: None)
    start = time.perf_counter()
    model = load_model(args.arch, world, device, dtype)
    weights = local_bytes(model)
    forced = None
    if args.densities or args.density is not None:
        values = load_layer_densities(args.densities) if args.densities else [args.density]
        forced = resample_layers(values, num_layers(model))
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    say(f"{args.arch} (random weights) over {world} x {name}, {dtype}: built in {time.perf_counter() - start:.1f} s, "
        f"{weights / 2**30:.2f} GiB of weights per rank; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; config {config}; forced densities: {args.densities or args.density}",
        flush=True)
    for chunk in (None, args.warmup_length // 2):  # untimed: compiles what the timed prefills run, both geometries
        run_length(model, args.warmup_length, chunk, args, config, forced, world, device, weights)
    rows = []
    out = Path(os.environ.get("OUT", ".")) / "bench_tp.json"
    for length in args.lengths:
        chunk = args.chunk if length > args.one_shot_max else None
        rows += run_length(model, length, chunk, args, config, forced, world, device, weights)
        say("  " + "; ".join(_progress(r) for r in rows if r["length"] == length), flush=True)
        if rank == 0:
            out.write_text(json.dumps({"device": name, "world": world, "arch": args.arch, "config": str(config),
                                       "forced_densities": args.densities or args.density, "weights_gib_per_rank":
                                       weights / 2**30, "rows": rows}, indent=1))
    say(f"\nwrote {out}\n")
    say(format_table(rows, COLUMNS))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
