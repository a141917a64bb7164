"""The Triton FP8 kernel (`triton_attention.attend(..., attention_dtype="fp8")`) against its specification,
`fp8.attend`, through TRITON_INTERPRET=1 (the interpreter gets bfloat16 wrong: fp32 and fp16 here, bf16 on the
GPU in test_fp8_gpu.py).

Where the kernel's tiles are the layout's blocks (block_m = block_n = block_size) it computes what the reference
does up to fp32 rounding: a few e4m3 roundings may fall the other way, so the bound is 2e-4 relative, 300 times
tighter than FP8's own error (0.06 here). Where tiles are smaller than blocks, the kernel scales Q and P per tile
and the reference per block: the two then differ by e4m3 rounding, and their errors against exact attention
agree. Every output is poisoned with NaN first, so an element the kernel forgets to write fails.
"""

import pytest
import torch
from structured_attention import structured_qk, with_key_offset

from sparse_prefill.kernels import AttentionCall, fp8, reference, triton_fp8
from sparse_prefill.kernels import triton_attention as ta
from sparse_prefill.kernels.triton_attention import KernelConfig
from sparse_prefill.layout import BlockLayout

TILES_ARE_BLOCKS = 2e-4


def relative_error(out, exact):
    return ((out.double() - exact.double()).norm() / exact.double().norm()).item()


pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")  # conftest.py: unwritten elements cannot pass


def inputs(q_heads=4, kv_heads=2, q_len=512, k_len=512, dim=64, dtype=torch.float32, seed=0):
    """A trained model's structure (sharp and flat heads), keys with a per-channel offset (what smoothing is for)."""
    q, k = structured_qk(q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, k_len=k_len, dim=dim, seed=seed)
    v = torch.randn(1, kv_heads, k_len, dim, generator=torch.Generator().manual_seed(seed + 7))
    return q.to(dtype), with_key_offset(k.float()).to(dtype), v.to(dtype)


def random_layout(heads, q_len, k_len, block_size, seed=3):
    """About half the causal blocks, always the sink and the diagonal; one row keeps nothing."""
    n_q, n_k = -(-q_len // block_size), -(-k_len // block_size)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, heads, n_q, n_k, generator=g) < 0.5
    diagonal = torch.arange(n_q)[:, None] + (n_k - n_q)
    mask |= torch.arange(n_k)[None, :] == diagonal
    mask[..., 0] = True
    mask[0, 0, n_q // 2] = False
    return BlockLayout.from_mask(mask, block_size)


def both(call, config):
    got = ta.attend(call, config, attention_dtype="fp8")
    want = fp8.attend(call)
    if call.return_lse:
        (got, lse), (want, want_lse) = got, want
        assert not lse.isnan().any(), "the kernel left lse elements unwritten"
        assert torch.equal(lse.isinf(), want_lse.isinf())
        finite = want_lse.isfinite()
        torch.testing.assert_close(lse[finite], want_lse[finite], atol=2e-3, rtol=0)
    assert not got.isnan().any(), "the kernel left elements unwritten"
    assert got.shape == call.q.shape and got.dtype == call.q.dtype
    return got, want


# -- the pre-pass --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("length,dim,block_size", [(300, 64, 128), (256, 80, 64)])
def test_the_prepass_is_quantize_blocks_bit_for_bit(dtype, length, dim, block_size):
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(2, 3, length, dim, generator=g) * 3 + torch.randn(1, 3, 1, dim, generator=g) * 5).to(dtype)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # strides as a model's projections give them
    v = torch.randn(2, 3, length, dim, generator=g).to(dtype)
    for key_range in (None, torch.tensor([[5, length], [0, length - 7]])):
        got = triton_fp8.quantize_kv(k, v, block_size, key_range)
        mean = fp8.key_mean(k, key_range)
        want_k, want_v = fp8.quantize_blocks(k.float() - mean, block_size), fp8.quantize_blocks(v, block_size)
        torch.testing.assert_close(got.k_mean, mean.squeeze(2), atol=1e-6, rtol=1e-6)
        assert torch.equal(got.k_scale, want_k.scale) and torch.equal(got.k.float(), want_k.data.float())
        assert torch.equal(got.v_scale, want_v.scale) and torch.equal(got.v.float(), want_v.data.float())
        assert got.v.stride()[-2:] == (1, -(-length // 16) * 16)  # keys contiguous: [D, L] underneath


def test_the_kernels_rounding_is_the_gpus_not_the_interpreters():
    """Under the interpreter the kernel rounds onto e4m3's grid first (to_e4m3); without that, 100 -> 104."""
    x = torch.tensor([100.0, 0.001, -500.0, 3 * 2.0 ** -10, 447.0, 0.0, 17.0, -0.3] * 8)
    q8, _ = triton_fp8.quantize(x.view(1, 1, 8, 8).transpose(-1, -2).contiguous().transpose(-1, -2), 64)
    scale = x.abs().max() / 448
    assert torch.equal(q8.float().flatten().sort().values,
                       (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float().sort().values)


# -- the attention kernel ------------------------------------------------------------------------------------------

CASES = {
    "plain": {},
    "lse": {"return_lse": True},
    "softcap": {"softcap": 20.0, "return_lse": True},
    "key range": {"key_range": torch.tensor([[40, 500]]), "return_lse": True},
    "scale, not causal": {"scale": 0.07, "causal": False},
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_fp8_kernel_is_the_fp8_reference(case):
    q, k, v = inputs()
    call = AttentionCall(q, k, v, random_layout(4, 512, 512, 64), **CASES[case])
    got, want = both(call, KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2))
    assert relative_error(got, want) < TILES_ARE_BLOCKS
    exact = reference.attend(call)
    exact = exact[0] if call.return_lse else exact
    assert relative_error(got, exact) > 0.01  # it is FP8: e4m3's error, not the inputs' precision


@pytest.mark.parametrize("dim,group", [(128, 4), (80, 1)])
def test_fp16_gqa_head_dims_and_query_offsets(dim, group):
    """No layout (every causal block), the queries the last 384 of 640 keys, the default launch shape."""
    q, k, v = inputs(q_heads=2 * group, kv_heads=2, q_len=384, k_len=640, dim=dim, dtype=torch.float16)
    got, want = both(AttentionCall(q, k, v, None), None)
    assert relative_error(got, want) < 2e-3  # fp16's rounding of the output on top


def test_tiles_smaller_than_blocks_round_per_tile():
    """block_size 128, tiles of 64: Q and P are scaled per tile, not per block; it costs no accuracy."""
    q, k, v = inputs()
    call = AttentionCall(q, k, v, random_layout(4, 512, 512, 128))
    got, want = both(call, KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2))
    exact = reference.attend(call)
    assert TILES_ARE_BLOCKS < relative_error(got, want) < 0.05
    assert relative_error(got, exact) < 1.2 * relative_error(want, exact)
