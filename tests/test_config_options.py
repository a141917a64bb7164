"""config_from_options: the one parser of configs written as text (CLI flags, lm-eval model args, bench scripts)."""

import pytest

from sparse_prefill import SparsePrefillConfig
from sparse_prefill.config import config_from_options


def test_strings_are_converted_by_each_fields_type():
    config = config_from_options({"gamma": "0.9", "block_size": "64", "min-budget-tokens": "128", "sink_blocks": "2",
                                  "local_blocks": "0", "stride": "16", "proxy_heads": "q", "min_seq_len": "4096",
                                  "backend": "torch"})
    assert config == SparsePrefillConfig(gamma=0.9, block_size=64, min_budget_tokens=128, sink_blocks=2,
                                         local_blocks=0, stride=16, proxy_heads="q", min_seq_len=4096, backend="torch")
    assert config_from_options({"proxy_heads": "kv"}).proxy_heads == "kv"
    assert config_from_options({"proxy_heads": " 4 "}).proxy_heads == 4  # digits: a number of proxies
    for automatic in ("none", "auto", "None", None):
        assert config_from_options({"min_seq_len": automatic}).min_seq_len is None
    assert config_from_options({"backend": "auto"}).backend == "auto"  # a string field keeps "auto"


def test_typed_values_pass_and_numbers_take_their_fields_type():
    config = config_from_options({"gamma": 1, "block_size": 64.0, "proxy_heads": 2, "min_seq_len": 0})
    assert (config.gamma, config.block_size, config.proxy_heads, config.min_seq_len) == (1.0, 64, 2, 0)
    assert isinstance(config.gamma, float) and isinstance(config.block_size, int)


def test_fields_not_given_keep_the_base():
    base = SparsePrefillConfig(block_size=64, min_budget_tokens=256)
    config = config_from_options({"gamma": "0.8"}, base=base)
    assert config == base.replace(gamma=0.8)
    assert config_from_options({}) == SparsePrefillConfig()


def test_an_unknown_field_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="Unknown SparsePrefillConfig field 'gama'") as err:
        config_from_options({"gama": "0.9"})
    for field in SparsePrefillConfig.__dataclass_fields__:
        assert field in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("proxy_heads", "x"), ("proxy_heads", ""), ("proxy_heads", 2.5), ("block_size", "abc"), ("block_size", "96"),
    ("gamma", "high"), ("gamma", "1.5"), ("gamma", True), ("gamma", None), ("stride", "2.5"), ("stride", "3"),
    ("min_budget_tokens", "-1"), ("min_seq_len", ""), ("backend", "cuda"), ("block_size", 64.5),
])
def test_a_bad_value_is_named_with_its_field(field, value):
    with pytest.raises(ValueError, match=field) as err:
        config_from_options({field: value})
    assert f"SparsePrefillConfig.{field}" in str(err.value) and str(value) in str(err.value)


def test_both_spellings_of_one_field_is_an_error():
    with pytest.raises(ValueError, match="min_budget_tokens is given twice"):
        config_from_options({"min_budget_tokens": 1, "min-budget-tokens": 2})
