"""Benchmark the Triton block-sparse attention kernel against cuDNN / flash SDPA and flex_attention.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128, bf16, causal, one
layer). For each length and layout, times (median of `triton.testing.do_bench`) our kernel in each
requested launch variant, dense cuDNN and flash SDPA, and flex_attention given the same block mask
(full blocks below the diagonal, masked diagonal blocks). Reports effective TFLOP/s on the computed
blocks (density x dense causal FLOPs), time / cuDNN dense and time / (density x cuDNN dense), and
the bf16 error against the fp32 PyTorch reference (lengths up to --ref-max-len) or against flex.

    python bench/bench_kernel.py --check                     # correctness on the GPU, small shapes
    python bench/bench_kernel.py --sizes 32768 --densities 1,0.1,0.05 --variants default,tma:128x64:w8:s3
    python bench/bench_kernel.py --sizes 8192,32768,65536,131072 --baselines cudnn,flash,flex

Variants: "default" (the wrapper's own choice) or LOADS:BMxBN:wW:sS[:rR] with LOADS in
pointer/tma and R a per-thread register cap; "fp8/" before either runs the FP8 kernel
(attention_dtype="fp8"), whose K/V pre-pass is also timed alone ("fp8 prepass"), and whose --check
compares it with its PyTorch specification (kernels/fp8.py) as well as with exact attention.
`--compare-kernel FILE` also times another revision of the kernel module
(`git show REV:sparse_prefill/kernels/triton_attention.py > FILE`) as "before", so a change is measured
against its predecessor in one run on one card. Layouts are built on the GPU from block masks (no token masks).
Results go to stdout (a short table last) and, as JSON lines, to $OUT/bench_kernel.jsonl when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sparse_prefill.kernels import AttentionCall, fp8, triton_attention  # noqa: E402
from sparse_prefill.kernels.reference import block_sparse_attention_reference  # noqa: E402
from sparse_prefill.kernels.triton_attention import (  # noqa: E402
    KernelConfig,
    default_config,
    triton_block_sparse_attention,
)
from sparse_prefill.kernels.triton_fp8 import quantize_kv  # noqa: E402
from sparse_prefill.layout import BlockLayout, causal_block_limits  # noqa: E402

RESULTS: list[dict] = []


def log(record: dict) -> None:
    RESULTS.append(record)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_kernel.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def parse_variant(spec: str) -> KernelConfig | None:
    """'default' -> None (the wrapper picks); 'tma:128x64:w8:s3' -> KernelConfig (loads:tile:warps:stages),
    with an optional register cap: 'tma:128x64:w8:s2:r128'. An 'fp8/' prefix is the arithmetic (`dtype_of`)."""
    spec = spec.removeprefix("fp8/")
    if spec == "default":
        return None
    parts = spec.split(":")
    bm, bn = (int(x) for x in parts[1].split("x"))
    registers = int(parts[4][1:]) if len(parts) > 4 else None
    return KernelConfig(block_m=bm, block_n=bn, num_warps=int(parts[2][1:]), num_stages=int(parts[3][1:]),
                        kv_loads=parts[0], max_registers=registers)


def dtype_of(spec: str) -> str:
    """The variant's attention_dtype: 'fp8' for 'fp8/...', else 'auto'."""
    return "fp8" if spec.startswith("fp8/") else "auto"


def load_kernel_file(path: str):
    """`triton_block_sparse_attention` from another revision of kernels/triton_attention.py (e.g. saved
    with `git show REV:sparse_prefill/kernels/triton_attention.py > FILE`), to time before against after
    in one run on one card. It is loaded as a module of sparse_prefill.kernels, so its relative imports
    resolve to this checkout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sparse_prefill.kernels._compared_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.triton_block_sparse_attention


# -- layouts ---------------------------------------------------------------------------------------------


def causal_block_mask(n_blocks: int, device) -> torch.Tensor:
    limits = causal_block_limits(n_blocks, 1, n_blocks, n_blocks, device=device)
    return torch.arange(n_blocks, device=device)[None, :] < limits[:, None]


def make_layout(pattern: str, density: float, heads: int, n: int, block: int, seed: int, device) -> BlockLayout:
    """Block layout [1, heads, nb, nb] at about `density` of the causal blocks.

    random: sink column + diagonal + uniformly random blocks. structured: sink + a local window
    before the diagonal worth about half the budget + random blocks for the rest.
    """
    nb = -(-n // block)
    gen = torch.Generator(device=device).manual_seed(seed)
    causal = causal_block_mask(nb, device)
    rows = torch.arange(nb, device=device)[:, None]
    cols = torch.arange(nb, device=device)[None, :]
    forced = (cols == 0) | (cols == rows)
    if pattern == "structured":
        window = max(1, int(density * nb / 4))
        forced = forced | ((cols < rows) & (cols >= rows - window))
    forced = forced & causal
    total = causal.sum().item()
    need = max(density * total - forced.sum().item(), 0.0)
    p = min(1.0, need / max(total - forced.sum().item(), 1))
    rand = torch.rand(1, heads, nb, nb, generator=gen, device=device) < p
    mask = (rand | forced) & causal
    return BlockLayout.from_mask(mask, block, max_count=nb)


def flex_block_mask(layout: BlockLayout, n: int):
    """The same layout as a flex_attention BlockMask: full blocks below the diagonal, masked diagonal."""
    from torch.nn.attention.flex_attention import BlockMask

    mask = layout.to_mask()
    nb = mask.shape[-1]
    rows = torch.arange(nb, device=mask.device)[:, None]
    cols = torch.arange(nb, device=mask.device)[None, :]
    full = BlockLayout.from_mask(mask & (cols < rows), layout.block_size, max_count=nb)
    part = BlockLayout.from_mask(mask & (cols == rows), layout.block_size, max_count=nb)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(part.counts, part.indices.clamp_min(0), full.counts, full.indices.clamp_min(0),
                                    BLOCK_SIZE=layout.block_size, mask_mod=causal, seq_lengths=(n, n))


# -- helpers ---------------------------------------------------------------------------------------------


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float())
    return {"rel_l2": (diff.norm() / ref.float().norm().clamp_min(1e-30)).item(), "max_abs": diff.abs().max().item()}


def bench_ms(fn, n_tokens: int) -> float:
    import triton.testing

    rep = 400 if n_tokens >= 65536 else 200
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def dense_causal_flops(batch, heads, n, dim):
    return 4.0 * batch * heads * n * n / 2 * dim


# -- correctness on the GPU ------------------------------------------------------------------------------


CHECK_CASES = [  # (B, Hq, Hkv, Lq, Lk, D, block, dtype, key_range, strided)
    (1, 32, 8, 4096, 4096, 128, 128, torch.bfloat16, False, False),
    (1, 32, 8, 4096, 4096, 128, 128, torch.float16, False, False),
    (2, 8, 2, 1000, 3001, 128, 128, torch.bfloat16, True, True),
    (1, 8, 2, 2048, 2048, 64, 64, torch.bfloat16, False, False),
    (1, 8, 2, 1500, 2000, 80, 128, torch.bfloat16, False, True),
    (1, 8, 1, 2048, 2048, 96, 64, torch.bfloat16, True, False),
    (1, 8, 2, 2048, 2048, 256, 128, torch.bfloat16, False, False),
    (1, 14, 2, 777, 1900, 128, 64, torch.bfloat16, False, False),
]


def check(device, variants, cases=CHECK_CASES) -> bool:
    """bf16/fp16 outputs and lse of the kernel against the fp32 reference on small shapes (FP8 variants: also
    against their PyTorch specification). True when every case passes.

    The kernel's output buffers are poisoned with NaN first, so an unwritten element shows.
    """
    print("== correctness against the fp32 reference ==", flush=True)
    allocate = triton_attention._allocate_outputs

    def poisoned(q, return_lse):
        out, lse = allocate(q, return_lse)
        return out.fill_(float("nan")), lse.fill_(float("nan"))

    triton_attention._allocate_outputs = poisoned
    ok = True
    for b, hq, hkv, lq, lk, d, bs, dtype, with_range, strided in cases:
        gen = torch.Generator(device=device).manual_seed(lq + d)
        if strided:  # [B, L, H, D] storage seen as [B, H, L, D], like transformers
            q = torch.randn(b, lq, hq, d, device=device, generator=gen, dtype=dtype).transpose(1, 2)
            k = torch.randn(b, lk, hkv, d, device=device, generator=gen, dtype=dtype).transpose(1, 2)
            v = torch.randn(b, lk, hkv, d, device=device, generator=gen, dtype=dtype).transpose(1, 2)
        else:
            q = torch.randn(b, hq, lq, d, device=device, generator=gen, dtype=dtype)
            k = torch.randn(b, hkv, lk, d, device=device, generator=gen, dtype=dtype)
            v = torch.randn(b, hkv, lk, d, device=device, generator=gen, dtype=dtype)
        nq, nk = -(-lq // bs), -(-lk // bs)
        mask = torch.rand(b, hq, nq, nk, device=device, generator=gen) < 0.3
        mask[..., 0] = True
        layout = BlockLayout.from_mask(mask, bs, max_count=nk)
        key_range = torch.tensor([[5, lk], [0, lk - 300]][:b], device=device, dtype=torch.int32) if with_range else None
        ref, ref_lse = block_sparse_attention_reference(q, k, v, layout, return_lse=True, key_range=key_range)
        for spec in variants:
            config = parse_variant(spec)
            if config is not None and (bs % config.block_m or bs % config.block_n or (d > 128 and config.block_m > 64)):
                continue
            try:
                out, lse = triton_block_sparse_attention(q, k, v, layout, return_lse=True, key_range=key_range,
                                                         config=config, attention_dtype=dtype_of(spec))
                if q.is_cuda:
                    torch.cuda.synchronize()
            except Exception as exc:  # report and go on: one broken variant must not hide the others
                print(f"  {spec:24s} B{b} H{hq}/{hkv} L{lq}/{lk} D{d} bs{bs} {dtype}: FAILED {type(exc).__name__}: "
                      f"{str(exc)[:200]}", flush=True)
                ok = False
                continue
            err = errors(out, ref)
            seen = torch.isfinite(ref_lse)
            lse_err = (lse[seen] - ref_lse[seen]).abs().max().item()
            spec_err = ""
            if dtype_of(spec) == "fp8":  # e4m3's error against exact, no more than its specification's
                want = fp8.attend(AttentionCall(q, k, v, layout, return_lse=True, key_range=key_range))[0]
                err["vs_spec"], err["spec_rel_l2"] = errors(out, want)["rel_l2"], errors(want, ref)["rel_l2"]
                spec_err = f" vs spec {err['vs_spec']:.2e} (spec {err['spec_rel_l2']:.2e})"
                # tiles smaller than blocks (head_dim 256) scale per tile: further from the spec, as accurate
                good = (err["rel_l2"] <= 1.1 * err["spec_rel_l2"] + 1e-3 and err["vs_spec"] < 5e-2
                        and lse_err < 0.1)
            else:
                good = err["rel_l2"] < 1e-2 and lse_err < 1e-2
            good = (good and torch.equal(seen, torch.isfinite(lse)) and out.stride() == q.stride()
                    and not out.isnan().any().item())
            ok &= good
            print(f"  {spec:24s} B{b} H{hq}/{hkv} L{lq}/{lk} D{d} bs{bs} {str(dtype)[6:]:8s} range={with_range} "
                  f"strided={strided}: rel_l2 {err['rel_l2']:.2e}{spec_err} max_abs {err['max_abs']:.2e} "
                  f"lse {lse_err:.1e} "
                  f"{'ok' if good else 'BAD'}", flush=True)
            log({"kind": "check", "variant": spec, "shape": [b, hq, hkv, lq, lk, d, bs], "dtype": str(dtype),
                 "key_range": with_range, "strided": strided, **err, "lse_err": lse_err, "ok": bool(good)})
    triton_attention._allocate_outputs = allocate
    print(f"== correctness: {'all ok' if ok else 'FAILURES'} ==", flush=True)
    return ok


# -- timing ----------------------------------------------------------------------------------------------


def run_size(n, args, device, flex_compiled, deadline):
    b, hq, hkv, d, bs = 1, args.q_heads, args.kv_heads, args.head_dim, args.block_size
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(n)
    q = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, n, d, device=device, dtype=dtype, generator=gen)
    dense_flops = dense_causal_flops(b, hq, n, d)
    rows = []

    def record(impl, layout_name, density, ms, err=None, note=""):
        flops = dense_flops * density
        row = {"kind": "time", "n": n, "layout": layout_name, "density": density, "impl": impl, "ms": ms,
               "tflops": flops / ms / 1e9 if ms and flops else None, **(err or {}), "note": note,
               "device": torch.cuda.get_device_name(device)}
        rows.append(row)
        log(row)
        cudnn = next((r["ms"] for r in rows if r["impl"] == "cudnn" and r["ms"]), None)
        ratio = f"{ms / cudnn:6.3f}x cudnn  {ms / (density * cudnn):5.2f}x d*cudnn" if cudnn and ms and density else ""
        err_s = f"rel_l2 {err['rel_l2']:.1e}" if err else ""
        ms_s = f"{ms:9.3f} ms {row['tflops'] or 0:6.1f} TFLOP/s" if ms else "     failed"
        print(f"  N={n:6d} {layout_name:16s} d={density:5.3f} {impl:26s} {ms_s}  {ratio}  {err_s} {note}", flush=True)

    # dense baselines
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dense_ref = None
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        if name not in args.baselines:
            continue
        note = ""
        try:
            def fn(backend=backend):
                with sdpa_kernel(backend):
                    return sdpa(q, k, v, is_causal=True, enable_gqa=True)
            out = fn()
        except Exception:  # this backend refuses GQA here: give it repeated K/V (not timed)
            kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)

            def fn(backend=backend, kr=kr, vr=vr):
                with sdpa_kernel(backend):
                    return sdpa(q, kr, vr, is_causal=True)
            note = "repeated kv"
            try:
                out = fn()
            except Exception as exc:
                record(name, "dense", 1.0, None, note=f"failed: {str(exc)[:100]}")
                continue
        if dense_ref is None:
            dense_ref = out
        record(name, "dense", 1.0, bench_ms(fn, n), errors(out, dense_ref) if dense_ref is not out else None, note)
        del out

    layouts = [("dense(None)", 1.0, None)]
    for pattern in args.patterns:
        for density in args.densities:
            if density >= 1.0 and pattern != args.patterns[0]:
                continue
            layout = make_layout(pattern, density, hq, n, bs, seed=n + int(density * 1000), device=device)
            name = "full" if density >= 1.0 else pattern
            layouts.append((name, layout.density(), layout))

    for name, density, layout in layouts:
        if time.time() > deadline:
            print(f"  (time budget reached: skipping the rest of N={n})", flush=True)
            break
        ref = None
        if n <= args.ref_max_len and layout is not None:
            ref = block_sparse_attention_reference(q, k, v, layout)
        elif layout is None:
            ref = dense_ref
        flex_out = None
        if "flex" in args.baselines and layout is not None:
            try:
                block_mask = flex_block_mask(layout, n)

                def flex_fn(block_mask=block_mask):
                    return flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
                flex_out = flex_fn()
                record("flex", name, density, bench_ms(flex_fn, n), errors(flex_out, ref) if ref is not None else None)
                del block_mask
            except Exception as exc:
                record("flex", name, density, None, note=f"failed: {type(exc).__name__} {str(exc)[:150]}")
        runs = [("ours", triton_block_sparse_attention, spec) for spec in args.variants]
        if args.compare_kernel:
            runs += [("before", args.compare_kernel, spec) for spec in ("default", "fp8/default")
                     if spec in args.variants]
        for who, kernel, spec in runs:
            config = parse_variant(spec)
            layout_bs = 128 if layout is None else layout.block_size
            label = f"{who}:" + (spec if config is not None else
                                 "default(" + _describe(default_config(d, layout_bs, q)) + ")")
            label = ("fp8/" if dtype_of(spec) == "fp8" and config is None else "") + label

            kwargs = {"attention_dtype": "fp8"} if dtype_of(spec) == "fp8" else {}  # (a revision without FP8 fails)

            def timed(layout=layout, config=config, kernel=kernel, kwargs=kwargs):
                return kernel(q, k, v, layout, config=config, **kwargs)
            try:
                out = timed()
                torch.cuda.synchronize()
            except Exception as exc:
                record(label, name, density, None, note=f"failed: {type(exc).__name__} {str(exc)[:150]}")
                continue
            target = ref if ref is not None else flex_out
            err = errors(out, target) if target is not None else None
            if err is not None:
                err["vs"] = "reference" if ref is not None else "flex"
            del out
            record(label, name, density, bench_ms(timed, n), err)
        del ref, flex_out
        torch.cuda.empty_cache()
    if any(dtype_of(spec) == "fp8" for spec in args.variants):  # its share of every FP8 call: once per size
        record("fp8 prepass", "K and V", 0.0, bench_ms(lambda: quantize_kv(k, v, bs), n))
    return rows


def _describe(c: KernelConfig) -> str:
    cap = f":r{c.max_registers}" if c.max_registers else ""
    return f"{c.kv_loads}:{c.block_m}x{c.block_n}:w{c.num_warps}:s{c.num_stages}{cap}"


def compiled_resources():
    """Registers, spills and shared memory of every kernel variant compiled in this process."""
    lines = []
    try:
        for cache in triton_attention._block_sparse_attention_kernel.device_caches.values():
            for kernel in cache[0].values():
                c = kernel.metadata
                consts = getattr(getattr(kernel, "src", None), "constants", "")
                lines.append(f"  warps {c.num_warps} stages {c.num_stages} regs {kernel.n_regs} spills "
                             f"{kernel.n_spills} shared {c.shared} | {consts}")
    except Exception as exc:  # introspection differs between Triton versions
        lines.append(f"  (no resource report: {type(exc).__name__} {exc})")
    return lines


def summary(rows):
    print("\n== summary (ms; ratio = time / (density x cuDNN dense time); fp8 rows: bf16 default's time / theirs) ==")
    by_n = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r)
    for n, rs in by_n.items():
        cudnn = next((r["ms"] for r in rs if r["impl"] == "cudnn" and r["ms"]), None)
        for r in rs:
            if not r["ms"]:
                continue
            ratio = f"{r['ms'] / (r['density'] * cudnn):5.2f}" if cudnn and r["density"] else "  -  "
            err = f"{r['rel_l2']:.1e}" if r.get("rel_l2") is not None else "   -   "
            bf16 = next((x["ms"] for x in rs if x["impl"].startswith("ours:default") and x["ms"]
                         and x["layout"] == r["layout"] and x["density"] == r["density"]), None)
            gain = f"{bf16 / r['ms']:5.2f}x" if bf16 and "fp8/" in r["impl"] else ""
            print(f"{n:6d} | {r['layout']:11s} | {r['density']:5.3f} | {r['impl'][:42]:42s} | {r['ms']:9.3f} | "
                  f"{r['tflops'] or 0:6.1f} | {ratio} | {err} {gain}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness on small shapes first")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--sizes", default="8192,32768", help="comma-separated sequence lengths")
    parser.add_argument("--densities", default="1,0.3,0.1,0.05")
    parser.add_argument("--patterns", default="random,structured")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--check-variants", default="default")
    parser.add_argument("--compare-kernel", default=None, metavar="FILE",
                        help="also time another revision of kernels/triton_attention.py (its default launch "
                             "shape), reported as 'before'")
    parser.add_argument("--baselines", default="cudnn,flash,flex")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--block-size", type=int, default=128, choices=[64, 128], help="layout block size")
    parser.add_argument("--ref-max-len", type=int, default=32768, help="longest N checked against the reference")
    parser.add_argument("--time-budget", type=float, default=450.0, help="seconds; later measurements are skipped")
    args = parser.parse_args()
    args.densities = [float(x) for x in args.densities.split(",")]
    args.patterns = args.patterns.split(",")
    args.variants = args.variants.split(",")
    args.baselines = args.baselines.split(",") if args.baselines else []
    if args.compare_kernel:
        args.compare_kernel = load_kernel_file(args.compare_kernel)
    start = time.time()
    deadline = start + args.time_budget
    device = torch.device("cuda")
    import triton

    print(f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.check or args.check_only:
        check(device, args.check_variants.split(","))
        if args.check_only:
            return
    flex_compiled = None
    if "flex" in args.baselines:
        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention, dynamic=False)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        if time.time() > deadline:
            print(f"(time budget reached: skipping N={n})")
            continue
        rows += run_size(n, args, device, flex_compiled, deadline)
    print("\n== compiled kernels ==")
    print("\n".join(compiled_resources()))
    summary(rows)
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
