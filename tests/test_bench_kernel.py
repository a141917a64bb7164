"""bench/bench_kernel.py's correctness check on a CPU (the kernels through the interpreter), small shapes: the GPU
run must not fail on a typo, and its verdict must be able to say no."""

from pathlib import Path

import pytest
import torch
from model_zoo import load_script

ROOT = Path(__file__).resolve().parents[1]
# (B, Hq, Hkv, Lq, Lk, D, block, dtype, key_range, strided): fp16 (the interpreter gets bf16 wrong)
CASES = [(1, 4, 2, 256, 384, 64, 64, torch.float16, False, False),
         (2, 2, 1, 200, 400, 64, 64, torch.float16, True, True)]
VARIANTS = ["pointer:64x64:w4:s2", "fp8/pointer:64x64:w4:s2"]


@pytest.fixture(scope="module")
def bench():
    return load_script(ROOT / "bench" / "bench_kernel.py")


def test_the_check_passes_the_bf16_and_fp8_kernels(bench, capsys):
    assert bench.check(torch.device("cpu"), VARIANTS, cases=CASES)
    out = capsys.readouterr().out
    assert sum(line.endswith(" ok") for line in out.splitlines()) == 4  # two cases, two variants
    assert "vs spec" in out and "correctness: all ok" in out


def test_the_check_fails_a_kernel_that_is_not_its_specification(bench, monkeypatch, capsys):
    """An FP8 variant that computed bf16 attention would be more accurate than FP8, and still not its kernel."""
    real = bench.triton_block_sparse_attention

    def not_fp8(*args, attention_dtype="auto", **kwargs):
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "triton_block_sparse_attention", not_fp8)
    assert not bench.check(torch.device("cpu"), VARIANTS[1:], cases=CASES[:1])
    assert "BAD" in capsys.readouterr().out
