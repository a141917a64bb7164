"""Robustness of the patched path: hybrid and sliding-window models, device placement, dtypes and modes,
bad input, and numerical safety. CPU only, tiny random-weight models."""

import types
import warnings

import pytest
import torch
import transformers
from model_zoo import tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers_masks import sdpa_mask

from sparse_prefill import (
    BlockLayout,
    SparsePrefillConfig,
    block_sparse_attention,
    patch_model,
    sparse_attention,
    unpatch_model,
)
from sparse_prefill.kernels.interpreter import interpreting
from sparse_prefill.notices import forget_warnings
from sparse_prefill.patches import SparsePrefillWarning
from sparse_prefill.patches import transformers_attention as glue

EXACT = SparsePrefillConfig(block_size=64, gamma=1.0, min_budget_tokens=0, min_seq_len=0)
TIGHT = SparsePrefillConfig(block_size=64, gamma=0.3, min_budget_tokens=0, min_seq_len=0, local_blocks=0,
                            exact_tail_tokens=0, question_blocks=0)  # short test prompts: keep rows sparse
PROMPT = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(3))


def logits(model, ids=PROMPT, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def forward_recording(model, monkeypatch, **kwargs):
    """(logits, {layer_idx: ran sparse?}, SparsePrefillWarnings) of one forward."""
    ran = {}
    inner = glue._sparse_prefill

    def spy(previous, module, *args):
        out = inner(previous, module, *args)
        ran[module.layer_idx] = out is not None
        return out

    monkeypatch.setattr(glue, "_sparse_prefill", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = logits(model, **kwargs)
    monkeypatch.setattr(glue, "_sparse_prefill", inner)
    return out, ran, [str(w.message) for w in caught if w.category is SparsePrefillWarning]


def gemma3(**overrides):
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


HYBRIDS = {
    # name: (model factory, which layers must run sparse for a 300-token prompt)
    "mistral-window-96": (lambda: tiny_model("mistral", sliding_window=96), {0: False, 1: False}),
    "mistral-window-4096": (lambda: tiny_model("mistral", sliding_window=4096), {0: True, 1: True}),
    "qwen2-full-sliding": (lambda: tiny_model("qwen2", use_sliding_window=True, sliding_window=96,
                                              layer_types=["full_attention", "sliding_attention"]),
                           {0: True, 1: False}),
    "gemma2-softcap": (lambda: tiny_model("gemma2", sliding_window=96), {0: False, 1: True}),
    "gemma3-local-global": (lambda: gemma3(sliding_window=96, layer_types=["sliding_attention", "full_attention"]),
                            {0: False, 1: True}),
}


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_windowed_layers_stay_exact_and_global_layers_go_sparse(name, monkeypatch):
    make, want_sparse = HYBRIDS[name]
    model = make()
    dense = logits(model)
    patch_model(model, EXACT)
    exact, ran, warned = forward_recording(model, monkeypatch)
    assert ran == want_sparse
    assert torch.allclose(exact, dense, atol=3e-5), (exact - dense).abs().max()
    assert any("sliding-window" in w for w in warned) == (not all(want_sparse.values()))
    patch_model(model, TIGHT)
    tight, ran, _ = forward_recording(model, monkeypatch)
    assert ran == want_sparse and torch.isfinite(tight).all()
    if any(want_sparse.values()):
        assert (tight - dense).abs().max() > 1e-3
    else:
        assert torch.equal(tight, dense), "an all-windowed model must be bit-identical to dense"


def test_each_dense_reason_is_warned_once(monkeypatch):
    model = tiny_model("mistral", sliding_window=96)
    patch_model(model, TIGHT)
    _, _, first = forward_recording(model, monkeypatch)
    _, _, second = forward_recording(model, monkeypatch)
    assert len(first) == 1 and second == []


# ---------------------------------------------------------------------------------------------
# Device placement: nothing in the sparse path may allocate on a default or other device
# ---------------------------------------------------------------------------------------------

def test_a_stray_allocation_is_caught_by_the_placement_harness():
    x = torch.ones(3)
    with torch.device("meta"), pytest.raises(RuntimeError, match="device"):
        x + torch.arange(3)  # arange without device= lands on meta


def attention_call(previous="sdpa", config=EXACT, is_causal=True, groups=2):
    """The registered attention function and a stand-in attention module configured with `config`."""
    module = torch.nn.Module()
    module.is_causal, module.layer_idx, module.num_key_value_groups = is_causal, 0, groups
    glue._CONFIGS[module] = config
    return ALL_ATTENTION_FUNCTIONS[glue._register(previous)], module


def test_sparse_path_allocates_only_on_the_inputs_device():
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 4, 200, 16, generator=g), torch.randn(2, 2, 200, 16, generator=g), torch.randn(
        2, 2, 200, 16, generator=g)
    padding = torch.ones(2, 200, dtype=torch.bool)
    padding[1, :70] = False
    mask = sdpa_mask(batch_size=2, q_length=200, kv_length=200, attention_mask=padding, allow_is_causal_skip=False)
    attention, module = attention_call(config=TIGHT)
    key_range = torch.tensor([[0, 200], [70, 200]], dtype=torch.int32)
    with torch.device("meta"):  # every tensor made without device= would be on meta and fail to mix with q's
        padded, _ = attention(module, q, k, v, mask, scaling=0.25)
        plain, _ = attention(module, q, k, v, None, scaling=0.25)
        direct = sparse_attention(q, k, v, TIGHT, key_range=key_range)
        out, lse = block_sparse_attention(q, k, v, None, return_lse=True, key_range=key_range)
    for t in (padded, plain, direct, out, lse):
        assert t.device == q.device and not t.isnan().any()


def test_triton_wrapper_allocates_only_on_the_inputs_device():
    triton_attention = pytest.importorskip("sparse_prefill.kernels.triton_attention")
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, h, 128, 64, generator=g).half() for h in (2, 1, 1))
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]).expand(1, 2, 2, 2).contiguous(), 64)
    key_range = torch.tensor([[10, 128]], dtype=torch.int32)
    with torch.device("meta"):
        out = triton_attention.triton_block_sparse_attention(q, k, v, layout, key_range=key_range)
    want = block_sparse_attention(q.float(), k.float(), v.float(), layout, key_range=key_range)
    assert out.device == q.device and torch.allclose(out.float(), want, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Dtypes and modes
# ---------------------------------------------------------------------------------------------

def stub(device_type, dtype, shape):
    """Just enough of a tensor for the dense/sparse decision (no CUDA here)."""
    return types.SimpleNamespace(shape=shape, is_cuda=device_type == "cuda", dtype=dtype, requires_grad=False)


@pytest.mark.parametrize("device_type, dtype, head_dim, reason", [
    ("cuda", torch.float32, 64, "dtype torch.float32"),
    ("cuda", torch.float16, 32, "head_dim 32"),
    ("cuda", torch.bfloat16, 128, None),
    ("cpu", torch.float32, 32, None),  # off CUDA the PyTorch reference runs any dtype and head_dim
])
def test_dtype_and_head_dim_decide_between_kernel_and_dense(device_type, dtype, head_dim, reason):
    q = stub(device_type, dtype, (1, 4, 4096, head_dim))
    kv = stub(device_type, dtype, (1, 2, 4096, head_dim))
    module = types.SimpleNamespace(is_causal=True, training=False)
    got, loud = glue._dense_reason("sdpa", module, q, kv, kv, None, 0.0, {}, EXACT)
    assert (got is None) if reason is None else (reason in got and loud)


def test_a_triton_too_old_for_the_kernels_goes_dense_with_a_reason(monkeypatch):
    """Tensor descriptors arrived in Triton 3.4: an older Triton must not crash the first long prefill."""
    import triton

    from sparse_prefill.kernels import support

    support.triton_version_ok.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    try:
        assert not support.triton_version_ok()
        q = stub("cuda", torch.bfloat16, (1, 4, 4096, 128))
        kv = stub("cuda", torch.bfloat16, (1, 2, 4096, 128))
        module = types.SimpleNamespace(is_causal=True, training=False)
        reason, loud = glue._dense_reason("sdpa", module, q, kv, kv, None, 0.0, {}, EXACT)
        assert "Triton older than 3.4" in reason and loud
    finally:
        monkeypatch.undo()
        support.triton_version_ok.cache_clear()
    assert support.triton_version_ok()  # the installed one is new enough


def test_transposed_inputs_are_told_the_expected_layout():
    q, k, v = bad(q=(1, 128, 4, 16), k=(1, 128, 2, 16), v=(1, 128, 2, 16))  # [B, L, H, D] from a projection
    with pytest.raises(ValueError, match=r"heads before length.*transpose\(1, 2\)"):
        sparse_attention(q, k, v)


def test_sparse_attention_takes_a_dict_config():
    q, k, v = bad(q=(1, 4, 256, 16), k=(1, 2, 256, 16), v=(1, 2, 256, 16))
    got = sparse_attention(q, k, v, {"gamma": 0.9, "block_size": 64, "min_budget_tokens": 0})
    want = sparse_attention(q, k, v, SparsePrefillConfig(gamma=0.9, block_size=64, min_budget_tokens=0))
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="SparsePrefillConfig"):
        sparse_attention(q, k, v, 0.9)


def test_half_precision_models_on_cpu():
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_model("llama").to(dtype)
        dense = logits(model).float()
        patch_model(model, EXACT)
        exact = logits(model).float()
        assert torch.isfinite(exact).all() and (exact - dense).abs().max() < 0.05, dtype


def test_output_attentions_goes_dense_with_a_warning(monkeypatch):
    model = tiny_model("llama", attn_implementation="eager")
    want = model(PROMPT, output_attentions=True).attentions
    patch_model(model, EXACT)
    out, ran, warned = forward_recording(model, monkeypatch, output_attentions=True)
    assert ran == {0: False, 1: False} and len(warned) == 1 and "output_attentions" in warned[0]
    # Set in the config, transformers collects the weights through hooks without telling the attention function.
    model = tiny_model("llama", attn_implementation="eager", output_attentions=True)
    patch_model(model, EXACT)
    with pytest.warns(SparsePrefillWarning, match="output_attentions"):
        got = model(PROMPT).attentions
    assert len(got) == 2 and all(torch.allclose(a, b) for a, b in zip(got, want, strict=True))


def test_calls_that_need_gradients_go_dense_so_backward_is_exact(monkeypatch):
    model = tiny_model("llama")
    model(PROMPT).logits.square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    patch_model(model, TIGHT)
    with pytest.warns(SparsePrefillWarning, match="gradients"):
        model(PROMPT).logits.square().mean().backward()
    assert all(torch.allclose(p.grad, w, atol=1e-6) for p, w in zip(model.parameters(), want, strict=True))
    _, ran, _ = forward_recording(model, monkeypatch)  # under no_grad the same model runs sparse
    assert ran == {0: True, 1: True}


def test_torch_compile_runs_sparse_prefill_eagerly_and_traces_decode_fully():
    attention, module = attention_call()
    g = torch.Generator().manual_seed(10)
    q, k, v = torch.randn(1, 4, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g), torch.randn(
        1, 2, 200, 16, generator=g)

    def attend(q, k, v):
        return attention(module, q, k, v, None, scaling=0.25)[0]

    torch._dynamo.reset()
    prefill = torch.compile(attend, backend="eager")(q, k, v)
    assert torch.allclose(prefill, attend(q, k, v), atol=1e-6)
    decode = torch.compile(attend, backend="eager", fullgraph=True)(q[:, :, -1:], k, v)  # no graph break allowed
    assert torch.allclose(decode, attend(q[:, :, -1:], k, v), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, or exact dense with a warning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, words", [
    (lambda: transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=128)),
     NotImplementedError, ("BertModel", "causal")),
    (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=64, d_ff=64, d_kv=32, num_layers=1, num_heads=2, vocab_size=128)),
     NotImplementedError, ("T5ForConditionalGeneration", "encoder-decoder")),
    (lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
        hidden_size=64, n_layer=1, n_head=2, vocab_size=128)),
     NotImplementedError, ("BloomForCausalLM", "AttentionInterface")),
    (lambda: tiny_model("llama", attn_implementation="flex_attention"), ValueError, ("flex_attention", "sdpa")),
])
def test_models_the_sparse_path_cannot_serve_are_refused(make, error, words):
    with pytest.raises(error) as err:
        patch_model(make())
    assert all(w in str(err.value) for w in words)


def test_a_causal_bert_decoder_and_a_dynamically_quantized_model_work():
    bert = transformers.BertLMHeadModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=128,
        is_decoder=True)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's int8 dynamic quantization is deprecated upstream
        quantized = torch.ao.quantization.quantize_dynamic(tiny_model("llama"), {torch.nn.Linear}, dtype=torch.qint8)
    for model in (bert, quantized):  # the attention only ever sees dequantized activations
        dense = logits(model)
        patch_model(model, EXACT)
        assert torch.allclose(logits(model), dense, atol=3e-5)
        patch_model(model, TIGHT)
        assert (logits(model) - dense).abs().max() > 1e-4
        unpatch_model(model)


@pytest.mark.parametrize("kwargs, module_causal, reason", [
    ({}, False, "non-causal"),
    ({"is_causal": False}, True, "non-causal"),
    ({"position_bias": torch.zeros(1)}, True, "position_bias"),
    ({"value_dim": 8}, True, "head_dim 8"),
])
def test_calls_the_sparse_path_cannot_do_exactly_go_dense(kwargs, module_causal, reason):
    attention, module = attention_call(is_causal=module_causal, groups=1)
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(1, 2, 128, 16, generator=g), torch.randn(1, 2, 128, 16, generator=g)
    v = torch.randn(1, 2, 128, kwargs.pop("value_dim", 16), generator=g)
    forget_warnings()
    with pytest.warns(SparsePrefillWarning, match=reason):
        out, _ = attention(module, q, k, v, None, scaling=0.25, **kwargs)
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, None, scaling=0.25, **kwargs)
    assert torch.equal(out, want)


def test_packed_sequences_under_flash_attention_go_dense():
    q = torch.zeros(1, 2, 256, 16)
    module = types.SimpleNamespace(is_causal=True, training=False)
    packed = torch.cat([torch.arange(100), torch.arange(156)])[None]
    reason, loud = glue._dense_reason("flash_attention_2", module, q, q, q, None, 0.0, {"position_ids": packed}, EXACT)
    assert "packed" in reason and loud
    plain = {"position_ids": torch.arange(256)[None]}
    assert glue._dense_reason("flash_attention_2", module, q, q, q, None, 0.0, plain, EXACT) == (None, False)


def bad(**shapes):
    g = torch.Generator().manual_seed(12)
    return [torch.randn(*shapes.get(n, (1, 4, 128, 16)), generator=g) for n in ("q", "k", "v")]


@pytest.mark.parametrize("args, extra, match", [
    (bad(k=(1, 3, 128, 16), v=(1, 3, 128, 16)), {}, "multiple"),
    (bad(q=(1, 4, 256, 16)), {}, "more queries"),
    (bad(v=(1, 4, 128, 8)), {}, "same shape"),
    (bad(q=(4, 128, 16)), {}, "4-D"),
    ([torch.ones(1, 2, 128, 16, dtype=torch.int64)] * 3, {}, "floating point"),
    (bad()[:2] + [torch.randn(1, 4, 128, 16, device="meta")], {}, "one device"),
    (bad(), {"key_range": torch.tensor([0, 128])}, r"\[B, 2\]"),
    (bad(), {"key_range": torch.tensor([[0.0, 128.0]])}, "integer"),
])
def test_wrong_inputs_raise_value_errors_that_say_what_is_wrong(args, extra, match):
    for call in (lambda: sparse_attention(*args, EXACT, **extra),
                 lambda: block_sparse_attention(*args, None, **extra)):
        with pytest.raises(ValueError, match=match):
            call()


def test_a_layout_that_does_not_fit_and_a_forced_unavailable_kernel_raise():
    q, k, v = bad()
    layout = BlockLayout.from_mask(torch.ones(1, 4, 3, 3, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match="does not fit"):
        block_sparse_attention(q, k, v, layout)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='triton' cannot run"):
            sparse_attention(q, k, v, EXACT.replace(backend="triton"))


# ---------------------------------------------------------------------------------------------
# Numerical safety: no NaN or inf where dense attention has none
# ---------------------------------------------------------------------------------------------

def test_empty_queries_give_empty_outputs():
    q, k = torch.randn(1, 2, 0, 16), torch.randn(1, 2, 70, 16)
    out, layout = sparse_attention(q, k, k, TIGHT, return_layout=True)
    assert out.shape == q.shape and layout.counts.shape == (1, 2, 0)
    assert block_sparse_attention(q, k, k, layout).shape == q.shape


def test_rows_with_no_block_and_fully_padded_rows_give_zero_not_nan():
    q, k, v = bad(k=(1, 2, 128, 16), v=(1, 2, 128, 16))
    empty = BlockLayout.from_mask(torch.zeros(1, 4, 2, 2, dtype=torch.bool), 64)
    out, lse = block_sparse_attention(q, k, v, empty, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = block_sparse_attention(q, k, v, None, return_lse=True, key_range=torch.tensor([[5, 5]]))
    assert (out == 0).all() and torch.isneginf(lse).all()
    out = sparse_attention(q, k, v, TIGHT, key_range=torch.tensor([[128, 128]]))
    assert (out == 0).all()


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_large_scores_in_fp16_stay_finite(gamma):
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, h, 256, 64, generator=g) for h in (4, 2, 2))
    q, k, v = (q * 60).half(), (k * 60).half(), v.half()  # q.k / sqrt(d) ~ 1e4-1e5: overflows if formed in fp16
    want = block_sparse_attention(q.double(), k.double(), v.double(), None)
    out = sparse_attention(q, k, v, EXACT.replace(gamma=gamma))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    if gamma == 1.0:
        assert torch.allclose(out.double(), want, atol=2e-2)


def test_constant_inputs_give_uniform_attention_without_nan():
    q, k = torch.zeros(1, 2, 192, 16), torch.zeros(1, 1, 192, 16)
    v = torch.arange(192.0)[None, None, :, None].expand(1, 1, 192, 16)
    out = sparse_attention(q, k, v, TIGHT)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 0, :64, 0], torch.arange(64.0) / 2)  # the first block keeps every causal key
