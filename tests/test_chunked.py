"""Chunked prefill (q_len < kv_len): chunks through the model's cache or through sparse_attention give the
one-shot result, and partial results over disjoint keys merge exactly through their log-sum-exp."""

import warnings

import pytest
import torch
from model_zoo import cache_kwargs, tiny_model
from transformers import DynamicCache, StaticCache

from sparse_prefill import SparsePrefillConfig, block_sparse_attention, patch_model, sparse_attention
from sparse_prefill.layout import BlockLayout
from sparse_prefill.patches import SparsePrefillWarning

EXACT = SparsePrefillConfig(block_size=64, gamma=1.0, min_budget_tokens=0, min_seq_len=0)
TIGHT = SparsePrefillConfig(block_size=64, gamma=0.3, min_budget_tokens=0, min_seq_len=0, local_blocks=0,
                            exact_tail_tokens=0, question_blocks=0)  # short test prompts: keep rows sparse
PROMPT = torch.randint(3, 128, (1, 448), generator=torch.Generator().manual_seed(2))
CHUNKS = (0, 192, 320, 448)  # uneven chunks, none a multiple of another


def prefill_in_chunks(model, ids, cache, attention_mask=None):
    pieces = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SparsePrefillWarning)  # every chunk must take the sparse path
        for a, b in zip(CHUNKS, CHUNKS[1:], strict=False):
            extra = {} if attention_mask is None else {"attention_mask": attention_mask[:, :b]}
            pieces.append(model(ids[:, a:b], **cache_kwargs(model, cache), **extra).logits)
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("impl, cache_kind", [("sdpa", "dynamic"), ("sdpa", "static"), ("eager", "static")])
def test_chunked_prefill_through_the_model_equals_one_shot(impl, cache_kind):
    model = tiny_model("llama", attn_implementation=impl)
    with torch.no_grad():
        dense = model(PROMPT).logits

    def new_cache():
        return DynamicCache(config=model.config) if cache_kind == "dynamic" else StaticCache(
            config=model.config, max_cache_len=512)

    patch_model(model, EXACT)
    chunked = prefill_in_chunks(model, PROMPT, new_cache())
    assert torch.allclose(chunked, dense, atol=3e-5), (chunked - dense).abs().max()
    patch_model(model, TIGHT)
    tight = prefill_in_chunks(model, PROMPT, new_cache())
    assert torch.isfinite(tight).all() and (tight - dense).abs().max() > 1e-3


def test_chunked_prefill_of_a_left_padded_batch():
    model = tiny_model("llama")
    ids = PROMPT.expand(2, -1).clone()
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # row 1: 348 real tokens after 100 pads
    with torch.no_grad():
        dense_alone = model(ids[1:, 100:]).logits
    patch_model(model, EXACT)
    chunked = prefill_in_chunks(model, ids, DynamicCache(config=model.config), attention_mask=mask)
    assert torch.allclose(chunked[1, 100:], dense_alone[0], atol=3e-5)


def test_chunked_sparse_attention_equals_one_shot():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 4, 448, 16, generator=g), torch.randn(1, 2, 448, 16, generator=g), torch.randn(
        1, 2, 448, 16, generator=g)
    whole = sparse_attention(q, k, v, EXACT)
    spans = zip(CHUNKS, CHUNKS[1:], strict=False)
    pieces = [sparse_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], EXACT) for a, b in spans]
    assert torch.allclose(torch.cat(pieces, 2), whole, atol=1e-5)
    # A tight budget chooses per chunk (its own last query block sets the head budgets), so it only has to run.
    last, layout = sparse_attention(q[:, :, 320:], k, v, TIGHT, return_layout=True)
    assert torch.isfinite(last).all() and layout.density(128, 448) < 1


def merge(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]  # both -inf: a row that sees nothing
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


def test_lse_merges_two_key_halves_into_the_whole():
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 4, 200, 16, generator=g), torch.randn(2, 2, 330, 16, generator=g), torch.randn(
        2, 2, 330, 16, generator=g)
    whole, whole_lse = block_sparse_attention(q, k, v, None, return_lse=True, softcap=20.0)
    split = 190  # keys [0, 190) and [190, 330); the first queries (at 130..) see only the first half
    halves = [block_sparse_attention(q, k, v, None, return_lse=True, softcap=20.0,
                                     key_range=torch.tensor([r] * 2, dtype=torch.int32))
              for r in ((0, split), (split, 330))]
    merged, lse = merge(*halves[0], *halves[1])
    assert torch.allclose(merged, whole, atol=1e-5) and torch.allclose(lse, whole_lse, atol=1e-5)


def test_lse_merges_complementary_layouts_into_dense():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    dense, dense_lse = block_sparse_attention(q, k, v, None, return_lse=True)
    pick = torch.rand(1, 2, 4, 4, generator=g) < 0.5
    parts = [block_sparse_attention(q, k, v, BlockLayout.from_mask(m, 64), return_lse=True) for m in (pick, ~pick)]
    merged, lse = merge(*parts[0], *parts[1])
    assert torch.allclose(merged, dense, atol=1e-5) and torch.allclose(lse, dense_lse, atol=1e-5)
