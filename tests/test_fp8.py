"""attention_dtype="fp8": the quantisation (kernels/fp8.py), its error against exact attention, the config field
on every way in, the fallback where no FP8 kernel runs, and gamma=1 as the FP8 path's exact control.

Errors are relative, |out - exact| / |exact|, against float64 attention over the same layout, on inputs with a
trained model's structure (structured_attention.py; bf16, as a model hands them over). bench/fp8_error.py prints
the same measurements at larger sizes (docs/kernel.md, "FP8 attention").
"""

import argparse
import dataclasses
import math
import warnings

import pytest
import torch
from structured_attention import exact_attention, sink_row, structured_qk, with_key_offset

from sparse_prefill import BlockLayout, SparsePrefillConfig, select_blocks, sparse_attention
from sparse_prefill import config as config_module
from sparse_prefill.config import config_from_options, config_from_text
from sparse_prefill.kernels import AttentionCall, block_sparse_attention, fp8, reference, support
from sparse_prefill.notices import SparsePrefillWarning, forget_warnings

E4M3_STEP = 2.0 ** -3  # e4m3 has 3 mantissa bits: neighbours differ by 2^-3 of the binade's start


def relative_error(out, exact):
    return ((out.double() - exact.double()).norm() / exact.double().norm()).item()


@pytest.fixture(scope="module")
def structured():
    """q [1, 4, 1024, 64], k and v [1, 2, 1024, 64] in bf16: two sharp and two flat query heads, GQA."""
    q, k = structured_qk(q_heads=4, kv_heads=2, q_len=1024, k_len=1024, dim=64)
    v = torch.randn(1, 2, 1024, 64, generator=torch.Generator().manual_seed(7))
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


# -- (a) the quantisation ------------------------------------------------------------------------------------


def test_each_blocks_largest_magnitude_maps_to_448():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 300, 16, generator=g) * torch.logspace(-3, 3, 3)[None, :, None, None]
    x[0, 1, 128:256] = 0  # an all-zero block
    blocks = fp8.quantize_blocks(x, 128)
    assert blocks.data.dtype == torch.float8_e4m3fn and blocks.scale.shape == (2, 3, 3)  # 300 = 128 + 128 + 44
    for b, h, n in ((0, 0, 0), (1, 2, 1), (0, 2, 2), (1, 0, 2)):
        rows = slice(128 * n, min(128 * (n + 1), 300))
        amax = x[b, h, rows].abs().max()
        assert blocks.scale[b, h, n] == pytest.approx(amax.item() / 448, rel=1e-6)
        assert blocks.data[b, h, rows].float().abs().max() == 448  # the block's max is e4m3's max
    assert blocks.scale[0, 1, 1] == 1 and not blocks.data[0, 1, 128:256].float().any()


def test_round_trip_error_is_e4m3s():
    """Every element within half a step of e4m3 (2^-4 of itself in the normal range, half the smallest subnormal
    step below it); on normal data about 3 % in norm (measured 0.026), and the worst element near the bound:
    the rounding is e4m3's, not finer."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 1024, 64, generator=g) * torch.logspace(-2, 2, 4)[None, :, None, None]
    blocks = fp8.quantize_blocks(x, 128)
    back = blocks.dequantize()
    scale = blocks.scale.repeat_interleave(128, dim=2)[..., None]
    error = (back - x).abs()
    bound = torch.maximum(x.abs() * E4M3_STEP / 2, scale * 2.0 ** -10)
    assert (error <= bound * (1 + 1e-6)).all()
    assert 0.015 < relative_error(back, x) < 0.04
    normal = x.abs() >= scale * 2.0 ** -6
    assert (error / x.abs())[normal].max() > 0.05  # at most 2^-4 = 0.0625, and reached
    part = fp8.Fp8Blocks(blocks.data, blocks.scale, 128).dequantize(range(200, 300))
    assert torch.equal(part, back[:, :, 200:300])  # a slice dequantises with its own blocks' scales


def test_smoothing_leaves_softmax_unchanged_in_exact_arithmetic(structured):
    """In float64, attention over k and over k minus the mean smoothing subtracts (per batch row, KV head and
    channel, over the valid keys) agree: q . mean is one constant per query row."""
    q, k, v = structured
    k = with_key_offset(k.float())
    key_range = torch.tensor([[100, 1024]])
    mean = fp8.key_mean(k, key_range)
    assert mean.shape == (1, 2, 1, 64)
    assert torch.allclose(mean, k[:, :, 100:].mean(2, keepdim=True), atol=1e-5)  # the valid keys' mean
    exact = exact_attention(q, k, v, key_range=key_range)
    smoothed = exact_attention(q, k.double() - mean.double(), v, key_range=key_range)
    group = q.shape[1] // k.shape[1]
    scores_move = (q.double() @ mean.double().repeat_interleave(group, 1).transpose(-1, -2)).abs().max()
    assert scores_move > 1  # the scores move by q . mean per row ...
    assert torch.allclose(exact, smoothed, rtol=0, atol=1e-12)  # ... the attention does not


def test_smoothing_shrinks_the_error_of_keys_with_a_per_channel_offset(structured):
    """Trained models' keys share a large offset per channel. Unsmoothed, it takes most of each block's range:
    the keys' own part then rounds ~5x coarser (measured 4.8x with an offset of size 2, 9.5x of size 4), and
    attention's error grows (measured 0.125 unsmoothed, 0.053 smoothed, first product alone, offset size 4)."""
    q, k, v = structured
    for size, at_least in ((2.0, 4.0), (4.0, 8.0)):
        keys = with_key_offset(k.float(), size).bfloat16()
        centred = keys.float() - fp8.key_mean(keys)
        raw = (fp8.quantize_blocks(keys, 128).dequantize() - keys.float()).norm() / centred.norm()
        smooth = (fp8.quantize_blocks(centred, 128).dequantize() - centred).norm() / centred.norm()
        assert raw > at_least * smooth, size
    call = AttentionCall(q, keys, v)
    exact = exact_attention(q, keys, v)
    unsmoothed = relative_error(fp8.attend(call, quantize_pv=False, smooth_k=False), exact)
    smoothed = relative_error(fp8.attend(call, quantize_pv=False), exact)
    assert unsmoothed > 1.8 * smoothed


def test_smoothing_keeps_softcap_and_lse_exact(structured):
    """Softcap is not shift-invariant and the lse is not either: the row's q . mean(k) goes back into the scores.
    Left out, softcap's output and every lse would move by it (here: lse by several units)."""
    q, k, v = structured
    keys = with_key_offset(k.float(), 4.0).bfloat16()
    out, lse = block_sparse_attention(q, keys, v, None, return_lse=True, softcap=5.0, backend="torch")
    want, want_lse = reference.attend(AttentionCall(q, keys, v, return_lse=True, softcap=5.0))
    out8, lse8 = fp8.attend(AttentionCall(q, keys, v, return_lse=True, softcap=5.0))
    assert relative_error(out8, want) < 0.1  # measured 0.039: FP8's error, not softcap's
    assert (lse8 - want_lse).abs().max() < 0.25  # measured 0.085
    assert torch.equal(out, want) and torch.equal(lse, want_lse)  # attention_dtype "auto" is the reference


def test_p_scaled_per_row_and_key_block_keeps_the_mass_behind_a_sink():
    """A fixed scale (P * 448) rounds probabilities below ~2e-6 of the row's maximum to zero: behind a sink that
    is the rest of a long row. Scaled per (row, key block), they keep their mass. Measured on 64K keys, gap 13.5
    (each other key ~1.4e-6 of the sink): with the rounded P's row sum as denominator, 0.024 per block and 0.092
    fixed. With the default denominator, the row sum of P before rounding (the kernel's), the flushed keys still
    count below the line and the two errors are alike here (0.024), because these keys' values average out."""
    p = torch.cat([torch.ones(1), torch.full((65535,), 1.5e-6)])[None]
    fixed = fp8.quantize_probabilities(p, 128, "fixed")
    per_block = fp8.quantize_probabilities(p, 128, "block")
    assert fixed[0, 1:].sum() == 0 and fixed[0, 0] == 1
    assert per_block[0, 1:].sum().item() == pytest.approx(p[0, 1:].sum().item(), rel=0.07)
    q, k = sink_row(65536, gap=13.5)
    v = torch.randn(1, 1, 65536, 64, generator=torch.Generator().manual_seed(3))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = exact_attention(q, k, v)
    call = AttentionCall(q, k, v)
    per_block_error = relative_error(fp8.attend(call, rounded_denominator=True), exact)
    assert relative_error(fp8.attend(call, p_scale="fixed", rounded_denominator=True), exact) > 2.5 * per_block_error
    assert relative_error(fp8.attend(call), exact) == pytest.approx(per_block_error, rel=0.1)
    with pytest.raises(ValueError, match="p_scale"):
        fp8.attend(call, p_scale="row")


def test_p_rounds_to_e4m3_per_row_and_key_block():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(3, 300, generator=g) ** 8  # a wide range of magnitudes, the first column starts a block
    rounded = fp8.quantize_probabilities(p, 128)
    top = torch.nn.functional.pad(p, (0, 84)).unflatten(-1, (3, 128)).amax(-1).repeat_interleave(128, -1)[:, :300]
    on_grid = rounded / top * 448
    # e4m3 values at the block's scale (to fp32 rounding: neighbouring e4m3 values are >= 6 % apart)
    assert torch.allclose(on_grid, on_grid.to(torch.float8_e4m3fn).float(), rtol=1e-5, atol=1e-9)
    assert (rounded != p).any() and (rounded - p).abs().max() <= p.max() * 2.0 ** -4


def test_the_fp8_reference_is_its_documented_formula():
    """softmax(scale * Q8 K8^T + scale * q . mean(k)) V8 with the operands as quantize_blocks writes them (K
    smoothed), P rounded per (row, key block), built densely here in float64: the GPU kernel's specification."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 256, 32, generator=g).bfloat16() for h in (2, 1, 1))
    k = with_key_offset(k.float()).bfloat16()
    scale = 0.3
    mean = fp8.key_mean(k)
    q8 = fp8.quantize_blocks(q, 64).dequantize().double()
    k8 = fp8.quantize_blocks(k.float() - mean, 64).dequantize().double()
    v8 = fp8.quantize_blocks(v, 64).dequantize().double()
    causal = torch.ones(256, 256, dtype=torch.bool).tril()
    s = scale * (q8 @ k8.transpose(-1, -2) + q.double() @ mean.double().transpose(-1, -2))
    s = s.masked_fill(~causal, -math.inf)
    weights = torch.softmax(s, -1)
    layout = BlockLayout.from_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool).tril(), 64)
    call = AttentionCall(q, k, v, layout, scale=scale, return_lse=True)
    out, lse = fp8.attend(call, quantize_pv=False)
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=0)
    assert torch.allclose(out.double(), weights @ v.double(), atol=1e-2, rtol=0)  # bf16 output: 2^-8 of ~1
    p = torch.exp(s - s.amax(-1, keepdim=True)).float()  # one chunk: relative to the row's maximum
    p8 = fp8.quantize_probabilities(p, 64).double()
    out, _ = fp8.attend(call)  # the denominator: P's row sum before rounding
    assert torch.allclose(out.double(), (p8 @ v8) / p.double().sum(-1, keepdim=True), atol=1e-2, rtol=0)
    out, _ = fp8.attend(call, rounded_denominator=True)
    assert torch.allclose(out.double(), (p8 @ v8) / p8.sum(-1, keepdim=True), atol=1e-2, rtol=0)
    assert torch.equal(out[0, :, 0], v8[0, 0, 0].to(out.dtype).expand(2, -1))  # row 0 sees key 0: V8's row


# -- (b) FP8 attention against exact attention ----------------------------------------------------------------


def test_fp8_error_on_structured_inputs_is_bounded_and_costs_what_it_costs(structured):
    """Measured (bf16 / fp8 / fp8 with the second product unquantised), dense causal: 0.0016 / 0.062 / 0.050;
    over a selected layout (~50 % of the blocks): 0.0016 / 0.059 / 0.048. Bounds about 2x that. FP8 costs ~35x
    bf16's error on these inputs (e4m3 keeps 3 mantissa bits, bf16 7); rounding P and V adds a fifth of it."""
    q, k, v = structured
    config = SparsePrefillConfig(backend="torch", block_size=64, gamma=0.5, exact_tail_tokens=0, question_blocks=0,
                                 min_budget_tokens=128)
    layout = select_blocks(q, k, config)
    assert 0.3 < layout.density() < 0.7
    for kept in (None, layout):
        exact = exact_attention(q, k, v, kept)
        call = AttentionCall(q, k, v, kept)
        bf16 = relative_error(reference.attend(call), exact)
        fp8_error = relative_error(fp8.attend(call), exact)
        first_product_only = relative_error(fp8.attend(call, quantize_pv=False), exact)
        assert bf16 < 0.004
        assert fp8_error < 0.12 and first_product_only < 0.10
        assert fp8_error > 10 * bf16 and fp8_error > first_product_only  # each rounding is there


def test_fp8_takes_the_references_calls(structured, monkeypatch):
    """GQA, queries shorter than keys, key_range padding, scale, an empty row, chunks across blocks: the
    reference's semantics, with FP8's error."""
    monkeypatch.setattr(reference, "_CHUNK", 64)  # the FP8 reference rounds chunks up to whole blocks (128)
    q, k, v = structured
    q = q[:, :, -300:]
    key_range = torch.tensor([[40, 1024]])
    mask = torch.ones(1, 4, 3, 8, dtype=torch.bool)
    mask[0, 2, 1] = False  # query block 1 of head 2 attends to nothing
    layout = BlockLayout.from_mask(mask, 128)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True, key_range=key_range, scale=0.1,
                                      backend="torch", attention_dtype="fp8")
    want, want_lse = reference.attend(AttentionCall(q, k, v, layout, return_lse=True, key_range=key_range, scale=0.1))
    empty = torch.zeros_like(want_lse, dtype=torch.bool)
    empty[0, 2, 128:256] = True
    assert (out[empty] == 0).all() and torch.isinf(lse[empty]).all() and torch.isinf(want_lse[empty]).all()
    assert relative_error(out, want) < 0.1  # measured 0.047
    lse_error = (lse[~empty] - want_lse[~empty]).abs()
    # Measured: 0.010 on average, 0.23 at most: the question rows of the sharp heads score their needles ~20 above
    # the rest, and e4m3 rounds a score that large by tenths.
    assert lse_error.mean() < 0.03 and lse_error.max() < 0.5
    assert out.dtype == q.dtype and out.shape == q.shape


# -- (c) the config field ---------------------------------------------------------------------------------------


def test_attention_dtype_is_validated_with_what_is_allowed():
    assert SparsePrefillConfig().attention_dtype == "auto"
    assert SparsePrefillConfig(attention_dtype="fp8").attention_dtype == "fp8"
    for bad in ("FP8", "fp8_e5m2", "bf16", None, True):
        with pytest.raises(ValueError, match=r"attention_dtype must be 'auto' or 'fp8'"):
            SparsePrefillConfig(attention_dtype=bad)
    assert config_module._ATTENTION_DTYPES == support.ATTENTION_DTYPES  # config.py imports no torch: two copies
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="attention_dtype must be one of"):
        block_sparse_attention(q, q, q, None, attention_dtype="float8")


def test_attention_dtype_from_text_and_options():
    assert config_from_text("gamma=0.9,attention_dtype=fp8") == SparsePrefillConfig(gamma=0.9, attention_dtype="fp8")
    assert config_from_options({"attention-dtype": " fp8 "}).attention_dtype == "fp8"
    assert config_from_options({"attention_dtype": "auto"}).attention_dtype == "auto"  # a string, not None
    with pytest.raises(ValueError, match="attention_dtype"):
        config_from_text("attention_dtype=int8")
    vllm_plugin = pytest.importorskip("sparse_prefill.patches.vllm")
    env = {vllm_plugin.ENV_CONFIG: "attention_dtype=fp8"}
    assert vllm_plugin.config_from_env(env).attention_dtype == "fp8"


def test_attention_dtype_on_the_command_line():
    from sparse_prefill.cli import build_parser
    from sparse_prefill.eval import options

    parser = build_parser()
    args = parser.parse_args(["niah", "--attention-dtype", "fp8"])
    assert options.config_from_args(args).attention_dtype == "fp8"
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    help_text = " ".join(subparsers.choices["niah"].format_help().split())
    assert "--attention-dtype auto|fp8" in help_text and "float8 e4m3" in help_text
    with pytest.raises(options.CommandError, match="attention_dtype"):
        options.config_from_args(parser.parse_args(["niah", "--attention-dtype", "fp16"]))


def test_serve_help_has_the_attention_dtype_flag(capsys):
    serve = pytest.importorskip("sparse_prefill.patches.serve")
    parser = argparse.ArgumentParser(prog="serve")
    serve._add_config_flags(parser)
    text = " ".join(parser.format_help().split())
    (field,) = [f for f in dataclasses.fields(SparsePrefillConfig) if f.name == "attention_dtype"]
    assert "--attention-dtype auto|fp8" in text and f"{field.metadata['meaning']} (default auto)" in text
    assert parser.parse_args(["--attention-dtype", "fp8"]).attention_dtype == "fp8"


# -- (d) which kernel runs where ----------------------------------------------------------------------------------


@pytest.fixture
def pretend_cuda(monkeypatch):
    """CPU tensors dispatched as if on a CUDA GPU whose Triton kernel takes them; the fp16/bf16 kernel stands in
    as the reference (what it computes, to its rounding). Set `capability` to the GPU's."""
    from sparse_prefill import kernels
    from sparse_prefill.kernels import triton_attention

    ran = []
    monkeypatch.setattr(kernels, "use_triton", lambda q, block_size, backend: backend != "torch")
    monkeypatch.setattr(support, "triton_supports", lambda q, block_size: None)
    def kernel(call, config=None, attention_dtype="auto"):  # each kernel stands in as its specification
        ran.append(f"{'fp8' if attention_dtype == 'fp8' else 'bf16'} kernel")
        return fp8.attend(call) if attention_dtype == "fp8" else reference.attend(call)

    monkeypatch.setattr(triton_attention, "attend", kernel)
    gpu = {"capability": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    forget_warnings()
    yield gpu, ran
    forget_warnings()


def test_on_a_gpu_before_hopper_fp8_runs_the_bf16_kernel_warned_once(structured, pretend_cuda):
    gpu, ran = pretend_cuda
    q, k, v = structured
    with pytest.warns(SparsePrefillWarning, match=r"attention_dtype='fp8' runs in bfloat16 here: .*capability 8\.0"):
        out = block_sparse_attention(q, k, v, None, attention_dtype="fp8")
    assert ran == ["bf16 kernel"] and torch.equal(out, reference.attend(AttentionCall(q, k, v)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        block_sparse_attention(q, k, v, None, attention_dtype="fp8", backend="triton")
    assert ran == ["bf16 kernel"] * 2


def test_on_hopper_fp8_runs_the_fp8_kernel_silently(pretend_cuda):
    gpu, ran = pretend_cuda
    gpu["capability"] = (9, 0)
    q, k = structured_qk(q_heads=4, kv_heads=2, q_len=256, k_len=256, dim=128)
    q, k, v = q.bfloat16(), k.bfloat16(), torch.randn(1, 2, 256, 128).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = block_sparse_attention(q, k, v, None, attention_dtype="fp8")
        assert ran == ["fp8 kernel"] and torch.equal(out, fp8.attend(AttentionCall(q, k, v)))
        block_sparse_attention(q, k, v, None)  # "auto" stays on the fp16/bf16 kernel
    assert ran == ["fp8 kernel", "bf16 kernel"]


def test_below_head_dim_128_fp8_runs_the_bf16_kernel_where_it_is_faster(structured, pretend_cuda):
    """At head_dim 64 the FP8 kernel measured slower than the bf16 one on an H100: the bf16 kernel runs, warned."""
    gpu, ran = pretend_cuda
    gpu["capability"] = (9, 0)
    q, k, v = structured  # head_dim 64
    with pytest.warns(SparsePrefillWarning, match=r"runs in bfloat16 here: head_dim 64 is below 128.*slower"):
        block_sparse_attention(q, k, v, None, attention_dtype="fp8")
    assert ran == ["bf16 kernel"]


def test_where_the_reference_runs_fp8_runs_its_reference_without_a_warning(structured, pretend_cuda):
    """backend="torch" (any device) and "auto" off CUDA run the FP8 reference: slow, the kernel's spec."""
    _, ran = pretend_cuda
    q, k, v = structured
    want = fp8.attend(AttentionCall(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(block_sparse_attention(q, k, v, None, attention_dtype="fp8", backend="torch"), want)
    assert ran == []


def test_auto_on_cpu_runs_the_fp8_reference(structured):
    q, k, v = structured
    forget_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = block_sparse_attention(q, k, v, None, attention_dtype="fp8")
    assert torch.equal(out, fp8.attend(AttentionCall(q, k, v)))
    assert not torch.equal(out, block_sparse_attention(q, k, v, None))


# -- (e) gamma=1: every causal block, in FP8 --------------------------------------------------------------------


def test_gamma_1_in_fp8_is_the_fp8_reference_over_every_causal_block(structured):
    q, k, v = structured
    # Block 128, the block of a call without layout: FP8's scales are per layout block, so the two calls agree.
    config = SparsePrefillConfig(gamma=1.0, attention_dtype="fp8", backend="torch", block_size=128)
    out, layout = sparse_attention(q[:, :, -640:], k, v, config, return_layout=True)
    n_q, n_k = layout.shape[2], layout.shape[3]
    causal = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    assert torch.equal(layout.to_mask(), causal.expand_as(layout.to_mask()))  # every causal block
    want = fp8.attend(AttentionCall(q[:, :, -640:], k, v, None))
    assert torch.equal(out, want)
    exact = exact_attention(q[:, :, -640:], k, v)
    # FP8's own error, not the selection's: measured 0.082 (the last 640 rows hold the question's, whose scores
    # are the largest, and e4m3 rounds them the most)
    assert relative_error(out, exact) < 0.16


def test_selection_does_not_follow_attention_dtype(structured):
    """Selection runs in the inputs' dtype: the same blocks whichever arithmetic attends to them."""
    q, k, v = structured
    config = SparsePrefillConfig(backend="torch", block_size=64, gamma=0.5, exact_tail_tokens=0, question_blocks=0,
                                 min_budget_tokens=128)
    out, layout = sparse_attention(q, k, v, config, return_layout=True)
    out8, layout8 = sparse_attention(q, k, v, config.replace(attention_dtype="fp8"), return_layout=True)
    assert torch.equal(layout.to_mask(), layout8.to_mask()) and layout.density() < 0.7
    assert 0 < relative_error(out8, out) < 0.12
    assert math.isfinite(out8.float().sum().item())
