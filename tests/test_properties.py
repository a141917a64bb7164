"""Property-based checks over shapes, lengths, paddings and GQA ratios: with gamma=1 every sparse entry
point equals dense causal attention computed naively in float64; with any gamma the output is finite,
uses exactly the layout it reports, and a padded row equals that row alone."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers_masks import eager_mask, sdpa_mask

from sparse_prefill import SparsePrefillConfig, block_sparse_attention, sparse_attention
from sparse_prefill.patches import transformers_attention as glue

FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dense_reference(q, k, v, key_range=None, scale=None, softcap=None):
    """Causal attention in float64 over the whole score matrix; rows that see no key give 0."""
    q_len, k_len, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    cols = torch.arange(k_len)
    allowed = (cols <= torch.arange(q_len)[:, None] + k_len - q_len)[None, None]
    if key_range is not None:
        allowed = allowed & ((cols >= key_range[:, :1]) & (cols < key_range[:, 1:]))[:, None, None]
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0) @ vv


@st.composite
def attention_inputs(draw, max_len=260):
    """q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D] with Lq <= Lk, and per-row key ranges (or None)."""
    batch, kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    k_len = draw(st.integers(1, max_len))
    q_len = draw(st.integers(1, k_len))
    dim = draw(st.sampled_from([8, 16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(batch, kv_heads * group, q_len, dim, generator=g) * 2
    k, v = (torch.randn(batch, kv_heads, k_len, dim, generator=g) for _ in range(2))
    key_range = None
    if draw(st.booleans()):
        starts = [draw(st.integers(0, k_len)) for _ in range(batch)]
        key_range = torch.tensor([[s, draw(st.integers(s, k_len))] for s in starts], dtype=torch.int32)
    return q, k, v, key_range


@FEW
@given(inputs=attention_inputs(), softcap=st.sampled_from([None, 10.0]), block_size=st.sampled_from([64, 128]))
def test_gamma_one_sparse_attention_is_dense(inputs, softcap, block_size):
    q, k, v, key_range = inputs
    config = SparsePrefillConfig(block_size=block_size, gamma=1.0, min_budget_tokens=0, min_seq_len=0)
    out = sparse_attention(q, k, v, config, key_range=key_range, softcap=softcap)
    assert torch.allclose(out.double(), dense_reference(q, k, v, key_range, softcap=softcap), atol=1e-5)


@FEW
@given(inputs=attention_inputs(), gamma=st.floats(0.05, 0.99), budget=st.sampled_from([0, 64, 256]),
       sink=st.integers(0, 2), local=st.integers(0, 2), stride=st.sampled_from([1, 4, 16]))
def test_any_budget_is_finite_bounded_and_uses_the_layout_it_reports(inputs, gamma, budget, sink, local, stride):
    q, k, v, key_range = inputs
    config = SparsePrefillConfig(block_size=64, gamma=gamma, min_budget_tokens=budget, sink_blocks=sink,
                                 local_blocks=local, stride=stride, min_seq_len=0)
    out, layout = sparse_attention(q, k, v, config, key_range=key_range, return_layout=True)
    assert torch.isfinite(out).all() and out.abs().max() <= v.abs().max() + 1e-5  # a convex mix of values
    assert torch.equal(out, block_sparse_attention(q, k, v, layout, key_range=key_range))
    # Every query block keeps its diagonal block, so no row with a visible key loses all of them.
    live = dense_reference(q, k, v, key_range).abs().sum(-1) > 0
    assert (out.abs().sum(-1) > 0)[live].all()


@st.composite
def padded_attention_call(draw):
    """A padded (and possibly chunked) batch as transformers hands it to the attention function."""
    batch, kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    k_len = draw(st.integers(64, 260))
    q_len = draw(st.integers(64, k_len))
    ranges = []
    for _ in range(batch):
        length = draw(st.integers(0, k_len))
        start = k_len - length if draw(st.booleans()) or q_len < k_len else 0  # left; right only unchunked
        ranges.append((start, start + length))
    ranges[draw(st.integers(0, batch - 1))] = (0, k_len)  # the longest prompt sets the padded length
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(batch, kv_heads * group, q_len, 16, generator=g) * 2
    k, v = (torch.randn(batch, kv_heads, k_len, 16, generator=g) for _ in range(2))
    return q, k, v, torch.tensor(ranges, dtype=torch.int32), draw(st.sampled_from(["sdpa", "eager"]))


def transformers_mask(previous, q_len, key_range, k_len):
    cols = torch.arange(k_len)
    padding = (cols >= key_range[:, :1]) & (cols < key_range[:, 1:])
    args = dict(batch_size=key_range.shape[0], q_length=q_len, kv_length=k_len, q_offset=k_len - q_len,
                attention_mask=padding)
    return sdpa_mask(**args, allow_is_causal_skip=False) if previous == "sdpa" else eager_mask(**args)


def run_patched(previous, q, k, v, mask, config):
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, q.shape[1] // k.shape[1]
    glue._CONFIGS[module] = config
    out, _ = ALL_ATTENTION_FUNCTIONS[glue._register(previous)](module, q, k, v, mask, scaling=0.3)
    return out.transpose(1, 2)


@FEW
@given(call=padded_attention_call(), gamma=st.sampled_from([1.0, 0.4]))
def test_patched_attention_on_padded_batches_equals_each_row_alone(call, gamma):
    q, k, v, key_range, previous = call
    q_len, k_len = q.shape[2], k.shape[2]
    config = SparsePrefillConfig(block_size=64, gamma=gamma, min_budget_tokens=0, min_seq_len=0)
    out = run_patched(previous, q, k, v, transformers_mask(previous, q_len, key_range, k_len), config)
    want = dense_reference(q, k, v, key_range, scale=0.3)
    for b, (start, end) in enumerate(key_range.tolist()):
        first = max(start - (k_len - q_len), 0)  # the row's real queries are [first, end - offset)
        stop = end - (k_len - q_len)
        if stop <= first:
            continue
        got = out[b:b + 1, :, first:stop]
        if gamma == 1.0 or stop - first < config.block_size:  # exact, or a row too short to go sparse alone
            assert torch.allclose(got.double(), want[b:b + 1, :, first:stop], atol=1e-5)
        else:
            alone = sparse_attention(q[b:b + 1, :, first:stop], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end],
                                     config, scale=0.3)
            assert torch.allclose(got, alone, atol=1e-6)
