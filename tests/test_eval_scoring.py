"""Answer scoring: RULER's contains-all and the strict exact match."""

import pytest

from sparse_prefill.eval.scoring import score, score_contains, score_exact


def test_contains_counts_the_share_of_answers_found_ignoring_case():
    assert score_contains(" 1234567.", ["1234567"]) == 1.0
    assert score_contains("The key is 12 and 34", ["12", "34", "56", "78"]) == 0.5
    assert score_contains("no number here", ["1234567"]) == 0.0
    assert score_contains("APPLE, pear", ["apple", "Pear"]) == 1.0


def test_exact_wants_the_answers_in_order_on_the_first_line_and_nothing_else():
    assert score_exact(" 1234567.\nmore text 999", ["1234567"]) == 1.0
    assert score_exact("\n\n12, 34 and 56\n", ["12", "34", "56"]) == 1.0
    assert score_exact("1234567 is it", ["1234567"]) == 0.0
    assert score_exact("34, 12", ["12", "34"]) == 0.0
    assert score_exact("x\n1234567", ["1234567"]) == 0.0


def test_score_dispatches_and_rejects_unknown_metrics_and_empty_answers():
    assert score("ab 7", ["7"], "contains") == score("7", ["7"], "exact") == 1.0
    with pytest.raises(ValueError, match="Unknown metric"):
        score("x", ["x"], "fuzzy")
    with pytest.raises(ValueError, match="at least one"):
        score_contains("x", [])
    with pytest.raises(ValueError, match="at least one"):
        score_exact("x", [])
