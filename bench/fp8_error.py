"""What FP8 attention costs in error, against float64 exact attention over the same layout (CPU, seconds).

For each input (tests/structured_attention.py builds them; bf16, as a model hands them over) it prints the
relative error |out - exact| / |exact| of:

  bf16            the reference on the bf16 inputs, output in bf16 (what attention_dtype="auto" computes,
                  less the Triton kernel's rounding of P to bf16)
  fp8             attention_dtype="fp8": Q, K (smoothed), P (scaled per row and key block) and V in e4m3
  fp8 QK only     the second product at the inputs' precision (`quantize_pv=False`)
  fp8 no smooth   K quantised without subtracting its mean (and so, with the second product unquantised)
  fp8 fixed P     P scaled by 448 for all rows and blocks (FlashAttention-3's), not per (row, key block)

over every causal block (dense) and over the blocks a selection keeps (gamma 0.9 without the exact tail and the
question columns, so that the flat heads do not keep every block). The GPU kernel, once
written, is checked against the `fp8` column's reference, not against these numbers.

    python bench/fp8_error.py                   # the table of docs/kernel.md, "FP8 attention"
    python bench/fp8_error.py --length 8192 --head-dim 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from structured_attention import exact_attention, sink_row, structured_qk, with_key_offset  # noqa: E402

from sparse_prefill import SparsePrefillConfig, select_blocks  # noqa: E402
from sparse_prefill.kernels import AttentionCall, fp8, reference  # noqa: E402

VARIANTS = {
    "fp8": {},
    "fp8 QK only": {"quantize_pv": False},
    "fp8 no smooth": {"smooth_k": False},
    "fp8 QK only, no smooth": {"quantize_pv": False, "smooth_k": False},
    "fp8 fixed P": {"p_scale": "fixed"},
}


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).norm() / exact.norm()).item()


def errors(q, k, v, layout) -> dict[str, float]:
    """Each variant's relative error on bf16-rounded q, k, v over `layout` (None: every causal block)."""
    q, k, v = (x.bfloat16() for x in (q, k, v))
    exact = exact_attention(q, k, v, layout)
    call = AttentionCall(q, k, v, layout)
    row = {"bf16": relative_error(reference.attend(call), exact)}
    for name, options in VARIANTS.items():
        row[name] = relative_error(fp8.attend(call, **options), exact)
    return row


def inputs(length: int, head_dim: int):
    """(name, q, k, v) of each input the table measures."""
    q, k = structured_qk(q_heads=4, kv_heads=2, q_len=length, k_len=length, dim=head_dim)
    v = torch.randn(1, 2, length, head_dim, generator=torch.Generator().manual_seed(7))
    yield "structured", q, k, v
    yield "structured + key offset", q, with_key_offset(k), v
    long = 16 * length
    q, k = sink_row(long, dim=head_dim, gap=13.5)  # each other key ~1.4e-6 of the sink, 9 % of the mass together
    yield f"{long // 1024}K keys behind a sink (last 128 rows)", q, k, torch.randn(1, 1, long, head_dim)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096, help="queries and keys of the structured inputs "
                        "(the sink row has 16x as many keys) (default %(default)s)")
    parser.add_argument("--head-dim", type=int, default=128, help="(default %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = SparsePrefillConfig(backend="torch", gamma=0.9, exact_tail_tokens=0, question_blocks=0,
                                 min_budget_tokens=512)
    columns = ["bf16", *VARIANTS]
    print(f"relative error against float64 exact attention, head_dim {args.head_dim}, block 128")
    print("| input | blocks | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, q, k, v in inputs(args.length, args.head_dim):
        layouts = {"every causal": None}
        if q.shape[2] == k.shape[2]:
            layout = select_blocks(q.bfloat16(), k.bfloat16(), config)
            layouts[f"selected ({layout.density():.0%})"] = layout
        for kind, layout in layouts.items():
            row = errors(q, k, v, layout)
            print(f"| {name} | {kind} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
