import pytest

from sparse_prefill import SparsePrefillConfig
from sparse_prefill.config import auto_min_seq_len


def test_defaults_are_documented_values():
    c = SparsePrefillConfig()
    assert (c.block_size, c.gamma, c.min_budget_tokens, c.sink_blocks, c.local_blocks, c.stride) == (
        128, 0.95, 1024, 1, 1, 16)
    assert (c.proxy_heads, c.min_seq_len, c.backend) == ("q", None, "auto")
    assert (c.exact_tail_tokens, c.question_blocks) == (256, 8)
    assert c.min_budget_blocks == 8
    assert c.effective_min_seq_len == auto_min_seq_len(c) == 12288
    assert SparsePrefillConfig(min_budget_tokens=8192).effective_min_seq_len == 32768


@pytest.mark.parametrize(
    "field, value, hint",
    [
        ("block_size", 96, "64 or 128"),
        ("block_size", True, "64 or 128"),
        ("gamma", 0.0, "(0, 1]"),
        ("gamma", 1.5, "(0, 1]"),
        ("gamma", "high", "(0, 1]"),
        ("min_budget_tokens", -1, ">= 0"),
        ("sink_blocks", 1.5, ">= 0"),
        ("local_blocks", -2, ">= 0"),
        ("stride", 0, "divides"),
        ("stride", 3, "divides"),
        ("proxy_heads", "all", '"kv"'),
        ("proxy_heads", 0, '"kv"'),
        ("min_seq_len", -5, "None"),
        ("backend", "cuda", "'auto'"),
    ],
)
def test_invalid_values_name_field_and_allowed_values(field, value, hint):
    with pytest.raises(ValueError) as err:
        SparsePrefillConfig(**{field: value})
    assert field in str(err.value) and hint in str(err.value)


def test_config_is_frozen_and_replace_validates():
    c = SparsePrefillConfig(block_size=64, min_seq_len=0)
    with pytest.raises(AttributeError):
        c.gamma = 0.5
    assert c.replace(gamma=0.9).gamma == 0.9
    with pytest.raises(ValueError):
        c.replace(gamma=2.0)
    assert c.effective_min_seq_len == 0
