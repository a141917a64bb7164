"""The fused (Triton) block selection against the plain-PyTorch specification.

On CPU the Triton kernels run through the interpreter (conftest.py), in fp32 and fp16 only.
"""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structured_attention import structured_qk

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


# -- The policy, Triton against PyTorch, on inputs where every rule decides something ---------------------
#
# Each case is scored once by both estimates (fused.py, and estimate.py + budget.last_block_mass); their
# masses agree to rounding (fp32: exp2 against exp, other summation orders; at most 1.2e-6 apart over 350
# random configs of the property test's kind, so 2e-6 is asserted). Then, for each config:
#   1. given the *same* masses, the Triton policy and the torch policy must write the same layout, every
#      row: they rank, count and break ties (lower block index first) alike;
#   2. each implementation on its own estimate must give the same layout, every row. Rounding could move
#      a block whose mass sits within ~1e-6 of a row's coverage threshold; over those 350 configs (4,229
#      rows, up to 12 query blocks) none moved, so no row may differ here. Should one, check 1 says
#      whether the policy or the estimate's rounding moved it.
# Each test also asserts that the rule it is about changed the layout (against that rule switched off), so
# the agreement is measured where the rule decided something.

POLICY_CASES = {  # batch, q_heads, kv_heads, q_len, k_len, block_size, stride, proxy_heads, key_range, head sharpness
    "base": (1, 2, 1, 640, 640, 64, 16, "q", None, (1.0, 0.1)),  # head 0 sharp, head 1 flat
    "block128-kv-proxies": (1, 4, 2, 1024, 1024, 128, 8, "kv", None, (1.0, 0.7)),  # a proxy per unlike pair
    "padding-stride4": (2, 1, 1, 640, 640, 64, 4, "q", torch.tensor([[96, 640], [0, 520]]), (1.0,)),  # left, right
    "chunk-int-proxies": (1, 4, 1, 320, 1024, 64, 16, 2, None, (1.0, 0.1)),  # 320 queries after 704 keys
}
COVERAGE_ONLY = dict(gamma=0.9, min_budget_tokens=0, sink_blocks=0, local_blocks=0, exact_tail_tokens=0,
                     question_blocks=0)  # rules 1-2 alone: no structural keep


def case_config(case, **fields):
    _, _, _, _, _, bs, stride, proxies, _, _ = POLICY_CASES[case]
    return SparsePrefillConfig(block_size=bs, stride=stride, proxy_heads=proxies, **{**COVERAGE_ONLY, **fields})


@functools.cache
def scored(case):
    """(q, k, Triton estimate, torch estimate) of a case, each estimate a (BlockScores, last-block mass)
    pair; q and k have structured attention (tests/structured_attention.py)."""
    b, hq, hkv, lq, lk, _, _, _, key_range, sharpness = POLICY_CASES[case]
    q, k = structured_qk(b, hq, hkv, lq, lk, sharpness=sharpness)
    cfg = case_config(case)
    fused_est = (fused.estimate_block_scores_fused(q, k, cfg, key_range=key_range),
                 fused.last_block_mass_fused(q, k, cfg, key_range=key_range))
    torch_est = (estimate_block_scores(q, k, cfg, key_range=key_range), last_block_mass(q, k, cfg, key_range=key_range))
    torch.testing.assert_close(fused_est[0].mass, torch_est[0].mass, atol=2e-6, rtol=0)
    torch.testing.assert_close(fused_est[1], torch_est[1], atol=2e-6, rtol=0)
    return q, k, fused_est, torch_est


def torch_policy(case, cfg, last_mass=None):
    """The specification's mask on the torch estimate (`last_mass` replaces the exact last-block mass)."""
    q, k, _, (scores, last) = scored(case)
    return choose_blocks(scores, last if last_mass is None else last_mass, cfg, q.shape[2], k.shape[2])


def assert_policies_agree(case, cfg):
    """Checks 1 and 2 above; returns the layout's mask."""
    q, k, (f_scores, f_last), _ = scored(case)
    lq, lk = q.shape[2], k.shape[2]
    got = choose_blocks_fused(f_scores, f_last, cfg, lq, lk)
    same_masses = choose_blocks(f_scores, f_last, cfg, lq, lk)
    rows = (got.to_mask() != same_masses).any(-1)
    assert not rows.any(), f"on the same masses the policies differ in rows {rows.nonzero().tolist()}"
    want = torch_policy(case, cfg)
    expected = BlockLayout.from_mask(want, cfg.block_size, max_count=want.shape[-1])
    rows = (got.counts != expected.counts) | (got.indices != expected.indices).any(-1)
    assert not rows.any(), f"end to end the implementations differ in rows {rows.nonzero().tolist()}"
    return want


def density_per_head(mask, case):
    _, _, _, lq, lk, bs, *_ = POLICY_CASES[case]
    causal = causal_block_limits(mask.shape[-2], bs, lq, lk).sum()
    return mask.sum((-1, -2)).float() / causal


def test_coverage_alone_decides_and_both_policies_agree():
    """Rules 1 and 2, no structural keep: gamma decides every row, and the per-head correction adds blocks."""
    cfg = case_config("base")
    mask = assert_policies_agree("base", cfg)
    sharp, flat = density_per_head(mask, "base")[0]
    assert sharp < 0.65 and flat > 0.9, "a sharp head keeps few blocks, a flat head nearly all"
    # Rule 2 off: the "exact" last-block mass replaced by the estimate's own, so nothing is corrected.
    _, _, _, (scores, _) = scored("base")
    uncorrected = torch_policy("base", cfg, last_mass=scores.mass[:, :, -1])
    added = mask.sum(-1) - uncorrected.sum(-1)
    assert (added >= 0).all() and (added[0, 0] > 0).sum() >= 6, "the correction adds blocks to the sharp head"


RULES = {  # each structural keep on its own, and what it must visibly do
    "min-budget": dict(min_budget_tokens=6 * 64),
    "exact-tail": dict(exact_tail_tokens=2 * 64 - 10),
    "question-columns": dict(question_blocks=2),
    "sink-and-local": dict(sink_blocks=1, local_blocks=1),
}


@pytest.mark.parametrize("rule", RULES)
def test_each_keep_decides_on_its_own_and_both_policies_agree(rule):
    cfg = case_config("base", **RULES[rule])
    mask = assert_policies_agree("base", cfg)
    off = torch_policy("base", case_config("base"))
    assert (mask & ~off).any(), "the keep adds blocks"
    n = mask.shape[-2]
    limits = causal_block_limits(n, 64, 640, 640)
    causal = torch.arange(n)[None] < limits[:, None]
    if rule == "min-budget":
        assert (mask.sum(-1) >= limits.clamp(max=6)).all() and (off.sum(-1) < limits.clamp(max=6)).any()
    if rule == "exact-tail":  # 118 tokens reach into the second-to-last block
        assert torch.equal(mask[..., -2:, :], causal[-2:].expand_as(mask[..., -2:, :]))
        assert not torch.equal(off[..., -2:, :], causal[-2:].expand_as(off[..., -2:, :]))
    if rule == "question-columns":  # each head's 2 blocks its exact last block reads most, in every row seeing them
        _, _, _, (_, last) = scored("base")
        columns = last[..., :-1].topk(2, dim=-1).indices  # the last block is that row's diagonal: forced, no column
        for h in range(2):
            for col in columns[0, h].tolist():
                assert mask[0, h, col:, col].all(), (h, col)
        assert (mask & ~off)[..., :-1, :].any(), "rows before the last block gained the question's blocks"
    if rule == "sink-and-local":  # forced blocks count towards coverage first, so others may go
        assert mask[..., 0].all() and all(mask[..., i, i - 1].all() for i in range(1, n))
    else:  # the other keeps only add
        assert not (off & ~mask).any()


@pytest.mark.parametrize("case", [c for c in POLICY_CASES if c != "base"])
def test_both_policies_agree_across_block_sizes_strides_proxies_padding_and_chunks(case):
    """Every rule on at once; coverage alone must already be sparse there, and the keeps must change it."""
    bs = POLICY_CASES[case][5]
    cfg = case_config(case, min_budget_tokens=4 * bs, sink_blocks=1, local_blocks=1, exact_tail_tokens=bs,
                      question_blocks=2)
    mask = assert_policies_agree(case, cfg)
    coverage = torch_policy(case, case_config(case))
    assert density_per_head(coverage, case).min() < 0.8, "coverage decides"
    assert (mask & ~coverage).any(), "the keeps decide"
    assert mask.shape[-2] >= 4, "rows beyond the exact tail"


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_policies_agree_row_by_row_over_shapes_and_configs(data):
    """Any shape, GQA ratio, chunk, padding, block size, stride, proxy kind and config: the same layout."""
    draw = data.draw
    bs = draw(st.sampled_from([64, 128]))
    batch, kv_heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    q_heads = kv_heads * draw(st.sampled_from([1, 2] if batch * kv_heads < 4 else [1]))
    k_len = draw(st.integers(bs + 1, 5 * bs))
    q_len = draw(st.one_of(st.just(k_len), st.integers(1, k_len)))
    proxies = draw(st.sampled_from(["q", "kv"] + [p for p in (1, 2, 4) if kv_heads % p == 0
                                                  or (p % kv_heads == 0 and q_heads % p == 0)]))
    key_range = None
    if draw(st.booleans()):
        key_range = torch.tensor([draw(st.sampled_from([(0, k_len), (k_len // 3, k_len), (0, 2 * k_len // 3)]))
                                  for _ in range(batch)])
    cfg = SparsePrefillConfig(
        block_size=bs, stride=draw(st.sampled_from([1, 4, 16])), proxy_heads=proxies,
        gamma=draw(st.floats(0.3, 0.99)), min_budget_tokens=draw(st.sampled_from([0, bs, 3 * bs])),
        sink_blocks=draw(st.integers(0, 2)), local_blocks=draw(st.integers(0, 2)),
        exact_tail_tokens=draw(st.sampled_from([0, bs // 2, bs + 7])), question_blocks=draw(st.integers(0, 3)))
    sharpness = (draw(st.floats(0.05, 1.2)), draw(st.floats(0.05, 1.2)))
    q, k = structured_qk(batch, q_heads, kv_heads, q_len, k_len, seed=draw(st.integers(0, 2**16)),
                         sharpness=sharpness)
    got = selection.select_blocks_fused(q, k, cfg, key_range=key_range)
    want = selection.select_blocks_reference(q, k, cfg, key_range=key_range)
    rows = (got.to_mask() != want.to_mask()).any(-1)
    assert not rows.any(), f"rows {rows.nonzero().tolist()} differ"


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
                          (1024, 1024, 128, 5.0, 0.5, 256, 1)])
def test_fused_policy_equals_torch_policy_ties_included(lq, lk, bs, sharpness, gamma, min_budget_tokens,
                                                        heads_per_proxy):
    b, hq = 1, 2
    mass = synthetic_scores(b, hq // heads_per_proxy, lq, lk, bs, sharpness, seed=lq)
    scores = BlockScores(score=mass, mass=mass, heads_per_proxy=heads_per_proxy)
    last = synthetic_scores(b, hq, lk - bs, lk, bs, sharpness * 1.5, seed=lk)[:, :, -1]
    cfg = SparsePrefillConfig(block_size=bs, gamma=gamma, min_budget_tokens=min_budget_tokens, exact_tail_tokens=bs,
                              question_blocks=2)  # the default 256-token tail would make every row of 200 dense
    mask = choose_blocks(scores, last, cfg, lq, lk)
    assert (mask.sum(-1) < causal_block_limits(mask.shape[-2], bs, lq, lk)).any(), "some row drops blocks"
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
