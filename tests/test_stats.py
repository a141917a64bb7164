"""`sparse_prefill.record` / `log_prefills`: what the sparse path did, per call and per prompt, read from the layouts
it used and with no host synchronisation added to a forward."""

import pytest
import torch
from model_zoo import tiny_model
from test_serving import (  # noqa: F401 - the fixtures continuous batching needs on a CPU
    cpu_memory_for_the_paged_cache,
    dense_batching_runs,
    generate_batch,
    needs_cb,
    prompts,
)
from torch.overrides import TorchFunctionMode

import sparse_prefill
from sparse_prefill import SparsePrefillConfig, patch_model, unpatch_model
from sparse_prefill.layout import causal_block_limits
from sparse_prefill.stats import causal_blocks

CONFIG = SparsePrefillConfig(block_size=64, gamma=0.5, min_budget_tokens=0, min_seq_len=256, local_blocks=0,
                             exact_tail_tokens=64, question_blocks=1)


@pytest.fixture
def layouts(monkeypatch):
    """Every layout the sparse path attends, with its queries and keys."""
    from sparse_prefill import attention

    seen, original = [], attention.select_blocks

    def select(q, k, *args, **kwargs):
        layout = original(q, k, *args, **kwargs)
        seen.append((q.shape[2], k.shape[2], layout))
        return layout

    monkeypatch.setattr(attention, "select_blocks", select)
    return seen


def generate(model, length, seed=0, tokens=3):
    ids = torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False)


def test_each_prefill_call_is_recorded_with_the_blocks_its_layout_kept_and_why_short_ones_stayed_dense(layouts):
    model = patch_model(tiny_model("llama"), CONFIG)
    with sparse_prefill.record(model) as stats:
        generate(model, 600)
        generate(model, 100, seed=1)
    unpatch_model(model)
    sparse = [c for c in stats.calls if c.sparse]
    assert [(c.queries, c.keys) for c in sparse] == [(600, 600)] * 2  # one per layer; decode steps are no prefill
    assert [c.layer for c in sparse] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for call, (q_len, k_len, layout) in zip(sparse, layouts, strict=True):
        limits = causal_block_limits(layout.counts.shape[-1], 64, q_len, k_len)
        assert call.kept_blocks == int(layout.counts.sum())
        assert call.causal_blocks == int(limits.sum()) * 4  # 4 query heads
        assert call.density == pytest.approx(layout.density(q_len, k_len))
    assert 0 < sparse[0].density < 1, "gamma 0.5 must drop blocks"
    dense = [c for c in stats.calls if not c.sparse]
    assert [(c.queries, c.keys) for c in dense] == [(100, 100)] * 2
    assert all("min_seq_len (256 keys)" in c.reason for c in dense)
    summary = stats.summary()
    assert summary["kept_blocks"] == sum(c.kept_blocks for c in sparse)
    assert summary["attention_saved"] == pytest.approx(1 - summary["kept_blocks"] / summary["causal_blocks"])
    assert set(summary["density_by_layer"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert [(p.tokens, p.sparse_layers, p.layers) for p in stats.prompts()] == [(600, 2, 2), (100, 0, 2)]
    text = str(stats)
    assert "4 (2 sparse, 2 dense)" in text and "min_seq_len" in text and "attention saved" in text


def test_reasons_are_the_glues_own(recwarn):
    model = patch_model(tiny_model("llama"), CONFIG)
    with sparse_prefill.record(model) as stats:
        ids = torch.randint(3, 128, (1, 600))
        with torch.no_grad():
            model(ids, output_attentions=True)
    unpatch_model(model)
    assert {c.reason for c in stats.calls} == {"output_attentions=True (the sparse path computes no attention weights)"}


def test_calls_outside_the_recorded_model_and_after_the_block_are_not_recorded():
    recorded, other = patch_model(tiny_model("llama"), CONFIG), patch_model(tiny_model("llama", seed=1), CONFIG)
    with sparse_prefill.record(recorded) as stats:
        generate(other, 600)
    generate(recorded, 600)
    assert stats.calls == [] and not sparse_prefill.stats.RECORDERS
    unpatch_model(recorded)
    unpatch_model(other)


class HostReads(TorchFunctionMode):
    """Counts what reads a tensor's values on the host (on a GPU each waits for the device)."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES or (name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_recording_adds_no_host_read_to_a_forward():
    model = patch_model(tiny_model("llama"), CONFIG)
    ids = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(0))

    def reads():
        with torch.no_grad(), HostReads() as mode:
            model(ids)
        return mode.reads

    plain = reads()
    with sparse_prefill.record(model) as stats:
        recorded = reads()
    unpatch_model(model)
    assert sorted(recorded) == sorted(plain) and len(stats.calls) == 2


@needs_cb
def test_a_prompt_prefilled_in_chunks_is_followed_to_its_end_and_logged_once(monkeypatch):
    model = patch_model(tiny_model("llama"), CONFIG)
    lines = []
    logger = sparse_prefill.log_prefills(model, write=lines.append, min_tokens=256)
    try:
        with sparse_prefill.record(model) as stats:
            generate_batch(model, prompts((700, 40, 300)), max_batch_tokens=256)
    finally:
        sparse_prefill.stats.stop_logging(logger)
    unpatch_model(model)
    ended = {p.tokens: p for p in stats.prompts()}
    assert ended[700].queries == 700 and ended[700].sparse_layers == 2 and ended[300].sparse_layers == 2
    assert ended[40].sparse_layers == 0
    chunks = sorted({(c.keys - c.queries, c.keys, c.last_chunk) for c in ended[700].calls})
    assert [end for _, end, _ in chunks[:-1]] == [start for start, _, _ in chunks[1:]]  # one chain, 0 to 700
    assert chunks[0][0] == 0 and chunks[-1][1:] == (700, True) and not any(last for *_, last in chunks[:-1])
    assert sorted(lines) == sorted(ended[n].line() for n in (300, 700))  # the 40-token prompt is under min_tokens
    assert all("sparse in 2 of 2 layers, kept" in line and "prefill" in line for line in lines)


def test_causal_blocks_in_closed_form_match_the_layouts_limits():
    for q_len, k_len, block in ((1, 1, 64), (64, 64, 64), (65, 300, 64), (300, 300, 128), (129, 2049, 128)):
        limits = causal_block_limits(-(-q_len // block), block, q_len, k_len)
        assert causal_blocks(q_len, k_len, block) == int(limits.sum())


def test_is_patched_is_public():
    model = tiny_model("llama")
    assert not sparse_prefill.is_patched(model)
    patch_model(model, CONFIG)
    assert sparse_prefill.is_patched(model)
    unpatch_model(model)
    assert not sparse_prefill.is_patched(model)
