"""The needle probe (where a needle was dropped) and the interval statistics of the retrieval benchmark."""

import pytest
import torch

from sparse_prefill import BlockLayout
from sparse_prefill.eval.needles import NeedleProbe, question_rows, relevant_needles
from sparse_prefill.eval.scoring import paired_difference, wilson_interval
from sparse_prefill.layout import causal_layout

BS, N = 64, 512  # 8 blocks


def needle_qk(needles, question, heads=2):
    """q/k where the question's rows and each needle's rows look straight at the needles' keys (head 0)."""
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(1, heads, N, d) * 0.1, torch.randn(1, 1, N, d) * 0.1
    direction = torch.zeros(d)
    direction[0] = 1.0
    for s, e in needles:
        k[0, 0, s:e] = direction * 8
    q[0, 0, question[0]:question[1]] = direction * 8
    for s, e in needles:
        q[0, 0, s:e] = direction * 8
    return q, k


def test_the_probe_sees_a_needle_the_question_reads_and_whether_its_block_was_kept():
    needles, question = [(70, 80), (330, 340)], (480, N)
    q, k = needle_qk(needles, question)
    full = causal_layout(1, 2, N, N, BS)
    mask = full.to_mask().clone()
    mask[0, :, 7, 1] = False  # the question's block drops the first needle's block
    mask[0, :, 5, 1] = False  # the second needle's block drops the first needle's block
    for layout, expect_drop in ((full, False), (BlockLayout.from_mask(mask, BS), True)):
        probe = NeedleProbe(needles, question)
        assert probe(0, q, k, layout) is layout  # the probe only reads
        rec = probe.layers[0]
        assert rec["mass"][0] > 0.5 > rec["mass"][1]  # head 0 reads the needles, head 1 does not
        assert rec["kept"] == [not expect_drop] * 2
        assert rec["link_kept"] == [not expect_drop] * 2 and rec["link_mass"][0] > 0.3
        summary = probe.summary()
        assert (summary["needle_mass_dropped"] > 0.5) == expect_drop
        assert (summary["link_mass_dropped"] > 0.3) == expect_drop
        assert summary["heads_dropping"] == (2 if expect_drop else 0) and summary["heads"] == 2
        if expect_drop:
            assert summary["worst_dropped"][0]["head"] == 0


def test_the_probe_skips_calls_it_cannot_read():
    q, k = needle_qk([(70, 80)], (480, N))
    probe = NeedleProbe([(70, 80)], (480, N))
    probe(None, q, k, causal_layout(1, 2, N, N, BS))  # outside a known layer
    probe(1, q[:, :, -128:], k, causal_layout(1, 2, 128, N, BS))  # a chunk, not the whole prompt
    assert probe.layers == {}


def test_relevant_needles_and_question_rows_follow_the_task():
    from types import SimpleNamespace

    ex = SimpleNamespace(task="niah_multikey", needle_spans=((5, 9), (20, 24)), context_span=(2, 40), length=60)
    assert relevant_needles(ex) == [(5, 9)] and question_rows(ex) == (40, 60)
    assert relevant_needles(SimpleNamespace(**{**vars(ex), "task": "niah_multivalue"})) == [(5, 9), (20, 24)]


def test_wilson_interval_and_paired_difference():
    lo, hi = wilson_interval(15, 30)
    assert lo == pytest.approx(0.3315, abs=1e-3) and hi == pytest.approx(0.6685, abs=1e-3)
    assert wilson_interval(30, 30)[1] == 1.0 and wilson_interval(30, 30)[0] == pytest.approx(0.8865, abs=1e-3)
    mean, lo, hi = paired_difference([0.0] * 28 + [-1.0, -1.0])
    assert mean == pytest.approx(-2 / 30) and lo < mean < hi < 0.03
    assert paired_difference([0.25, 0.25]) == (0.25, 0.25, 0.25)
