"""Invariants of the plain-PyTorch estimate and budget (the specification of every faster path)."""

import os
import subprocess
import sys

import pytest
import torch

from sparse_prefill import SparsePrefillConfig, select_blocks
from sparse_prefill.layout import causal_block_limits
from sparse_prefill.selection.budget import always_kept, head_budget_fractions
from sparse_prefill.selection.estimate import estimate_block_scores, num_proxies, pool_proxy_heads


def qk(b=1, hq=4, hkv=2, lq=640, lk=640, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    return q, k


def test_proxy_pooling_averages_each_group():
    q, k = qk(hq=8, hkv=4)
    q_p, k_p = pool_proxy_heads(q, k, 4)
    assert torch.allclose(q_p[:, 1], q[:, 2:4].mean(1)) and torch.allclose(k_p, k)
    q_p, k_p = pool_proxy_heads(q, k, 2)
    assert torch.allclose(k_p[:, 1], k[:, 2:4].mean(1))
    q_p, k_p = pool_proxy_heads(q, k, 8)  # one proxy per query head reads that head's kv head
    assert torch.allclose(k_p[:, 5], k[:, 2])
    with pytest.raises(ValueError, match="does not fit"):
        num_proxies(8, 4, 3)


def test_scores_are_causal_probabilities_and_mass_rows_sum_to_one():
    q, k = qk(lq=300, lk=700)
    cfg = SparsePrefillConfig(block_size=64, stride=4, min_seq_len=0)
    s = estimate_block_scores(q, k, cfg)
    nqb, nkb = s.score.shape[-2:]
    assert (nqb, nkb) == (5, 11)
    limits = causal_block_limits(nqb, 64, 300, 700)
    above = torch.arange(nkb) >= limits[:, None]
    assert (s.score[..., above] == 0).all() and (s.mass[..., above] == 0).all()
    assert ((s.score >= 0) & (s.score <= 1)).all()
    assert torch.allclose(s.mass.sum(-1), torch.ones(1, s.mass.shape[1], nqb), atol=1e-5)


def test_estimate_finds_a_planted_key_block():
    q, k = qk(hq=2, hkv=1, lq=1024, lk=1024, d=32)
    k[:, :, 600:604] = q[:, :, 1000:1004].mean(1, keepdim=True) * 4  # keys that the last block loves
    s = estimate_block_scores(q, k, SparsePrefillConfig(block_size=64, stride=4))
    assert s.score[0, 0, -1].argmax().item() == 600 // 64


def test_chunking_does_not_change_scores(monkeypatch):
    q, k = qk(lq=512, lk=512)
    cfg = SparsePrefillConfig(block_size=64, stride=2)
    whole = estimate_block_scores(q, k, cfg)
    import sparse_prefill.selection.estimate as estimate

    monkeypatch.setattr(estimate, "_CHUNK_ELEMENTS", 1)
    chunked = estimate_block_scores(q, k, cfg)
    assert torch.allclose(whole.score, chunked.score) and torch.allclose(whole.mass, chunked.mass, atol=1e-6)


@pytest.mark.parametrize("lq, lk", [(640, 640), (300, 700), (1000, 1000)])
@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_layout_invariants(lq, lk, gamma):
    q, k = qk(b=2, hq=4, hkv=2, lq=lq, lk=lk, seed=lq + lk)
    cfg = SparsePrefillConfig(block_size=64, gamma=gamma, min_budget_tokens=128, sink_blocks=1, local_blocks=1,
                              min_seq_len=0, exact_tail_tokens=64, question_blocks=2)
    layout = select_blocks(q, k, cfg)
    mask = layout.to_mask()
    nqb, nkb = mask.shape[-2:]
    limits = causal_block_limits(nqb, 64, lq, lk)
    causal = torch.arange(nkb) < limits[:, None]
    assert not (mask & ~causal).any(), "a block above the causal diagonal"
    forced = always_kept(nqb, nkb, lq, lk, cfg, "cpu")
    assert (mask | ~forced).all(), "a sink/local/diagonal block was dropped"
    assert (layout.counts >= torch.clamp(torch.tensor(cfg.min_budget_blocks), max=limits)).all()
    for b in range(2):
        for h in range(4):
            for i in range(nqb):
                row = layout.indices[b, h, i, : layout.counts[b, h, i]]
                assert torch.equal(row, row.unique())  # unique and ascending
    # Every row covers gamma of its proxy's estimated mass.
    scores = estimate_block_scores(q, k, cfg)
    proxy_mass = scores.mass[:, torch.arange(4) // scores.heads_per_proxy]
    covered = (proxy_mass * mask).sum(-1)
    assert (covered >= gamma - 1e-5).all()
    if gamma < 0.9:  # random q/k attend almost uniformly: covering 0.9 of that keeps nearly every block
        assert layout.density(lq, lk) < 1.0


def test_gamma_one_keeps_every_causal_block():
    q, k = qk(lq=300, lk=700)
    layout = select_blocks(q, k, SparsePrefillConfig(block_size=64, gamma=1.0, min_budget_tokens=0))
    nqb, nkb = layout.to_mask().shape[-2:]
    causal = torch.arange(nkb) < causal_block_limits(nqb, 64, 300, 700)[:, None]
    assert torch.equal(layout.to_mask(), causal.expand_as(layout.to_mask()))
    assert layout.density(300, 700) == pytest.approx(1.0)


def test_sharp_heads_get_smaller_budgets_than_flat_heads():
    q, k = qk(hq=2, hkv=1, lq=1024, lk=1024, d=32)
    q[:, 1] = 0.0  # head 1: uniform attention needs nearly every block
    u = torch.ones(32)
    q[:, 0] = u  # head 0 attends to the sink keys only
    k[:, :, 0:8] = 3 * u
    frac = head_budget_fractions(q, k, SparsePrefillConfig(block_size=64, gamma=0.9))
    assert frac[0, 0] < 0.2 and frac[0, 1] > 0.8


def test_estimate_memory_is_not_quadratic():
    """16K tokens: one fp32 [N, N] score matrix would be 1 GiB; the estimate must stay far below."""
    code = (
        "import resource, torch\n"
        "from sparse_prefill import SparsePrefillConfig\n"
        "from sparse_prefill.selection.estimate import estimate_block_scores\n"
        "q = torch.randn(1, 2, 16384, 16); k = torch.randn(1, 1, 16384, 16)\n"
        "cfg = SparsePrefillConfig(stride=1)\n"
        "estimate_block_scores(q[:, :, :256], k[:, :, :256], cfg)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "estimate_block_scores(q, k, cfg)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env=env).stdout.strip())
    assert grown < 3 * 2**30 // 4, f"estimate grew the process by {grown / 2**20:.0f} MiB"


def test_soft_capping_reaches_the_estimate_and_the_exact_last_block():
    """Gemma 2 caps its logits; coverage must be measured on the capped distribution the kernel computes."""
    from sparse_prefill.selection.budget import last_block_mass

    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 256, 16) * 4, torch.randn(1, 1, 256, 16)
    cfg = SparsePrefillConfig(block_size=64, stride=1, proxy_heads="q", gamma=0.9, min_budget_tokens=0)
    cap = 1.5
    logits = cap * torch.tanh((q[:, :, 192:] @ k.transpose(-1, -2)) / 4 / cap)
    logits = logits.masked_fill(torch.arange(256)[None] > torch.arange(192, 256)[:, None], -float("inf"))
    want = torch.softmax(logits, -1).mean(2).reshape(1, 2, 4, 64).sum(-1)
    torch.testing.assert_close(last_block_mass(q, k, cfg, softcap=cap), want, atol=1e-5, rtol=0)
    assert not torch.allclose(last_block_mass(q, k, cfg), want, atol=1e-2)  # uncapped differs
    capped = estimate_block_scores(q, k, cfg, softcap=cap).mass[:, :, -1]
    torch.testing.assert_close(capped, want, atol=1e-5, rtol=0)  # stride 1, per head: the estimate is exact
