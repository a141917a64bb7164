"""One block-sparse attention launch to profile, e.g. under Nsight Compute's stall sampling.

Runs the kernel `--warmup` times (compile, caches) and then `--launches` more on one random layout
(bench_kernel.py's `make_layout`), Llama-3.1-8B attention shape by default. A profiler is pointed at it
from outside, skipping the warm-up launches:

    ncu --clock-control none -k regex:_block_sparse_attention_kernel -s 3 -c 1 \
        --section WarpStateStats --section SchedulerStats --section Occupancy --section SpeedOfLight \
        python3 bench/profile_kernel.py --n 32768 --density 0.05

Without a profiler it prints the median time of the launches, which is enough to tell whether the
profiled launch was representative. `--variant` takes a launch shape as bench_kernel.py does, and
`--kernel-file` profiles another revision of the kernel module (before/after comparisons).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import load_kernel_file, make_layout, parse_variant  # noqa: E402

from sparse_prefill.kernels.triton_attention import triton_block_sparse_attention  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--pattern", default="random", choices=("random", "structured"))
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--launches", type=int, default=3)
    p.add_argument("--variant", default="default", help="launch shape as in bench_kernel.py --variants")
    p.add_argument("--kernel-file", default=None,
                   help="profile another revision of kernels/triton_attention.py (bench_kernel.py --compare-kernel)")
    args = p.parse_args()
    kernel = load_kernel_file(args.kernel_file) if args.kernel_file else triton_block_sparse_attention
    config = parse_variant(args.variant)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, args.q_heads, args.n, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, args.kv_heads, args.n, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    layout = make_layout(args.pattern, args.density, args.q_heads, args.n, 128, 0, "cuda")
    for _ in range(args.warmup):
        kernel(q, k, v, layout, config=config)
    times = []
    for _ in range(args.launches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel(q, k, v, layout, config=config)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    print(f"N={args.n} density={layout.density(args.n, args.n):.3f} programs={layout.counts.numel()} "
          f"median {statistics.median(times):.3f} ms over {args.launches} launches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
