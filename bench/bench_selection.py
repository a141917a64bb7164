"""Block selection cost on the GPU against cuDNN dense attention, same card, same run.

For each attention shape and length: times (median of `triton.testing.do_bench`) cuDNN SDPA dense
causal attention and the fused selection (`select_blocks` on CUDA: estimate + last-block attention +
policy + layout) for several selection configs, with a breakdown of the selection's stages. Before
timing it checks, on a shorter sequence:
  * the Triton estimate and last-block mass against the PyTorch reference (fp32, same GPU);
  * the layout against the reference policy (share of blocks that agree);
  * that one selection call makes no host synchronisation (`torch.cuda.set_sync_debug_mode("error")`);
  * peak extra GPU memory of one selection call at every length.

    python bench/bench_selection.py                      # Llama-3.1-8B shape 32K/64K/128K + Qwen2.5-0.5B 32K
    python bench/bench_selection.py --shapes llama --sizes 131072 --variants q-s16

Results: a table on stdout (last), JSON lines in $OUT/bench_selection.jsonl when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_prefill import SparsePrefillConfig, select_blocks, selection  # noqa: E402
from sparse_prefill.config import config_from_options  # noqa: E402
from sparse_prefill.selection import fused  # noqa: E402
from sparse_prefill.selection.budget import choose_blocks, last_block_mass  # noqa: E402
from sparse_prefill.selection.estimate import estimate_block_scores  # noqa: E402
from sparse_prefill.selection.fused_policy import choose_blocks_fused  # noqa: E402

SHAPES = {  # name: (query heads, kv heads, head_dim)
    "llama": (32, 8, 128),  # Llama-3.1-8B
    "qwen05b": (14, 2, 64),  # Qwen2.5-0.5B
    "phi3": (32, 32, 96),  # Phi-3-mini: head_dim 96, padded to 128 in registers
}
VARIANTS = {  # name: config changes
    "q-s16": dict(proxy_heads="q", stride=16),
    "q-s8": dict(proxy_heads="q", stride=8),
    "kv-s4": dict(proxy_heads="kv", stride=4),
}


def variant_config(name: str, gamma: float) -> SparsePrefillConfig:
    """A VARIANTS name, or config fields written out: 'proxy_heads=q+stride=8+min_budget_tokens=1024'."""
    if name in VARIANTS:
        options = VARIANTS[name]
    elif "=" in name:
        options = dict(item.split("=", 1) for item in name.split("+"))
    else:
        raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, or fields written out like "
                         "proxy_heads=q+stride=8")
    return config_from_options({"gamma": gamma, **options})


def bench(fn, rep_ms: int) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def make_qk(hq: int, hkv: int, d: int, n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    # Give the keys structure (a few heavy columns, like attention sinks) so the softmax is not flat.
    k[:, :, :: 997] *= 3
    return q, k


def dense_cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def check_correctness(shape: str, n: int, config: SparsePrefillConfig) -> dict:
    """Fused vs reference on one length: estimate/last-block max error and layout agreement."""
    hq, hkv, d = SHAPES[shape]
    q, k = make_qk(hq, hkv, d, n, seed=1)
    key_range = torch.tensor([[n // 7, n - 3]], device="cuda", dtype=torch.int32)
    out = {}
    for tag, kr in (("", None), ("keyrange_", key_range)):
        est = fused.estimate_block_scores_fused(q, k, config, key_range=kr)
        ref = estimate_block_scores(q.float(), k.float(), config, key_range=kr)
        lm_fused = fused.last_block_mass_fused(q, k, config, key_range=kr)
        lm_ref = last_block_mass(q.float(), k.float(), config, key_range=kr)
        out[tag + "score_max_err"] = (est.score - ref.score).abs().max().item()
        out[tag + "mass_max_err"] = (est.mass - ref.mass).abs().max().item()
        out[tag + "last_mass_max_err"] = (lm_fused - lm_ref).abs().max().item()
        mask_fused = selection.select_blocks_fused(q, k, config, key_range=kr).to_mask()
        mask_ref = selection.select_blocks_reference(q.float(), k.float(), config, key_range=kr).to_mask()
        out[tag + "layout_agreement"] = (mask_fused == mask_ref).float().mean().item()
        # The torch policy on the fused numbers must give exactly the fused layout (ties go the same way).
        same = choose_blocks(est, lm_fused, config, n, n)
        out[tag + "policy_consistent"] = bool(torch.equal(same, mask_fused))
        out[tag + "policy_agreement"] = (same == mask_fused).float().mean().item()
        if kr is None:  # select_blocks on CUDA must dispatch to the fused path
            out["dispatch_fused"] = bool(torch.equal(select_blocks(q, k, config).to_mask(), mask_fused))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        selection.select_blocks_fused(q, k, config)
        out["host_sync_free"] = True
    except RuntimeError as err:
        out["host_sync_free"] = f"no: {err}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out


def selection_stages(q, k, config) -> dict:
    """Closures timing the whole selection and each of its stages on fixed inputs."""
    n = q.shape[2]
    scores = fused.estimate_block_scores_fused(q, k, config)
    last = fused.last_block_mass_fused(q, k, config)
    return {
        "total": lambda: selection.select_blocks_fused(q, k, config),
        "estimate": lambda: fused.estimate_block_scores_fused(q, k, config),
        "last_block": lambda: fused.last_block_mass_fused(q, k, config),
        "policy": lambda: choose_blocks_fused(scores, last, config, n, n),
    }


def graph_time(fn, rep_ms: int) -> float:
    """GPU time of fn without launch gaps: median replay time of a CUDA graph of one call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture (compiles, allocator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, rep_ms)


def time_shape(shape: str, n: int, variants: list[str], gamma: float, rep_ms: int, log) -> list[dict]:
    hq, hkv, d = SHAPES[shape]
    q, k = make_qk(hq, hkv, d, n)
    v = torch.randn_like(k)
    rows = []
    dense_ms = bench(lambda: dense_cudnn(q, k, v), rep_ms)
    log(f"{shape} N={n}: cuDNN dense {dense_ms:.3f} ms")
    for name in variants:
        config = variant_config(name, gamma)
        stages = selection_stages(q, k, config)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        layout = selection.select_blocks_fused(q, k, config)
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = {stage: bench(fn, rep_ms) for stage, fn in stages.items()}
        times["graph"] = graph_time(stages["total"], rep_ms)
        row = dict(shape=shape, n=n, variant=name, gamma=gamma, dense_ms=dense_ms, density=layout.density(),
                   peak_extra_mib=peak_mib, **{f"{s}_ms": t for s, t in times.items()},
                   ratio_pct=100 * times["total"] / dense_ms, graph_ratio_pct=100 * times["graph"] / dense_ms)
        log(f"  {name}: total {times['total']:.3f} ms ({row['ratio_pct']:.2f} % of dense) "
            + " ".join(f"{s}={t:.3f}" for s, t in times.items() if s != "total") + f" peak+{peak_mib:.0f} MiB")
        rows.append(row)
    return rows


def tile_sweep(shape: str, n: int, variants: list[str], tiles: list[str], gamma: float, rep_ms: int, log):
    """Selection time per kernel launch shape (recompiles per shape); the module defaults are restored."""
    hq, hkv, d = SHAPES[shape]
    q, k = make_qk(hq, hkv, d, n)
    saved = (fused.TILE_M, fused.TILE_N, fused.NUM_WARPS)
    rows = []
    try:
        for name in variants:
            config = variant_config(name, gamma)
            reference = selection.select_blocks_fused(q, k, config).to_mask()
            for tile in tiles:
                mn, warps = tile.split("w")
                fused.TILE_M, fused.TILE_N = map(int, mn.split("x"))
                fused.NUM_WARPS = int(warps)
                try:
                    stages = selection_stages(q, k, config)
                    same = bool(torch.equal(selection.select_blocks_fused(q, k, config).to_mask(), reference))
                    total, est = bench(stages["total"], rep_ms), bench(stages["estimate"], rep_ms)
                except Exception as err:  # a launch shape the compiler rejects: report, go on
                    log(f"  tiles {tile}: failed: {type(err).__name__}: {str(err)[:200]}")
                    continue
                log(f"  {shape} {n} {name} tiles {tile}: total {total:.3f} ms estimate {est:.3f} ms same={same}")
                rows.append(dict(shape=shape, n=n, variant=name, tiles=tile, total_ms=total, estimate_ms=est,
                                 same_layout=same))
    finally:
        fused.TILE_M, fused.TILE_N, fused.NUM_WARPS = saved
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama,qwen05b")
    parser.add_argument("--sizes", default="32768,65536,131072", help="lengths for the llama shape")
    parser.add_argument("--small-sizes", default="32768", help="lengths for the other shapes")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)} or fields written out, e.g. proxy_heads=q+stride=8")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--check-size", type=int, default=4096)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--tiles", default="64x64w4,64x64w8,128x64w4",
                        help="TILE_MxTILE_NwNUM_WARPS launch shapes swept at the longest length of each shape")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT")
    sink = open(Path(out_dir) / "bench_selection.jsonl", "w") if out_dir else None

    def log(msg):
        print(msg, flush=True)

    def emit(record):
        if sink:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

    props = torch.cuda.get_device_properties(0)
    emit(dict(device=props.name, torch=torch.__version__, time=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    log(f"{props.name}, torch {torch.__version__}")
    variants = args.variants.split(",")
    for shape in args.shapes.split(","):
        for name in variants:
            config = variant_config(name, args.gamma)
            try:
                check = check_correctness(shape, args.check_size, config)
            except Exception as err:  # report and go on to the timings
                traceback.print_exc()
                check = {"error": f"{type(err).__name__}: {err}"[:300]}
            emit(dict(kind="check", shape=shape, variant=name, n=args.check_size, **check))
            log(f"check {shape} {name} N={args.check_size}: {check}")
    rows = []
    for shape in args.shapes.split(","):
        sizes = args.sizes if shape == "llama" else args.small_sizes
        for n in map(int, sizes.split(",")):
            try:
                for row in time_shape(shape, n, variants, args.gamma, args.rep_ms, log):
                    emit(dict(kind="time", **row))
                    rows.append(row)
            except Exception:
                traceback.print_exc()
    sweep = []
    for shape in args.shapes.split(","):
        n = max(map(int, (args.sizes if shape == "llama" else args.small_sizes).split(",")))
        swept = [v for v in variants if v == "q-s16"]
        tiles = [t for t in args.tiles.split(",") if t]
        for row in tile_sweep(shape, n, swept, tiles, args.gamma, args.rep_ms, log) if tiles else []:
            emit(dict(kind="tiles", **row))
            sweep.append(row)
    print("\n| shape | N | variant | tiles | selection ms | estimate ms |")
    print("|---|---|---|---|---|---|")
    for r in sweep:
        print(f"| {r['shape']} | {r['n'] // 1024}K | {r['variant']} | {r['tiles']} | {r['total_ms']:.3f} | "
              f"{r['estimate_ms']:.3f} |")
    print("\n| shape | N | variant | cuDNN dense ms | selection ms | % of dense | as CUDA graph ms | % | estimate |"
          " last block | policy | density (random q/k) | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['n'] // 1024}K | {r['variant']} | {r['dense_ms']:.2f} | {r['total_ms']:.3f} | "
              f"{r['ratio_pct']:.2f} | {r['graph_ms']:.3f} | {r['graph_ratio_pct']:.2f} | {r['estimate_ms']:.3f} | "
              f"{r['last_block_ms']:.3f} | {r['policy_ms']:.3f} | {r['density']:.3f} | {r['peak_extra_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
