"""Memory layout never changes a result: every public entry point, given permuted, sliced, transposed or
non-unit-last-stride views of the same values, returns what it returns for the contiguous tensors.

The fused selection once read the head dimension as if its stride were 1: a q or k whose head dimension
was strided gave other block masses and layouts, with no error. The Triton kernels (fused selection and
attention) run here through the interpreter (conftest.py).
"""

import functools

import pytest
import torch

from sparse_prefill import SparsePrefillConfig, block_sparse_attention, select_blocks, sparse_attention
from sparse_prefill.kernels import triton_attention as ta
from sparse_prefill.kernels.reference import block_sparse_attention_reference
from sparse_prefill.selection import fused, select_blocks_fused
from sparse_prefill.selection.estimate import BlockScores
from sparse_prefill.selection.fused_policy import choose_blocks_fused


def view_as(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of x [B, H, L, D] in another memory layout."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "transposed":  # [B, L, H, D] storage: what transformers hands over (last stride 1)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "head-dim-strided":  # [B, H, D, L] storage: last stride L
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "sliced":  # every other element of a wider head dim, at an offset: last stride 2
        wide = torch.full((*x.shape[:3], 2 * x.shape[3] + 1), float("nan"), dtype=x.dtype)
        wide[..., 1::2] = x
        return wide[..., 1::2]
    if kind == "permuted":  # [D, L, H, B] storage: every stride differs from the contiguous one
        return x.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    raise ValueError(kind)


KINDS = ["transposed", "head-dim-strided", "sliced", "permuted"]
CFG = SparsePrefillConfig(block_size=64, stride=4, gamma=0.6, min_budget_tokens=0, sink_blocks=0, local_blocks=0,
                          exact_tail_tokens=0, question_blocks=0)  # only coverage decides: masses show


def structured_qkv(seed=0, batch=1, hq=2, hkv=1, length=256, dim=64):
    """Attention with structure (spans every later query reads), so a misread head dim moves the masses."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, length, dim, generator=g) * 0.5
    k = torch.randn(batch, hkv, length, dim, generator=g) * 0.5
    v = torch.randn(batch, hkv, length, dim, generator=g)
    for start in (20, 130):
        topic = torch.randn(dim, generator=g)
        k[:, :, start:start + 8] += 2 * topic
        q[:, :, start + 8:] += topic * torch.linspace(0.2, 1.5, hq)[:, None, None]
    return q, k, v


def key_range_view():
    """[[5, 250]] stored as a column of a wider tensor: a key range with a non-unit last stride."""
    return torch.tensor([[5, -1], [250, -1]])[:, :1].T


def assert_same_layout(got, want):
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)


@functools.cache
def fused_on_contiguous():
    """The fused selection's masses and layout on contiguous inputs (computed once for every view)."""
    q, k, _ = structured_qkv()
    kr = key_range_view().contiguous()
    layout = select_blocks_fused(q, k, CFG, key_range=kr)
    assert layout.density(q.shape[2], k.shape[2]) < 0.9  # sparse: coverage decided, so masses show
    return (fused.estimate_block_scores_fused(q, k, CFG, key_range=kr).mass,
            fused.last_block_mass_fused(q, k, CFG, key_range=kr), layout)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_selection_reads_any_strides(kind):
    q, k, _ = structured_qkv()
    kr = key_range_view()
    qv, kv = view_as(q, kind), view_as(k, kind)
    mass, last_mass, layout = fused_on_contiguous()
    torch.testing.assert_close(fused.estimate_block_scores_fused(qv, kv, CFG, key_range=kr).mass, mass,
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.last_block_mass_fused(qv, kv, CFG, key_range=kr), last_mass,
                               rtol=1e-6, atol=1e-7)
    assert_same_layout(select_blocks_fused(qv, kv, CFG, key_range=kr), layout)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_attention_reads_any_strides(kind):
    q, k, v = structured_qkv(seed=1)
    layout = select_blocks(q, k, CFG)
    kr = key_range_view()
    views = [view_as(t, kind) for t in (q, k, v)]
    out, lse = ta.triton_block_sparse_attention(*views, layout, return_lse=True, key_range=kr)
    want, want_lse = ta.triton_block_sparse_attention(q, k, v, layout, return_lse=True, key_range=kr)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    # The output takes q's layout where q is dense (empty_like), else a contiguous one.
    assert out.stride() == (views[0].stride() if kind != "sliced" else q.stride())


@pytest.mark.parametrize("kind", KINDS)
def test_torch_paths_read_any_strides(kind):
    """sparse_attention, select_blocks (torch backend), block_sparse_attention and the reference."""
    q, k, v = structured_qkv(seed=2, batch=2, hq=4, hkv=2)
    kr = torch.tensor([[0, 256], [40, 230]]).T.contiguous().T  # column-major [B, 2]
    views = [view_as(t, kind) for t in (q, k, v)]
    cfg = CFG.replace(backend="torch")
    assert_same_layout(select_blocks(*views[:2], cfg, key_range=kr), select_blocks(q, k, cfg, key_range=kr))
    out, layout = sparse_attention(*views, cfg, key_range=kr, return_layout=True)
    want, want_layout = sparse_attention(q, k, v, cfg, key_range=kr, return_layout=True)
    assert_same_layout(layout, want_layout)
    assert layout.density(256, 256) < 0.9
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for attend in (block_sparse_attention, block_sparse_attention_reference):
        torch.testing.assert_close(attend(*views, layout, key_range=kr, softcap=5.0),
                                   attend(q, k, v, layout, key_range=kr, softcap=5.0), rtol=1e-5, atol=1e-6)


def test_policy_kernel_reads_caller_masses_of_any_layout():
    """fused_policy's kernels index the block-level masses as contiguous rows: choose_blocks_fused makes the
    caller's tensors contiguous first (the rest it reads, it allocates itself)."""
    mass, last_mass, layout = fused_on_contiguous()
    lq = 256  # structured_qkv's length
    strided_mass = mass.transpose(-1, -2).contiguous().transpose(-1, -2)
    strided_last = torch.stack([last_mass, last_mass], -1).flatten(-2)[..., ::2]
    assert not strided_mass.is_contiguous() and not strided_last.is_contiguous()
    scores = BlockScores(score=strided_mass, mass=strided_mass, heads_per_proxy=1)
    assert_same_layout(choose_blocks_fused(scores, strided_last, CFG, lq, lq), layout)
