"""The fused (Triton) block selection against the plain-PyTorch specification.

On CPU the Triton kernels run through the interpreter (conftest.py), in fp32 and fp16 only.
"""

import pytest
import torch

from sparse_prefill import BlockLayout, SparsePrefillConfig, select_blocks, selection
from sparse_prefill.layout import causal_block_limits
from sparse_prefill.selection import fused
from sparse_prefill.selection.budget import choose_blocks, last_block_mass
from sparse_prefill.selection.estimate import BlockScores, estimate_block_scores, pool_proxy_heads, pool_tokens
from sparse_prefill.selection.fused_policy import choose_blocks_fused


def qk(b=1, hq=4, hkv=2, lq=320, lk=320, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    k[:, :, ::37] *= 3  # a few heavy keys, so attention is not flat
    return q.to(dtype), k.to(dtype)


CASES = {  # (b, hq, hkv, lq, lk, block_size, stride, proxy_heads, key_range)
    "per-head": (1, 2, 1, 320, 320, 64, 4, "q", None),
    "kv-proxies-chunked": (1, 4, 2, 136, 456, 64, 8, "kv", None),
    "block128-stride16": (1, 2, 1, 256, 256, 128, 16, "q", None),
    "int-proxies-key-range": (2, 2, 2, 200, 200, 64, 4, 1, torch.tensor([[0, 200], [37, 150]])),
    "stride1-exact": (1, 2, 1, 136, 200, 64, 1, "q", None),  # the exact per-row oracle (bench_retrieval.py)
}


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("case", CASES)
def test_fused_estimate_and_last_block_match_reference(case, dtype, atol):
    b, hq, hkv, lq, lk, bs, stride, proxies, key_range = CASES[case]
    q, k = qk(b, hq, hkv, lq, lk, dtype=dtype, seed=lq + lk)
    cfg = SparsePrefillConfig(block_size=bs, stride=stride, proxy_heads=proxies)
    ref = estimate_block_scores(q.float(), k.float(), cfg, key_range=key_range)
    got = fused.estimate_block_scores_fused(q, k, cfg, key_range=key_range)
    assert got.heads_per_proxy == ref.heads_per_proxy
    torch.testing.assert_close(got.score, ref.score, atol=atol, rtol=0)
    torch.testing.assert_close(got.mass, ref.mass, atol=atol, rtol=0)
    torch.testing.assert_close(fused.last_block_mass_fused(q, k, cfg, key_range=key_range),
                               last_block_mass(q.float(), k.float(), cfg, key_range=key_range), atol=atol, rtol=0)


@pytest.mark.parametrize("case, gamma, min_budget_tokens", [("per-head", 0.9, 128), ("per-head", 1.0, 0),
                                                            ("kv-proxies-chunked", 0.5, 0),
                                                            ("int-proxies-key-range", 0.99, 0)])
def test_fused_selection_gives_the_reference_layout(case, gamma, min_budget_tokens):
    b, hq, hkv, lq, lk, bs, stride, proxies, key_range = CASES[case]
    q, k = qk(b, hq, hkv, lq, lk, seed=lq + lk)
    cfg = SparsePrefillConfig(block_size=bs, stride=stride, proxy_heads=proxies, gamma=gamma,
                              min_budget_tokens=min_budget_tokens)
    ref = select_blocks(q, k, cfg, key_range=key_range)
    got = selection.select_blocks_fused(q, k, cfg, key_range=key_range)
    assert torch.equal(got.counts, ref.counts) and torch.equal(got.indices, ref.indices)
    assert got.density(lq, lk) == pytest.approx(ref.density(lq, lk))


def synthetic_scores(b, proxies, lq, lk, bs, sharpness, seed):
    """Softmax block masses with exact zeros sprinkled in (ties the policy must break like the reference)."""
    g = torch.Generator().manual_seed(seed)
    n_qb, n_kb = -(-lq // bs), -(-lk // bs)
    causal = torch.arange(n_kb)[None] < causal_block_limits(n_qb, bs, lq, lk)[:, None]
    mass = torch.softmax((torch.randn(b, proxies, n_qb, n_kb, generator=g) * sharpness)
                         .masked_fill(~causal, -float("inf")), -1)
    mass = torch.where(torch.rand(mass.shape, generator=g) < 0.15, torch.zeros_like(mass), mass)
    return mass / mass.sum(-1, keepdim=True)


@pytest.mark.parametrize("lq, lk, bs, sharpness, gamma, min_budget_tokens, heads_per_proxy",
                         [(640, 640, 64, 3.0, 0.9, 128, 1), (200, 700, 64, 1.0, 0.95, 0, 2),
                          (512, 512, 128, 5.0, 0.5, 256, 1)])
def test_fused_policy_equals_torch_policy_ties_included(lq, lk, bs, sharpness, gamma, min_budget_tokens,
                                                        heads_per_proxy):
    b, hq = 1, 2
    mass = synthetic_scores(b, hq // heads_per_proxy, lq, lk, bs, sharpness, seed=lq)
    scores = BlockScores(score=mass, mass=mass, heads_per_proxy=heads_per_proxy)
    last = synthetic_scores(b, hq, lk - bs, lk, bs, sharpness * 1.5, seed=lk)[:, :, -1]
    cfg = SparsePrefillConfig(block_size=bs, gamma=gamma, min_budget_tokens=min_budget_tokens)
    mask = choose_blocks(scores, last, cfg, lq, lk)
    ref = BlockLayout.from_mask(mask.contiguous(), bs, max_count=mask.shape[-1])
    got = choose_blocks_fused(scores, last, cfg, lq, lk)
    assert torch.equal(got.counts, ref.counts) and torch.equal(got.indices, ref.indices)


def test_sort_free_from_mask_equals_sorting_the_kept_blocks():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    got = BlockLayout.from_mask(mask, 64, max_count=7)
    keyed = torch.where(mask, torch.arange(7), 7).sort(-1).values  # kept blocks ascending, then the key 7
    assert torch.equal(got.counts, mask.sum(-1, dtype=torch.int32))
    assert torch.equal(got.indices, torch.where(keyed == 7, -1, keyed).int())


@pytest.mark.parametrize("heads, key_range", [(4, None), (2, None), (1, torch.tensor([[5, 70], [0, 83]]))])
def test_pooling_kernel_matches_token_then_head_means(heads, key_range):
    x = torch.randn(2, 4, 83, 16)
    valid = None
    if key_range is not None:
        tokens = torch.arange(83)[None]
        valid = (tokens >= key_range[:, :1]) & (tokens < key_range[:, 1:])
    expected, _ = pool_proxy_heads(pool_tokens(x, 8, 12, valid), x[:, :1], heads)
    got = fused.pool_tokens_fused(x, 8, 12, heads, key_range)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_dispatch_needs_cuda_and_obeys_backend():
    q, _ = qk()
    assert not selection.use_fused_selection(q, "auto")  # CPU tensors: reference path
    assert not selection.use_fused_selection(q, "torch")
    with pytest.raises(ValueError, match="backend='triton' cannot select blocks"):
        selection.use_fused_selection(q, "triton")
    assert "needs CUDA" in selection.fused_selection_supports(q)


@pytest.mark.parametrize("d", [80, 96])
def test_fused_selection_takes_the_kernels_head_dims(d):
    """head_dim 80/96 (Phi-3 and others) used to fall back silently to the per-KV-head Python loop."""
    q, k = qk(1, 4, 2, 256, 256, d=d, dtype=torch.float16, seed=d)
    cfg = SparsePrefillConfig(block_size=64, stride=4, proxy_heads="q", gamma=0.9, min_budget_tokens=0)
    ref = estimate_block_scores(q.float(), k.float(), cfg)
    torch.testing.assert_close(fused.estimate_block_scores_fused(q, k, cfg).mass, ref.mass, atol=1e-3, rtol=0)
    torch.testing.assert_close(fused.last_block_mass_fused(q, k, cfg), last_block_mass(q.float(), k.float(), cfg),
                               atol=1e-3, rtol=0)
    assert selection.head_dim_supported(d)


@pytest.mark.parametrize("softcap", [2.0, 50.0])
def test_fused_selection_soft_caps_like_the_reference(softcap):
    q, k = qk(1, 2, 1, 256, 256, d=64, seed=5)
    q = q * 3  # logits well past the cap, so capping changes the distribution
    cfg = SparsePrefillConfig(block_size=64, stride=4, proxy_heads="q", gamma=0.9, min_budget_tokens=0)
    ref = estimate_block_scores(q, k, cfg, softcap=softcap)
    torch.testing.assert_close(fused.estimate_block_scores_fused(q, k, cfg, softcap=softcap).mass, ref.mass,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.last_block_mass_fused(q, k, cfg, softcap=softcap),
                               last_block_mass(q, k, cfg, softcap=softcap), atol=1e-5, rtol=0)
    got = selection.select_blocks_fused(q, k, cfg, softcap=softcap)
    want = select_blocks(q, k, cfg, softcap=softcap)
    assert torch.equal(got.to_mask(), want.to_mask())
