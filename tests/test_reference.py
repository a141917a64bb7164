"""The PyTorch reference attention against dense attention with an explicit token mask."""

import math

import pytest
import torch

from sparse_prefill import BlockLayout, block_sparse_attention, sparse_attention
from sparse_prefill.kernels import reference
from sparse_prefill.layout import causal_block_limits


def dense_masked(q, k, v, token_mask, scale=None, softcap=None):
    """Plain float64 attention with a [B, H, Lq, Lk] bool mask; returns output and lse."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~token_mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def causal_token_mask(b, h, lq, lk):
    rows = torch.arange(lq)[:, None] + lk - lq
    return (torch.arange(lk)[None] <= rows).expand(b, h, lq, lk)


def inputs(b, hq, hkv, lq, lk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for h, n in ((hq, lq), (hkv, lk), (hkv, lk))]


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d", [(1, 4, 4, 200, 200, 16), (2, 6, 2, 130, 333, 8),
                                                    (1, 8, 1, 1, 90, 16)])
def test_dense_reference_matches_causal_attention(b, hq, hkv, lq, lk, d, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK", 64)  # exercise the online softmax across chunks
    q, k, v = inputs(b, hq, hkv, lq, lk, d)
    out, lse = block_sparse_attention(q, k, v, None, return_lse=True)
    want, want_lse = dense_masked(q, k, v, causal_token_mask(b, hq, lq, lk))
    assert torch.allclose(out.double(), want, atol=1e-5)
    assert torch.allclose(lse.double(), want_lse, atol=1e-5)


def test_layout_restricts_attention_to_kept_blocks(monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK", 64)
    b, hq, hkv, lq, lk, bs = 2, 4, 2, 150, 300, 64
    q, k, v = inputs(b, hq, hkv, lq, lk, 16, seed=3)
    nqb, nkb = -(-lq // bs), -(-lk // bs)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(b, hq, nqb, nkb, generator=g) < 0.5
    mask &= torch.arange(nkb) < causal_block_limits(nqb, bs, lq, lk)[:, None]
    mask[0, 1, 0] = False  # an empty row: zero output, -inf lse
    layout = BlockLayout.from_mask(mask, bs)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, softcap=5.0, scale=0.3)
    tokens = mask[:, :, torch.arange(lq) // bs][..., torch.arange(lk) // bs] & causal_token_mask(b, hq, lq, lk)
    want, want_lse = dense_masked(q, k, v, tokens, scale=0.3, softcap=5.0)
    assert torch.allclose(out.double(), want.nan_to_num(0.0), atol=1e-5)
    assert (out[0, 1, :bs] == 0).all() and torch.isinf(lse[0, 1, :bs]).all()
    live = ~torch.isinf(want_lse)
    assert torch.allclose(lse.double()[live], want_lse[live], atol=1e-5)


def test_key_range_masks_padding():
    q, k, v = inputs(2, 2, 1, 100, 100, 8, seed=5)
    key_range = torch.tensor([[30, 100], [0, 70]], dtype=torch.int32)
    out = block_sparse_attention(q, k, v, None, key_range=key_range)
    cols = torch.arange(100)
    inside = (cols >= key_range[:, :1]) & (cols < key_range[:, 1:])
    want, _ = dense_masked(q, k, v, causal_token_mask(2, 2, 100, 100) & inside[:, None, None])
    assert torch.allclose(out.double(), want.nan_to_num(0.0), atol=1e-5)
    assert (out[0, :, :30] == 0).all()  # queries that see no valid key


def test_sparse_attention_with_gamma_one_is_dense_and_fp16_works():
    q, k, v = inputs(1, 4, 2, 300, 300, 16, seed=7)
    from sparse_prefill import SparsePrefillConfig

    cfg = SparsePrefillConfig(block_size=64, gamma=1.0, min_budget_tokens=0, min_seq_len=0)
    out, layout = sparse_attention(q, k, v, cfg, return_layout=True)
    want, _ = dense_masked(q, k, v, causal_token_mask(1, 4, 300, 300))
    assert torch.allclose(out.double(), want, atol=1e-5) and layout.density(300, 300) == 1.0
    out16 = sparse_attention(q.half(), k.half(), v.half(), cfg.replace(gamma=0.5))
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()


@pytest.mark.parametrize("shapes, match", [
    (((1, 4, 10, 8), (1, 3, 10, 8), (1, 3, 10, 8)), "multiple"),
    (((1, 4, 20, 8), (1, 2, 10, 8), (1, 2, 10, 8)), "more queries"),
    (((1, 4, 10, 8), (1, 2, 10, 8), (1, 2, 11, 8)), "same shape"),
    (((4, 10, 8), (2, 10, 8), (2, 10, 8)), "4-D"),
])
def test_bad_shapes_are_refused(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, None)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kwargs, match", [(dict(scale=0.0), "scale must be positive"),
                                           (dict(softcap=-1.0), "softcap must be positive"),
                                           (dict(key_range=torch.tensor([[0.0, 64.0]])), "integer tensor"),
                                           (dict(layout=BlockLayout.from_mask(torch.ones(1, 4, 2, 2, dtype=torch.bool),
                                                                             64)), "does not fit")])
def test_every_backend_refuses_a_bad_call_alike(backend, kwargs, match):
    """The call is stated and validated once (kernels/call.py): the reference and the Triton kernel called
    directly refuse the same bad arguments with the same error."""
    from sparse_prefill.kernels.triton_attention import triton_block_sparse_attention

    q, k, v = inputs(1, 2, 1, 64, 64, 64, seed=9)
    attend = reference.block_sparse_attention_reference if backend == "torch" else triton_block_sparse_attention
    with pytest.raises(ValueError, match=match):
        attend(q, k, v, **kwargs)
    rest = {name: value for name, value in kwargs.items() if name != "layout"}
    with pytest.raises(ValueError, match=match):  # and the dispatcher, before choosing a backend
        block_sparse_attention(q, k, v, kwargs.get("layout"), backend="torch", **rest)
