"""Padded batches: row by row, a patched model gives what running that row alone gives, sparse and dense.

Also the pieces that make it so: transformers' masks read as per-row key ranges (or refused), and
the selection and the reference attention never looking at padded keys.
"""

import warnings

import pytest
import torch
from model_zoo import tiny_model
from transformers.masking_utils import (
    causal_mask_function,
    packed_sequence_mask_function,
    sliding_window_causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers_masks import eager_mask, flash_attention_mask, sdpa_mask

from sparse_prefill import SparsePrefillConfig, block_sparse_attention, patch_model, select_blocks
from sparse_prefill.patches import SparsePrefillWarning
from sparse_prefill.patches.masks import MaskReading, read_mask
from sparse_prefill.patches.transformers_attention import _CONFIGS, _register
from sparse_prefill.selection.budget import head_budget_fractions
from sparse_prefill.selection.estimate import estimate_block_scores

EXACT = SparsePrefillConfig(block_size=64, gamma=1.0, min_budget_tokens=0, min_seq_len=0)
# min_seq_len=150: the 70-token row below is attended densely, as it would be alone.
TIGHT = SparsePrefillConfig(block_size=64, gamma=0.3, min_budget_tokens=0, min_seq_len=150, local_blocks=0,
                            exact_tail_tokens=0, question_blocks=0)  # short test prompts: keep rows sparse
LENGTHS = (330, 200, 70)


def padded_batch(lengths, side, seed=1):
    """input_ids, attention_mask and position_ids of prompts padded to the longest, plus each row's slice."""
    total = max(lengths)
    ids = torch.randint(3, 128, (len(lengths), total), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    rows = []
    for b, n in enumerate(lengths):
        rows.append(slice(total - n, total) if side == "left" else slice(0, n))
        mask[b, rows[-1]] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes
    return ids, mask, positions, rows


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_each_padded_row_equals_that_row_alone(impl, side):
    model = tiny_model("llama", attn_implementation=impl)
    ids, mask, positions, rows = padded_batch(LENGTHS, side)
    dense_alone = [logits(model, ids[b:b + 1, rows[b]])[0] for b in range(len(LENGTHS))]

    patch_model(model, TIGHT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsePrefillWarning)  # the padded batch must not fall back to dense
        batch = logits(model, ids, attention_mask=mask, position_ids=positions)
    assert torch.isfinite(batch).all()
    for b, row in enumerate(rows):
        alone = logits(model, ids[b:b + 1, row])[0]
        assert torch.allclose(batch[b, row], alone, atol=2e-5), (b, (batch[b, row] - alone).abs().max())
        if LENGTHS[b] >= TIGHT.min_seq_len:
            assert (alone - dense_alone[b]).abs().max() > 1e-3, "the tight budget should have run sparsely"
        else:
            assert torch.allclose(alone, dense_alone[b], atol=2e-5)

    patch_model(model, EXACT)
    batch = logits(model, ids, attention_mask=mask, position_ids=positions)
    for b, row in enumerate(rows):
        assert torch.allclose(batch[b, row], dense_alone[b], atol=2e-5), b


def test_padded_batch_under_inference_mode_and_a_fully_padded_row():
    model = tiny_model("llama")
    ids, mask, positions, rows = padded_batch((260, 130), "left")
    ids = torch.cat([ids, ids[:1]])
    mask = torch.cat([mask, torch.zeros_like(mask[:1])])  # a row with no real token at all
    positions = torch.cat([positions, torch.zeros_like(positions[:1])])
    patch_model(model, EXACT)
    with torch.inference_mode():  # inference tensors carry no version counter: the mask cache must cope
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(batch).all()
    alone = logits(model, ids[1:2, rows[1]])[0]
    assert torch.allclose(batch[1, rows[1]], alone, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Reading transformers' masks
# ---------------------------------------------------------------------------------------------

def padding_2d(starts_ends, width):
    cols = torch.arange(width)
    return torch.stack([(cols >= s) & (cols < e) for s, e in starts_ends])


@pytest.mark.parametrize("q_len, k_len", [(96, 96), (40, 96)])  # one-shot and a later prefill chunk
@pytest.mark.parametrize("kind", ["sdpa", "eager", "flash"])
def test_masks_of_every_implementation_read_as_key_ranges(kind, q_len, k_len):
    ranges = [(0, k_len), (30, k_len), (0, k_len - 10)] if q_len == k_len else [(0, k_len), (30, k_len)]
    padding = padding_2d(ranges, k_len)
    args = dict(batch_size=len(ranges), q_length=q_len, kv_length=k_len, q_offset=k_len - q_len,
                mask_function=causal_mask_function, attention_mask=padding)
    mask = {"sdpa": lambda: sdpa_mask(**args, allow_is_causal_skip=False),
            "eager": lambda: eager_mask(**args, dtype=torch.float16),
            "flash": lambda: flash_attention_mask(**args)}[kind]()
    reading, reason = read_mask(mask, q_len, k_len, "flash_attention_2" if kind == "flash" else kind)
    assert reason is None and reading.num_keys == k_len
    assert reading.rows == tuple(ranges) and reading.key_range.tolist() == [list(r) for r in ranges]


def test_unpadded_masks_read_as_plain_causal():
    mask = sdpa_mask(batch_size=2, q_length=64, kv_length=64, allow_is_causal_skip=False)
    reading, reason = read_mask(mask, 64, 64, "sdpa")
    assert reason is None and reading.num_keys == 64 and reading.key_range is None and reading.rows is None


def test_static_cache_slots_past_the_queries_are_dropped():
    # A StaticCache of 128 slots holding a left-padded 2-row prompt of 80 tokens (second chunk: 30 queries).
    padding = padding_2d([(0, 80), (25, 80)], 80)
    for q_offset, q_len in ((0, 80), (50, 30)):
        mask = sdpa_mask(batch_size=2, q_length=q_len, kv_length=128, q_offset=q_offset,
                         attention_mask=padding[:, :q_offset + q_len], allow_is_causal_skip=False)
        reading, reason = read_mask(mask, q_len, 128, "sdpa")
        assert reason is None and reading.num_keys == q_offset + q_len
        assert reading.rows == ((0, q_offset + q_len), (25, q_offset + q_len))
    # No mask at all (an empty static cache, no padding): sdpa crops to the queries; eager has no causal mask.
    assert read_mask(None, 80, 128, "sdpa") == (MaskReading(num_keys=80), None)
    assert read_mask(None, 80, 128, "eager")[0] is None
    assert read_mask(None, 80, 128, "flash_attention_2")[0].num_keys == 128


@pytest.mark.parametrize("make, reason", [
    (lambda: sdpa_mask(batch_size=1, q_length=64, kv_length=64, allow_is_causal_skip=False,
                       mask_function=sliding_window_causal_mask_function(16)), "not causal"),
    (lambda: sdpa_mask(batch_size=1, q_length=64, kv_length=64, allow_is_causal_skip=False,
                       mask_function=packed_sequence_mask_function(torch.tensor([[0] * 30 + [1] * 34]))), "not causal"),
    (lambda: padding_2d([(0, 10)], 64) | padding_2d([(20, 64)], 64), "holes"),
    (lambda: torch.randn(1, 1, 64, 64), "bias"),
    (lambda: torch.ones(1, 4, 64, 64, dtype=torch.bool), "shape"),
    (lambda: torch.ones(2, 50, dtype=torch.bool), "width"),
])
def test_other_masks_are_refused_with_a_reason(make, reason):
    reading, why = read_mask(make(), 64, 64, "sdpa")
    assert reading is None and reason in why


def test_a_reading_is_reused_until_the_mask_changes():
    mask = sdpa_mask(batch_size=2, q_length=64, kv_length=64, attention_mask=padding_2d([(0, 64), (8, 64)], 64),
                     allow_is_causal_skip=False).clone()
    first = read_mask(mask, 64, 64, "sdpa")
    assert read_mask(mask, 64, 64, "sdpa") is first
    mask[1, 0, :, :20] = False  # in place: now row 1 starts at 20
    again, reason = read_mask(mask, 64, 64, "sdpa")
    assert reason is None and again.rows == ((0, 64), (20, 64))


def test_a_reading_of_an_inference_mode_mask_expires_when_a_layer_reads_it_again():
    """Tensors made under inference mode keep no version counter, so a buffer reused in place looks unchanged: a
    reading is trusted by every layer of one forward and read again when a layer that read it asks again (the
    next forward). Without a reader such a mask is never trusted twice."""
    layers = [torch.nn.Linear(1, 1) for _ in range(2)]
    with torch.inference_mode():
        mask = padding_2d([(0, 64), (8, 64)], 64).clone()
    first = read_mask(mask, 64, 64, "flash_attention_2", reader=layers[0])
    assert read_mask(mask, 64, 64, "flash_attention_2", reader=layers[1]) is first  # same forward, next layer
    with torch.inference_mode():
        mask[1, :20] = False  # the next forward, the same buffer: row 1 starts at 20
    again, reason = read_mask(mask, 64, 64, "flash_attention_2", reader=layers[0])
    assert reason is None and again.rows == ((0, 64), (20, 64))
    with torch.inference_mode():
        mask[1, 8:20] = True
    assert read_mask(mask, 64, 64, "flash_attention_2")[0].rows == ((0, 64), (8, 64))


def test_flash_attention_glue_reads_2d_masks_row_by_row():
    """The flash path cannot run here; its glue up to the fallback can, with flash's 2-D padding mask."""
    name = _register("flash_attention_2")
    attention = ALL_ATTENTION_FUNCTIONS[name]
    module = torch.nn.Module()
    module.is_causal = True
    _CONFIGS[module] = EXACT
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 150, 16, generator=g), torch.randn(2, 2, 150, 16, generator=g), torch.randn(
        2, 2, 150, 16, generator=g)
    padding = padding_2d([(0, 150), (40, 150)], 150)
    out, weights = attention(module, q, k, v, padding, scaling=0.25)
    assert weights is None and out.shape == (2, 150, 4, 16)
    for b, start in ((0, 0), (1, 40)):
        alone = block_sparse_attention(q[b:b + 1, :, start:], k[b:b + 1, :, start:], v[b:b + 1, :, start:], None,
                                       scale=0.25)
        assert torch.allclose(out[b:b + 1, start:].transpose(1, 2), alone, atol=1e-5)
    assert (out[1, :40] == 0).all()  # pad queries


# ---------------------------------------------------------------------------------------------
# Selection and attention honour key_range (the lower-level API)
# ---------------------------------------------------------------------------------------------

def test_selection_and_attention_never_look_at_padded_keys():
    cfg = SparsePrefillConfig(block_size=64, gamma=0.6, min_budget_tokens=0, min_seq_len=0)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4 // h, 320, 16, generator=g) for h in (1, 2, 2))
    key_range = torch.tensor([[0, 320], [100, 260]], dtype=torch.int32)
    outside = torch.ones(2, 1, 320, 1, dtype=torch.bool)
    outside[1, :, 100:260] = False
    outside[0] = False
    k2, v2 = k.masked_fill(outside, 1e4), v.masked_fill(outside, -1e4)  # loud garbage in the padding

    scores, scores2 = (estimate_block_scores(q, kk, cfg, key_range=key_range) for kk in (k, k2))
    assert torch.equal(scores.score, scores2.score) and torch.equal(scores.mass, scores2.mass)
    assert (scores.mass[1, :, :, 0] == 0).all() and (scores.mass[1, :, :, 1] > 0).any()  # block 0 is all padding
    fractions = head_budget_fractions(q, k, cfg, key_range=key_range)
    assert torch.equal(fractions, head_budget_fractions(q, k2, cfg, key_range=key_range))
    layout = select_blocks(q, k, cfg, key_range=key_range)
    assert torch.equal(layout.to_mask(), select_blocks(q, k2, cfg, key_range=key_range).to_mask())
    out = block_sparse_attention(q, k, v, layout, key_range=key_range)
    assert torch.equal(out, block_sparse_attention(q, k2, v2, layout, key_range=key_range))
    assert torch.isfinite(out).all() and (out[1, :, :100] == 0).all()
