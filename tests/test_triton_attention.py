"""The Triton block-sparse kernel against the PyTorch reference (CPU, through TRITON_INTERPRET=1).

The interpreter gets bfloat16 wrong, so these run float16 and float32; bf16 and speed are checked on
the GPU by bench/bench_kernel.py. Every output is poisoned with NaN before the kernel runs, so an
element the kernel forgets to write fails the comparison.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_prefill.kernels import block_sparse_attention
from sparse_prefill.kernels import triton_attention as ta
from sparse_prefill.kernels.reference import block_sparse_attention_reference
from sparse_prefill.layout import BlockLayout

TOL = {torch.float16: 2e-3, torch.float32: 2e-5}


pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")  # conftest.py: unwritten elements cannot pass


def random_layout(batch, heads, n_q, n_k, density, block_size, gen, max_count=None, empty_and_full_rows=True):
    """Random kept blocks (also above the diagonal: the kernel must mask those), with empty and full rows."""
    mask = torch.rand(batch, heads, n_q, n_k, generator=gen) < density
    if empty_and_full_rows:
        mask[0, 0, -1] = False  # a row that keeps nothing
        mask[-1, -1, n_q // 2] = True  # a row that keeps everything
    return BlockLayout.from_mask(mask, block_size, max_count=max_count)


def make_qkv(batch, q_heads, kv_heads, q_len, k_len, dim, dtype, gen):
    q = torch.randn(batch, q_heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=gen).to(dtype)
    return q, k, v


def assert_matches_reference(q, k, v, layout, dtype=None, **kwargs):
    out, lse = ta.triton_block_sparse_attention(q, k, v, layout, return_lse=True, **kwargs)
    kwargs.pop("config", None)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, layout, return_lse=True, **kwargs)
    tol = TOL[q.dtype]
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == q.stride()
    assert not out.isnan().any() and not lse.isnan().any(), "the kernel left elements unwritten"
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows that see no key must get lse -inf"
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=1e-4, rtol=1e-5)
    assert (out[~seen] == 0).all(), "rows that see no key must get a zero output"
    return out, lse


@pytest.mark.parametrize("dim", [64, 80, 96, 128, 256])
def test_each_head_dim(dim):
    gen = torch.Generator().manual_seed(dim)
    q, k, v = make_qkv(1, 4, 2, 150, 150, dim, torch.float16, gen)
    assert_matches_reference(q, k, v, random_layout(1, 4, 3, 3, 0.6, 64, gen))


@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])
def test_gqa_ratios(group):
    gen = torch.Generator().manual_seed(100 + group)
    kv_heads = 2 if group <= 2 else 1
    q, k, v = make_qkv(1, kv_heads * group, kv_heads, 100, 170, 64, torch.float16, gen)
    assert_matches_reference(q, k, v, random_layout(1, kv_heads * group, 2, 3, 0.5, 64, gen))


@pytest.mark.parametrize(
    "q_len,k_len,block_size",
    [(1, 1, 64), (1, 190, 64), (37, 200, 64), (64, 191, 64), (66, 192, 64), (130, 130, 64), (100, 257, 128),
     (129, 129, 128)],
)
def test_query_offsets_and_odd_lengths(q_len, k_len, block_size):
    gen = torch.Generator().manual_seed(q_len * 1000 + k_len)
    q, k, v = make_qkv(1, 2, 1, q_len, k_len, 64, torch.float16, gen)
    n_q, n_k = -(-q_len // block_size), -(-k_len // block_size)
    layout = random_layout(1, 2, n_q, n_k, 0.7, block_size, gen, empty_and_full_rows=False)
    assert_matches_reference(q, k, v, layout)


def test_batch_of_two_with_key_ranges():
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(2, 4, 2, 140, 200, 64, torch.float16, gen)
    layout = random_layout(2, 4, 3, 4, 0.6, 64, gen)
    # row 0: left padding that ends mid-block (early queries see nothing); row 1: right padding
    assert_matches_reference(q, k, v, layout, key_range=torch.tensor([[70, 200], [0, 150]], dtype=torch.int32))
    # an empty range: every row sees nothing
    assert_matches_reference(q, k, v, layout, key_range=torch.tensor([[0, 200], [90, 90]]))


def test_softcap_scale_and_non_causal():
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 1, 150, 150, 64, torch.float16, gen)
    layout = random_layout(1, 2, 3, 3, 0.6, 64, gen)
    assert_matches_reference(q, k, v, layout, softcap=3.0, scale=0.3)
    assert_matches_reference(q, k, v, layout, causal=False)


def test_dense_layout_none_and_float32():
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 1, 70, 200, 80, torch.float32, gen)
    assert_matches_reference(q, k, v, None)  # block size 128 for the whole causal triangle
    assert_matches_reference(q, k, v, None, causal=False)


def test_lse_is_logsumexp_of_the_kept_scores():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 2, 2, 100, 160, 64, torch.float32, gen)
    layout = random_layout(1, 2, 2, 3, 0.5, 64, gen)
    _, lse = ta.triton_block_sparse_attention(q, k, v, layout, return_lse=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(64)
    keep = layout.to_mask().repeat_interleave(64, -2)[:, :, :100].repeat_interleave(64, -1)[..., :160]
    keep &= torch.arange(160) <= torch.arange(100)[:, None] + 60
    expected = scores.masked_fill(~keep, -math.inf).logsumexp(-1)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-5)


def test_transposed_views_keep_their_layout():
    """transformers hands q/k/v over as [B, H, L, D] views of [B, L, H, D] tensors."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 130, 4, 64, generator=gen).half().transpose(1, 2)
    k = torch.randn(1, 130, 2, 64, generator=gen).half().transpose(1, 2)
    v = torch.randn(1, 130, 2, 64, generator=gen).half().transpose(1, 2)
    out, _ = assert_matches_reference(q, k, v, random_layout(1, 4, 3, 3, 0.6, 64, gen))
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    "config",
    [
        ta.KernelConfig(block_m=64, block_n=32, num_warps=4, kv_loads="pointer"),
        ta.KernelConfig(block_m=128, block_n=64, num_warps=8, kv_loads="tma"),
        ta.KernelConfig(block_m=64, block_n=128, num_warps=4, kv_loads="tma"),
        ta.KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=2, kv_loads="tma", max_registers=128),
    ],
    ids=["pointer-64x32", "tma-128x64", "tma-64x128", "tma-128x64-capped-registers"],
)
def test_launch_shapes_and_load_paths(config):
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(1, 2, 1, 200, 300, 80, torch.float16, gen)
    layout = random_layout(1, 2, 2, 3, 0.6, 128, gen)
    assert_matches_reference(q, k, v, layout, config=config, key_range=torch.tensor([[30, 280]]))


def test_reads_only_counted_indices():
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(1, 2, 1, 192, 192, 64, torch.float16, gen)
    layout = random_layout(1, 2, 3, 3, 0.5, 64, gen, max_count=3)
    slot = torch.arange(3)
    garbage = torch.where(slot < layout.counts[..., None], layout.indices, torch.full_like(layout.indices, 10**6))
    wide = BlockLayout(layout.counts, garbage, 64, 3, canonical=True)  # canonical: the kernel sees it as is
    assert_matches_reference(q, k, v, wide)
    column_major = garbage.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride != 1
    assert_matches_reference(q, k, v, BlockLayout(layout.counts, column_major, 64, 3, canonical=True))


@pytest.mark.parametrize("seed", range(4))
def test_hand_built_rows_in_any_order_with_repeats_give_the_reference_output(seed):
    """A row [1, 0] used to run its diagonal block unmasked (non-causal output); rows are sets of blocks."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(1, 2, 1, 256, 256, 64, torch.float16, gen)
    n = 4
    causal = torch.arange(n)[None] <= torch.arange(n)[:, None]
    rows = []
    for _ in range(2 * n):
        kept = torch.nonzero(causal[len(rows) % n] & (torch.rand(n, generator=gen) < 0.7)).flatten()
        kept = torch.cat([kept, kept[torch.randint(len(kept), (2,), generator=gen)]]) if len(kept) else kept
        rows.append(kept[torch.randperm(len(kept), generator=gen)])  # shuffled, with repeats
    width = max(len(r) for r in rows) + 1
    indices = torch.full((2 * n, width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        indices[i, :len(r)] = r.int()
    indices[0, -1] = 99  # out of range past a short row's count: ignored
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    layout = BlockLayout(counts.reshape(1, 2, n), indices.reshape(1, 2, n, width), 64, n)
    assert (layout.indices[..., 1:] > layout.indices[..., :-1]).logical_or(layout.indices[..., 1:] == -1).all()
    sets = BlockLayout.from_mask(torch.zeros(1, 2, n, n, dtype=torch.bool), 64)  # the same rows as sets
    mask = sets.to_mask()
    for i, r in enumerate(rows):
        mask[0, i // n, i % n, r.long()] = True
    assert torch.equal(layout.to_mask(), mask)
    out = ta.triton_block_sparse_attention(q, k, v, layout)
    ref = block_sparse_attention_reference(q, k, v, BlockLayout.from_mask(mask, 64))
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[q.dtype], rtol=TOL[q.dtype])


def test_a_reversed_diagonal_row_stays_causal():
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 1, 1, 128, 128, 64, torch.float32, gen)
    layout = BlockLayout(torch.tensor([[[1, 2]]], dtype=torch.int32), torch.tensor([[[[0, -1], [1, 0]]]],
                         dtype=torch.int32), 64, 2)
    causal = block_sparse_attention_reference(q, k, v, None)
    torch.testing.assert_close(ta.triton_block_sparse_attention(q, k, v, layout), causal, atol=2e-5, rtol=2e-5)


def test_unsupported_inputs_raise_value_errors():
    q, k, v = make_qkv(1, 2, 1, 64, 64, 64, torch.float16, torch.Generator().manual_seed(0))
    layout = random_layout(1, 2, 1, 1, 1.0, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="head_dim"):
        ta.triton_block_sparse_attention(q[..., :32], k[..., :32], v[..., :32], None)
    with pytest.raises(ValueError, match="dtype"):
        ta.triton_block_sparse_attention(q.double(), k.double(), v.double(), None)
    with pytest.raises(ValueError, match="the Triton kernel takes block_size"):
        ta.triton_block_sparse_attention(q, k, v, BlockLayout.from_mask(torch.ones(1, 2, 2, 2, dtype=torch.bool), 32))
    with pytest.raises(ValueError, match="does not fit"):
        ta.triton_block_sparse_attention(q[:, :1], k, v, layout)
    with pytest.raises(ValueError, match="key_range"):
        ta.triton_block_sparse_attention(q, k, v, layout, key_range=torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="block_m and block_n must divide"):
        ta.triton_block_sparse_attention(q, k, v, layout, config=ta.KernelConfig(block_m=128))


def test_dispatcher_keeps_cpu_on_the_reference():
    q, k, v = make_qkv(1, 2, 1, 64, 64, 64, torch.float16, torch.Generator().manual_seed(1))
    ref = block_sparse_attention_reference(q, k, v, None)
    torch.testing.assert_close(block_sparse_attention(q, k, v, None), ref)
    with pytest.raises(ValueError, match="backend='triton'"):
        block_sparse_attention(q, k, v, None, backend="triton")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3, 4]),
    q_len=st.integers(1, 160),
    extra_keys=st.integers(0, 90),
    dim=st.sampled_from([64, 80, 96]),
    density=st.floats(0.0, 1.0),
    block_size=st.sampled_from([64, 128]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(kv_heads, group, q_len, extra_keys, dim, density, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    k_len = q_len + extra_keys
    q, k, v = make_qkv(1, kv_heads * group, kv_heads, q_len, k_len, dim, torch.float16, gen)
    n_q, n_k = -(-q_len // block_size), -(-k_len // block_size)
    layout = random_layout(1, kv_heads * group, n_q, n_k, density, block_size, gen, empty_and_full_rows=False)
    assert_matches_reference(q, k, v, layout)


def test_kernels_read_only_globals_a_compiled_kernel_may_read():
    """A compiled kernel may read a module global only if it is a tl.constexpr, a dtype, a module or another jit
    function: Triton refuses a plain number at compile time ("Cannot access global variable"), and the interpreter
    these tests run under does not, so the mistake would first show on a GPU."""
    import importlib
    import inspect
    import types

    import triton.language as tl

    def jitted(x) -> bool:  # a JITFunction, or under the interpreter an InterpretedFunction (no common base in 3.4)
        return type(x).__module__.startswith("triton.") and inspect.isfunction(getattr(x, "fn", None))

    allowed = (tl.constexpr, tl.dtype, types.ModuleType)
    checked = 0
    for name in ("sparse_prefill.kernels.triton_attention", "sparse_prefill.kernels.triton_fp8",
                 "sparse_prefill.selection.fused", "sparse_prefill.selection.fused_policy"):
        module = importlib.import_module(name)
        for kernel in vars(module).values():
            if not jitted(kernel) or kernel.fn.__module__ != name:
                continue
            checked += 1
            for ref in kernel.fn.__code__.co_names:  # globals, and attribute names (tl.load's load), builtins
                if ref in kernel.fn.__globals__:
                    value = kernel.fn.__globals__[ref]
                    assert isinstance(value, allowed) or jitted(value), \
                        f"{name}.{kernel.fn.__name__} reads the global {ref} = {value!r}"
    assert checked >= 10
