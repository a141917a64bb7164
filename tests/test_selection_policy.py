"""What the selection policy (budget.choose_blocks) and the pooled estimate are for, on inputs built to show it."""

import torch

from sparse_prefill import SparsePrefillConfig
from sparse_prefill.selection.budget import choose_blocks
from sparse_prefill.selection.estimate import BlockScores, estimate_block_scores

BS, N_BLOCKS = 64, 12
CFG = SparsePrefillConfig(block_size=BS, gamma=0.9, min_budget_tokens=0, sink_blocks=1, local_blocks=0,
                          exact_tail_tokens=0, question_blocks=0)  # rules 1-3 alone; 4 and 5 are tested below


def peaked_rows(n_qb, n_kb, favourite):
    """Block masses where every row puts 0.95 on one block (or its diagonal, if that is not visible yet)."""
    mass = torch.full((1, 1, n_qb, n_kb), 0.0)
    for i in range(n_qb):
        j = favourite if favourite <= i else i
        mass[0, 0, i, : i + 1] = 0.05 / (i + 1)
        mass[0, 0, i, j] += 0.95
    return mass


def test_a_confident_estimate_keeps_few_blocks():
    mass = peaked_rows(N_BLOCKS, N_BLOCKS, favourite=5)
    scores = BlockScores(score=mass, mass=mass, heads_per_proxy=1)
    keep = choose_blocks(scores, mass[:, :, -1], CFG, N_BLOCKS * BS, N_BLOCKS * BS)
    assert keep[0, 0, -1].sum() == 3  # sink, favourite, diagonal
    assert keep[0, 0, 8].tolist()[:9] == [True, False, False, False, False, True, False, False, True]


def test_an_overconfident_head_is_calibrated_by_its_exact_last_block():
    estimated = peaked_rows(N_BLOCKS, N_BLOCKS, favourite=5)
    scores = BlockScores(score=estimated, mass=estimated, heads_per_proxy=1)
    flat = torch.full((1, 1, N_BLOCKS), 1.0 / N_BLOCKS)  # the head really attends everywhere
    keep = choose_blocks(scores, flat, CFG, N_BLOCKS * BS, N_BLOCKS * BS)
    calm = choose_blocks(scores, estimated[:, :, -1], CFG, N_BLOCKS * BS, N_BLOCKS * BS)
    shortfall = 11 - 3  # exact need of the last row (0.9 of 12 equal blocks) minus the estimate's
    assert keep[0, 0, -1].sum() >= 11
    assert (keep.sum(-1) >= torch.minimum(calm.sum(-1) + shortfall, torch.arange(1, N_BLOCKS + 1))).all()


def test_the_last_row_keeps_what_its_exact_attention_needs():
    estimated = peaked_rows(N_BLOCKS, N_BLOCKS, favourite=5)
    scores = BlockScores(score=estimated, mass=estimated, heads_per_proxy=1)
    exact = peaked_rows(N_BLOCKS, N_BLOCKS, favourite=2)[:, :, -1]  # the question really reads block 2
    keep = choose_blocks(scores, exact, CFG, N_BLOCKS * BS, N_BLOCKS * BS)
    assert keep[0, 0, -1, 2] and not keep[0, 0, -2, 2]


def test_pooled_estimate_sees_a_lone_key_that_sampling_would_miss():
    """One needle key at a position no stride-4 sample lands on; the last queries (a question) look for it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1024, 32, generator=g) * 0.3
    k = torch.randn(1, 1, 1024, 32, generator=g) * 0.3
    topic = torch.randn(32, generator=g)
    q[0, 0, -64:] += topic
    needle = 601  # 601 % 4 == 1: sampling the first key of every group of 4 never scores it
    k[0, 0, needle] = 6 * topic
    scores = estimate_block_scores(q, k, SparsePrefillConfig(block_size=64, stride=4, proxy_heads="q"))
    last_row = scores.mass[0, 0, -1]
    assert last_row.argmax().item() == needle // 64
    assert last_row[needle // 64] > 0.5


def test_the_exact_tail_keeps_every_causal_block_of_the_last_queries():
    """The question at the end of a prompt reads a needle the block-averaged estimate may rank low."""
    mass = peaked_rows(N_BLOCKS, N_BLOCKS, favourite=5)
    scores = BlockScores(score=mass, mass=mass, heads_per_proxy=1)
    n = N_BLOCKS * BS
    for tail, dense_rows in ((0, 0), (1, 1), (BS, 1), (BS + 1, 2), (3 * BS - 10, 3)):
        keep = choose_blocks(scores, mass[:, :, -1], CFG.replace(exact_tail_tokens=tail), n, n)
        for i in range(N_BLOCKS):
            dense = bool(keep[0, 0, i, : i + 1].all())
            assert dense == (i >= N_BLOCKS - dense_rows) or (dense and i < 3), (tail, i)
            assert not keep[0, 0, i, i + 1:].any()  # never above the diagonal
    # A short last block: the tail is counted in queries, so it reaches into the block before.
    keep = choose_blocks(scores, mass[:, :, -1], CFG.replace(exact_tail_tokens=BS), n - 40, n - 40)
    assert keep[0, 0, -2, :N_BLOCKS - 1].all() and keep[0, 0, -1].all()


def test_question_columns_reach_every_later_row():
    """A needle the last block reads (block 5 here) is kept by every row that can see it, even rows whose
    own estimate ranks it nowhere."""
    mass = peaked_rows(N_BLOCKS, N_BLOCKS, favourite=2)  # every row's estimate favours block 2
    last = torch.zeros(1, 1, N_BLOCKS)
    last[..., 5], last[..., 7], last[..., 0], last[..., -1] = 0.5, 0.2, 0.2, 0.1
    scores = BlockScores(score=mass, mass=mass, heads_per_proxy=1)
    n = N_BLOCKS * BS
    for k, columns in ((0, []), (1, [5]), (2, [5, 7])):
        keep = choose_blocks(scores, last, CFG.replace(question_blocks=k), n, n)
        for i in range(N_BLOCKS - 1):
            for col in (5, 7):
                assert bool(keep[0, 0, i, col]) == (col in columns and col <= i or col == i), (k, i, col)


def test_stride_one_estimates_the_exact_block_masses():
    """stride=1 with per-head proxies is no estimate: the masses are each row's exact softmax mass per block,
    averaged over the block's rows, so gamma then chooses what the per-row oracle chooses."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g) * 2
    cfg = SparsePrefillConfig(block_size=BS, stride=1, proxy_heads="q")
    mass = estimate_block_scores(q, k, cfg).mass
    probs = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(torch.ones(200, 200).triu(1).bool(), -1e9), -1)
    per_block = torch.nn.functional.pad(probs, (0, 56, 0, 56)).reshape(1, 2, 4, BS, 4, BS).sum(5)
    rows = torch.tensor([BS, BS, BS, 200 - 3 * BS]).view(1, 1, 4, 1)
    torch.testing.assert_close(mass, per_block.sum(3) / rows, atol=1e-5, rtol=0)
