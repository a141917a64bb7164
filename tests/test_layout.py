import pytest
import torch

from sparse_prefill import BlockLayout
from sparse_prefill.layout import causal_block_limits


def random_causal_mask(b, h, nq, nk, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, nq, nk, generator=g) < p
    limits = causal_block_limits(nq, 64, nq * 64, nk * 64)
    return mask & (torch.arange(nk) < limits[:, None])


def test_from_mask_round_trips_and_is_sorted_padded():
    mask = random_causal_mask(2, 3, 6, 6, 0.5, 0)
    mask[0, 0, 2] = False  # an empty row
    layout = BlockLayout.from_mask(mask, 64)
    assert torch.equal(layout.to_mask(), mask)
    assert layout.counts.dtype == torch.int32 and layout.indices.dtype == torch.int32
    assert layout.counts[0, 0, 2] == 0 and (layout.indices[0, 0, 2] == -1).all()
    for b, h, i in [(1, 2, 5), (0, 1, 3)]:
        row = layout.indices[b, h, i, : layout.counts[b, h, i]]
        assert torch.equal(row, row.sort().values) and row.unique().numel() == row.numel()
        assert (layout.indices[b, h, i, layout.counts[b, h, i]:] == -1).all()
    assert layout.indices.shape[-1] == int(mask.sum(-1).max())


def test_fixed_width_and_worked_example():
    mask = torch.tensor([[[[1, 0, 0], [1, 1, 0], [1, 0, 1]]]], dtype=torch.bool)
    layout = BlockLayout.from_mask(mask, 128, max_count=3)
    assert layout.counts.tolist() == [[[1, 2, 2]]]
    assert layout.indices.tolist() == [[[[0, -1, -1], [0, 1, -1], [0, 2, -1]]]]
    assert layout.to_string() == "#  \n## \n#.#"
    assert "q_blocks=3" in repr(layout)


def test_density_counts_causal_blocks_only():
    full = torch.ones(1, 2, 4, 4, dtype=torch.bool).tril()
    assert BlockLayout.from_mask(full, 64).density() == pytest.approx(1.0)
    diag = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4).contiguous()
    assert BlockLayout.from_mask(diag, 64).density() == pytest.approx(4 / 10)


def test_causal_limits_with_query_offset():
    # 100 queries ending at key 299 (offset 200), blocks of 64: rows 0-63 -> keys <= 263, rows 64-99 -> <= 299
    assert causal_block_limits(2, 64, 100, 300).tolist() == [5, 5]
    assert causal_block_limits(3, 64, 130, 130).tolist() == [1, 2, 3]


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="int32"):
        BlockLayout(torch.zeros(1, 1, 2, dtype=torch.int64), torch.zeros(1, 1, 2, 1, dtype=torch.int32), 64, 2)
    with pytest.raises(ValueError, match="bool mask"):
        BlockLayout.from_mask(torch.ones(1, 1, 2, 2), 64)
