"""The Triton FP8 kernel compiled, on a Hopper GPU (compute capability 9.0 or newer): bf16 inputs as models give
them, both K/V load paths, against its PyTorch specification (kernels/fp8.py) run on the same GPU. Without such a
GPU every test here is skipped: test_fp8_kernel.py checks the same kernel through the interpreter on any machine.

    python -m pytest tests/test_fp8_gpu.py -q
"""

import pytest
import torch

from sparse_prefill import SparsePrefillConfig, sparse_attention
from sparse_prefill.kernels import AttentionCall, block_sparse_attention, fp8, reference, triton_fp8
from sparse_prefill.kernels import triton_attention as ta
from sparse_prefill.kernels.triton_attention import KernelConfig
from sparse_prefill.layout import BlockLayout

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a CUDA GPU of compute capability 9.0 (Hopper) or newer")


def relative_error(out, exact):
    return ((out.double() - exact.double()).norm() / exact.double().norm()).item()


def inputs(q_heads=32, kv_heads=8, q_len=4096, k_len=4096, dim=128, seed=0, offset=2.0):
    """bf16 q, k, v on the GPU; keys with a per-(head, channel) offset, as trained models' keys have."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, q_heads, q_len, dim, device="cuda", generator=g)
    k = torch.randn(1, kv_heads, k_len, dim, device="cuda", generator=g)
    k = k + offset * torch.randn(1, kv_heads, 1, dim, device="cuda", generator=g)
    v = torch.randn(1, kv_heads, k_len, dim, device="cuda", generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def layout_of(heads, q_len, k_len, block_size, density=0.3, seed=1):
    n_q, n_k = -(-q_len // block_size), -(-k_len // block_size)
    g = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(1, heads, n_q, n_k, device="cuda", generator=g) < density
    mask[..., 0] = True
    mask |= torch.arange(n_k, device="cuda")[None, :] == torch.arange(n_q, device="cuda")[:, None] + (n_k - n_q)
    return BlockLayout.from_mask(mask, block_size)


def test_the_prepass_rounds_as_torch_does():
    """The GPU's fp32 -> e4m3 conversion in the pre-pass is torch's. Not bit for bit here: torch on CUDA divides
    by a Python number as a multiplication by its reciprocal (the scales then differ in the last bit), and sums
    the mean in another order; a rare element then rounds the other way."""
    _, k, v = inputs(k_len=3001)
    for key_range in (None, torch.tensor([[7, 2990]], device="cuda")):
        got = triton_fp8.quantize_kv(k, v, 128, key_range)
        mean = fp8.key_mean(k, key_range)
        want_k, want_v = fp8.quantize_blocks(k.float() - mean, 128), fp8.quantize_blocks(v, 128)
        torch.testing.assert_close(got.k_scale, want_k.scale, rtol=3e-7, atol=0)
        torch.testing.assert_close(got.v_scale, want_v.scale, rtol=3e-7, atol=0)
        for data, want in ((got.k, want_k.data), (got.v, want_v.data)):
            assert (data.float() != want.float()).float().mean() < 1e-3
            torch.testing.assert_close(data.float(), want.float(), rtol=2.0 ** -3, atol=2.0 ** -9)  # one step


@pytest.mark.parametrize("loads", ["tma", "pointer"])
@pytest.mark.parametrize("options", [{}, {"return_lse": True}, {"softcap": 30.0},
                                     {"key_range": "padded", "return_lse": True}])
def test_the_compiled_kernel_is_its_specification(loads, options):
    q, k, v = inputs()
    options = dict(options)
    if options.get("key_range") == "padded":
        options["key_range"] = torch.tensor([[100, 4096]], device="cuda")
    call = AttentionCall(q, k, v, layout_of(32, 4096, 4096, 128), **options)
    config = KernelConfig(kv_loads=loads)
    got = ta.attend(call, config, attention_dtype="fp8")
    want = fp8.attend(call)
    exact = reference.attend(call)
    if call.return_lse:
        (got, lse), (want, want_lse), (exact, _) = got, want, exact
        finite = want_lse.isfinite()
        assert torch.equal(lse.isfinite(), finite)
        assert (lse[finite] - want_lse[finite]).abs().max() < 5e-2
    # Hopper's FP8 products accumulate in fewer bits than fp32 (~1e-4 of each score, measured), and then some of
    # P's e4m3 roundings fall the other way: 4-8e-3 from the specification, where FP8 itself costs ~5e-2
    assert relative_error(got, want) < 2e-2
    assert relative_error(got, exact) < 1.1 * relative_error(want, exact) + 1e-3  # no less accurate than its spec


@pytest.mark.parametrize("dim,block_size", [(64, 64), (80, 128), (256, 128)])
def test_head_dims_and_block_sizes(dim, block_size):
    q, k, v = inputs(q_heads=8, kv_heads=2, q_len=1500, k_len=2000, dim=dim)
    call = AttentionCall(q, k, v, layout_of(8, 1500, 2000, block_size))
    got = ta.attend(call, None, attention_dtype="fp8")
    want = fp8.attend(call)
    exact = reference.attend(call)
    assert relative_error(got, want) < 5e-2  # tiles smaller than blocks at head_dim 256: scaled per tile
    assert relative_error(got, exact) < 1.1 * relative_error(want, exact) + 1e-3


def test_through_the_dispatch_and_the_config():
    """attention_dtype="fp8" on a Hopper GPU runs this kernel, and gamma=1 is its every-causal-block control."""
    q, k, v = inputs(q_len=2048, k_len=2048)
    want = fp8.attend(AttentionCall(q, k, v))
    assert relative_error(block_sparse_attention(q, k, v, None, attention_dtype="fp8"), want) < 2e-2
    config = SparsePrefillConfig(gamma=1.0, attention_dtype="fp8")
    assert relative_error(sparse_attention(q, k, v, config), want) < 2e-2
