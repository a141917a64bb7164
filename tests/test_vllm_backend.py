"""The vLLM backend's classes, where vLLM imports: skipped in CI, which cannot install vLLM (CUDA-only wheels).

Two kinds of test:

- On any machine where `import vllm` works (vLLM 0.24's Python sources import on a CPU with a few small
  dependencies): the real FlashAttention builder and impl under ours, with vLLM's `flash_attn_varlen_func` (a
  CUDA kernel) replaced by a plain-PyTorch paged attention written from its contract (varlen queries, `seqused_k`
  keys read through the block table, bottom-right causal mask). The split of a step between the sparse path and
  FlashAttention must give, with gamma=1, what FlashAttention gives for the whole step.
- With a CUDA GPU and a model folder ($SPARSE_PREFILL_VLLM_MODEL, or the pinned Qwen2.5-Coder-0.5B converted
  into the cache by `sparse-prefill fetch-model qwen2.5-coder-0.5b-instruct --safetensors`): real engines, our
  backend against vLLM's FLASH_ATTN, same greedy tokens at gamma=1.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (its wheels are CUDA builds; CI cannot install it)")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends import flash_attn  # noqa: E402

from sparse_prefill import SparsePrefillWarning, sparse_attention  # noqa: E402
from sparse_prefill.notices import forget_warnings  # noqa: E402
from sparse_prefill.patches import per_request  # noqa: E402
from sparse_prefill.patches import vllm as plugin  # noqa: E402
from sparse_prefill.patches.vllm import backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE, HQ, HKV, D = 16, 4, 2, 16
BASE = "block_size=64,min_seq_len=256,backend=torch"  # the PyTorch reference: these tests run on a CPU too
CONFIG = BASE + ",min_budget_tokens=64,exact_tail_tokens=64,question_blocks=1"


def paged_attention(*, q, k, v, out, cu_seqlens_q, seqused_k, block_table, softmax_scale, causal, softcap=0,
                    window_size=None, q_descale=None, k_descale=None, v_descale=None, **_):
    """flash_attn_varlen_func's contract in plain PyTorch: request i's queries q[cu[i]:cu[i+1]] attend, causally
    from the bottom right, to its first seqused_k[i] positions, position p in page block_table[i, p // page]; a
    window (left, 0) keeps the `left` positions before each query's own. With an fp8 cache (FlashAttention 3), q,
    k and v are e4m3 and the descales (one per request and KV head) multiply them back."""
    assert causal is True
    page, left = k.shape[1], (window_size or [-1])[0]
    if k_descale is not None:  # one scale per layer in these tests
        q = q.float() * (q_descale[0, 0] if q_descale is not None else 1)
        k, v = k.float() * k_descale[0, 0], v.float() * v_descale[0, 0]
    for i in range(len(seqused_k)):
        start, stop, n = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(seqused_k[i])
        if stop == start:
            continue
        pos = torch.arange(n)
        slots = block_table[i].long()[pos // page], pos % page
        keys, values = k[slots].float(), v[slots].float()  # [n, Hkv, D]
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start:stop].float(), keys) * softmax_scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        rows = torch.arange(stop - start)[:, None] + n - (stop - start)
        hidden = (pos[None, :] > rows) | ((pos[None, :] < rows - left) if left >= 0 else False)
        out[start:stop] = torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, float("-inf")).softmax(-1),
                                       values).to(out.dtype)
    return out


@pytest.fixture
def setup(monkeypatch):
    monkeypatch.setattr(flash_attn, "flash_attn_varlen_func", paged_attention, raising=False)
    monkeypatch.setenv("SPARSE_PREFILL_CONFIG", CONFIG)


def builder():
    """vLLM's FlashAttention builder under ours, with the attributes its __init__ sets for one GPU without FA3
    ahead-of-time scheduling or full CUDA graphs (its __init__ needs a whole VllmConfig)."""
    b = object.__new__(backend.SparsePrefillMetadataBuilder)
    b.sparse_config = plugin.config_from_env()
    b.aot_schedule, b.aot_sliding_window, b.use_full_cuda_graph = False, (-1, -1), False
    b.max_cudagraph_size, b.max_num_splits, b.dcp_world_size, b.device = None, 0, 1, torch.device("cpu")
    b.cache_config, b.kv_cache_dtype = types.SimpleNamespace(cache_dtype="auto"), torch.float32
    return b


def step(q_lens, seq_lens, seed=0):
    """A step's common metadata, a paged cache holding every request's keys/values (pages out of order), and the
    queries [tokens, Hq, D]."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // PAGE) for n in seq_lens]
    order = (torch.randperm(sum(pages), generator=g) + 1).tolist()
    table = torch.zeros(len(q_lens), max(pages) + 1, dtype=torch.int32)
    for i, n in enumerate(pages):
        table[i, :n] = torch.tensor(order[sum(pages[:i]):sum(pages[:i]) + n])
    cache = torch.randn(sum(pages) + 1, 2, PAGE, HKV, D, generator=g)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    tokens = int(qsl[-1])
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(q_lens), num_actual_tokens=tokens, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_table_tensor=table, slot_mapping=torch.zeros(tokens, dtype=torch.long),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32))
    return common, cache, torch.randn(tokens, HQ, D, generator=g)


def impl(**kwargs):
    layer = backend.SparsePrefillImpl(HQ, D, D ** -0.5, HKV, None, kwargs.pop("sliding_window", None), "auto",
                                      **kwargs)
    layer.vllm_flash_attn_version = 2  # what vLLM finds on a GPU; a CPU has none
    return layer


LAYER = types.SimpleNamespace(_q_scale=torch.ones(1), _k_scale=torch.ones(1), _v_scale=torch.ones(1),
                              layer_name="model.layers.0.self_attn.attn")
# decode, a long prompt's middle chunk, a short prompt and a decode, a long prompt whole, a padded (empty) request
Q_LENS, SEQ_LENS = [1, 192, 40, 1, 320, 0], [300, 520, 40, 260, 320, 16]
EDGES = torch.tensor([0, *Q_LENS]).cumsum(0).tolist()
BOUNDS = list(zip(EDGES[:-1], EDGES[1:], strict=True))
TOKENS = EDGES[-1]


def run(layer_impl, metadata, cache, query):
    out = torch.full_like(query, float("nan"))
    return layer_impl.forward(LAYER, query, None, None, cache, metadata, out)


def flash_only(metadata, cache, query):
    """FlashAttention's own forward over the whole step: what FLASH_ATTN computes."""
    out = torch.full_like(query, float("nan"))
    plain = dataclasses.replace(metadata, step=None)
    return flash_attn.FlashAttentionImpl.forward(impl(), LAYER, query, None, None, cache, plain, out)


def test_split_step_equals_flash_attention_at_gamma_1(setup, monkeypatch):
    """Rule: with gamma=1 the sparse path is exact, so a step split between it (the two long requests) and one
    FlashAttention call over the rest (the long requests' key counts zeroed) equals FlashAttention over the step."""
    monkeypatch.setenv("SPARSE_PREFILL_CONFIG", CONFIG + ",gamma=1.0")
    common, cache, query = step(Q_LENS, SEQ_LENS)
    metadata = builder().build(0, common)
    assert metadata.step.sparse == (False, True, False, False, True, False)
    assert metadata.step.dense_seq_lens.tolist() == [300, 0, 40, 260, 0, 16]  # the long requests' keys zeroed
    out, dense = run(impl(), metadata, cache, query), flash_only(metadata, cache, query)
    torch.testing.assert_close(out[:TOKENS], dense[:TOKENS], rtol=1e-5, atol=1e-5)


def test_dense_requests_are_flash_attentions_own_and_long_ones_sparse(setup, monkeypatch):
    """Decode and short requests get FlashAttention's exact numbers (bit for bit); each long request gets
    `sparse_attention` over its own keys, here a real selection (gamma 0.5 and no structural keeps: random keys
    give flat attention, which any higher gamma keeps whole)."""
    monkeypatch.setenv("SPARSE_PREFILL_CONFIG", BASE + ",gamma=0.5,min_budget_tokens=0,sink_blocks=0,"
                       "local_blocks=0,exact_tail_tokens=0,question_blocks=0")
    common, cache, query = step(Q_LENS, SEQ_LENS, seed=1)
    metadata = builder().build(0, common)
    out, dense = run(impl(), metadata, cache, query), flash_only(metadata, cache, query)
    for qs, qe in (BOUNDS[0], BOUNDS[2], BOUNDS[3]):
        assert torch.equal(out[qs:qe], dense[qs:qe])
    config = plugin.config_from_env()
    for i in (1, 4):
        qs, qe = BOUNDS[i]
        pos = torch.arange(SEQ_LENS[i])
        slots = metadata.block_table[i].long()[pos // PAGE], pos % PAGE
        k, v = (cache[:, j][slots].transpose(0, 1)[None] for j in (0, 1))
        alone, layout = sparse_attention(query[qs:qe].transpose(0, 1)[None], k, v, config, scale=D ** -0.5,
                                         return_layout=True)
        assert layout.density() < 1
        torch.testing.assert_close(out[qs:qe], alone[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out[qs:qe], dense[qs:qe], atol=1e-3)


@pytest.mark.parametrize("where", ["sparse_prefill.patches.per_request.sparse_attention",
                                   "sparse_prefill.patches.vllm.backend.gather_request_kv"])
def test_a_request_the_sparse_path_fails_on_runs_flash_attention(setup, monkeypatch, where):
    """A failure in the sparse path or in the copy of a request's keys out of the paged cache (out of memory, say)
    must not stop the engine: that request runs FlashAttention, once said."""
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(where, fail)
    common, cache, query = step(Q_LENS, SEQ_LENS, seed=2)
    metadata = builder().build(0, common)
    forget_warnings()  # each case says it: the two raise the same error, which is said once per process
    with pytest.warns(SparsePrefillWarning, match="out of memory"):
        out = run(impl(), metadata, cache, query)
    assert torch.equal(out[:TOKENS], flash_only(metadata, cache, query)[:TOKENS])


def test_layers_the_sparse_path_cannot_take_run_flash_attention_whole(setup):
    """Sliding-window layers keep their exact windowed attention: the whole step goes to FlashAttention (the sparse
    path, which has no window, would change the long requests' rows)."""
    common, cache, query = step(Q_LENS, SEQ_LENS, seed=3)
    metadata = builder().build(0, common)
    with pytest.warns(SparsePrefillWarning, match="sliding-window"):
        windowed = impl(sliding_window=64)
    expected = flash_attn.FlashAttentionImpl.forward(windowed, LAYER, query, None, None, cache,
                                                     dataclasses.replace(metadata, step=None),
                                                     torch.full_like(query, float("nan")))
    assert torch.equal(run(windowed, metadata, cache, query)[:TOKENS], expected[:TOKENS])
    assert not torch.allclose(expected[:TOKENS], flash_only(metadata, cache, query)[:TOKENS], atol=1e-3)


def test_what_a_layer_is_decides_without_asking_about_a_device(setup, monkeypatch):
    """A layer's own rule (window, ALiBi, sinks, cache dtype) asks no device question: vLLM builds its layers with
    CUDA as the default device, where a probe tensor made for the question became a CUDA [0] tensor and every layer
    ran FlashAttention for "head_dim 0" (seen on an H100). The kernels' support is asked per call, of the query."""
    asked, rule = [], backend.call_reason
    monkeypatch.setattr(backend, "call_reason", lambda query, *a, **kw: asked.append(query) or rule(query, *a, **kw))
    monkeypatch.setattr(per_request, "triton_supports", lambda q, block_size: "asked about a device")
    with torch.device("meta"):  # as vLLM's default device does when it makes the layers
        layer = impl()
    assert layer.dense_reason is None and asked == [None]


def fp8_step(seed=0):
    """`step`'s cache and queries as vLLM keeps them with `--kv-cache-dtype fp8`: the cache in e4m3 bytes of the
    keys and values over their scales, the queries quantised by the attention layer (QuantFP8, static, per
    tensor) before the backend sees them; and the layer's scales."""
    common, cache, query = step(Q_LENS, SEQ_LENS, seed=seed)
    scales = types.SimpleNamespace(_q_scale=torch.tensor(0.01), _k_scale=torch.tensor(0.02),
                                   _v_scale=torch.tensor(0.005), layer_name=LAYER.layer_name)
    e4m3 = torch.float8_e4m3fn
    stored = torch.stack([(cache[:, 0] / scales._k_scale).clamp(-448, 448).to(e4m3),
                          (cache[:, 1] / scales._v_scale).clamp(-448, 448).to(e4m3)], dim=1).view(torch.uint8)
    return common, stored, (query / scales._q_scale).clamp(-448, 448).to(e4m3), scales


def fp8_impl():
    layer = backend.SparsePrefillImpl(HQ, D, D ** -0.5, HKV, None, None, "fp8")
    layer.vllm_flash_attn_version, layer.supports_quant_query_input = 3, True  # FlashAttention 3, as fp8 needs
    return layer


def test_an_fp8_cache_goes_sparse_read_back_with_its_scales(setup, monkeypatch):
    """With an fp8 KV cache the long requests still go sparse: keys, values and queries read back from e4m3 with
    the layer's scales. At gamma=1 (exact), their rows equal FlashAttention 3's fp8 attention over the same cache,
    and the other rows are FlashAttention's own, bit for bit."""
    monkeypatch.setenv("SPARSE_PREFILL_CONFIG", CONFIG + ",gamma=1.0")
    common, stored, query, scales = fp8_step(seed=4)
    metadata = builder().build(0, common)
    layer = fp8_impl()
    assert layer.dense_reason is None
    ran = []
    monkeypatch.setattr(backend, "attend_alone", lambda q, k, v, *a, **kw: ran.append((q.dtype, k.dtype)) or
                        per_request.attend_alone(q, k, v, *a, **kw))
    out = layer.forward(scales, query, None, None, stored, metadata, torch.full(query.shape, float("nan")))
    expected = flash_attn.FlashAttentionImpl.forward(layer, scales, query, None, None, stored,
                                                     dataclasses.replace(metadata, step=None),
                                                     torch.full(query.shape, float("nan")))
    assert ran == [(torch.float32, torch.float32)] * 2  # the two long requests, read back in the model's dtype
    torch.testing.assert_close(out[:TOKENS], expected[:TOKENS], rtol=1e-5, atol=1e-5)
    for i in (0, 2, 3):
        qs, qe = BOUNDS[i]
        assert torch.equal(out[qs:qe], expected[qs:qe])
    # read back without the scales (bytes as values), the long rows would differ: the scales are what is tested
    plain = backend.Fp8Cache(torch.float8_e4m3fn, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0),
                             torch.float32)
    monkeypatch.setattr(backend, "Fp8Cache", lambda *a: plain)
    wrong = layer.forward(scales, query, None, None, stored, metadata, torch.full(query.shape, float("nan")))
    qs, qe = BOUNDS[1]
    assert not torch.allclose(wrong[qs:qe], expected[qs:qe], atol=1e-2)


def test_fp8_scales_per_kv_head_and_caches_the_sparse_path_cannot_read():
    from sparse_prefill.patches.vllm.paged import Fp8Cache

    cache = Fp8Cache(torch.float8_e4m3fn, torch.tensor([0.5, 2.0]), torch.tensor([1.0, 3.0]), torch.tensor(0.25),
                     torch.bfloat16)
    k = torch.tensor([[[[1.0, -2.0]], [[4.0, 0.5]]]]).to(torch.float8_e4m3fn).view(torch.uint8)  # [1, 2, 1, 2]
    assert cache.keys(k).tolist() == [[[[1.0, -2.0]], [[12.0, 1.5]]]] and cache.keys(k).dtype == torch.bfloat16
    q = torch.tensor([[[1.0], [1.0], [2.0], [2.0]]]).to(torch.float8_e4m3fn)  # [1 token, 4 heads over 2 KV heads, 1]
    assert cache.queries(q).flatten().tolist() == [0.5, 0.5, 4.0, 4.0]
    model_dtype = q.float().bfloat16()
    assert cache.queries(model_dtype) is model_dtype  # a query in the model's dtype passes unchanged
    with pytest.warns(SparsePrefillWarning, match="fp8_e5m2 KV cache"):
        layer = backend.SparsePrefillImpl(HQ, D, D ** -0.5, HKV, None, None, "fp8_e5m2")
    assert layer.dense_reason is not None


def test_builder_plans_nothing_for_cuda_graph_capture_and_keeps_cascade_off_for_long_queries(setup):
    import numpy as np

    common, _, _ = step(Q_LENS, SEQ_LENS)
    b = builder()
    assert b.build_for_cudagraph_capture(common).step is None
    args = (16, 2, False, False, False, 132, 1)
    assert b.use_cascade_attention(4096, np.array([1] * 7 + [512]), *args) is False
    short = np.array([3] * 16)
    assert b.use_cascade_attention(4096, short, *args) == flash_attn.use_cascade_attention(4096, short, *args)


def test_registered_backend_is_the_one_vllm_resolves():
    plugin.register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cls = AttentionBackendEnum.CUSTOM.get_class()
    assert cls is backend.SparsePrefillBackend
    assert AttentionBackendEnum[cls.get_name()] is AttentionBackendEnum.CUSTOM
    assert cls.get_kv_cache_shape(8, PAGE, HKV, D) == flash_attn.FlashAttentionBackend.get_kv_cache_shape(
        8, PAGE, HKV, D)


def test_backend_validates_where_flash_attention_does():
    """vLLM checks a selected backend with `validate_configuration` and refuses it with the reasons it returns:
    ours takes what FlashAttention takes (the two Qwen2.5 head sizes, bf16, an auto/fp16/bf16 cache, Hopper)."""
    from vllm.platforms.interface import DeviceCapability

    for head_size in (64, 128):
        reasons = backend.SparsePrefillBackend.validate_configuration(
            head_size=head_size, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None, use_mla=False,
            has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
            device_capability=DeviceCapability(9, 0), attn_type="decoder")
        assert reasons == []


def model_folder() -> str | None:
    folder = os.environ.get("SPARSE_PREFILL_VLLM_MODEL")
    if folder:
        return folder
    from sparse_prefill.eval.models import cached

    path = cached("qwen2.5-coder-0.5b-instruct")
    return str(path) if path is not None and path.is_dir() else None


ENGINE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from sparse_prefill.patches.vllm import register
    register()  # as vLLM's plugin loader does for an installed package (the workers of tp > 1 need it installed)
    model, backend, out, tp, cache_dtype = sys.argv[1:6]
    llm = LLM(model, attention_backend=backend, max_model_len=8192, max_num_batched_tokens=1024,
              enable_prefix_caching=False, gpu_memory_utilization=0.5, seed=0, tensor_parallel_size=int(tp),
              kv_cache_dtype=cache_dtype)
    calls = None
    if backend == "CUSTOM" and tp == "1":  # the engine core runs here (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        import sparse_prefill.patches.vllm.backend as sparse
        sparse.TIMINGS = calls = []
    words = "The quick brown fox jumps over the lazy dog near the river bank. " * 400
    prompts = [{"prompt_token_ids": llm.get_tokenizer().encode(words)[:n]} for n in (4000, 3000, 200, 50)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
               "sparse_calls": None if calls is None else len(calls)}, open(out, "w"))
""")


@pytest.mark.parametrize("tp,cache_dtype", [(1, "auto"), (2, "auto"), (1, "fp8")])
def test_engine_gives_flash_attentions_tokens_at_gamma_1(tmp_path, tp, cache_dtype):
    """End to end on a real engine: prompts of 4000 and 3000 tokens prefilled in 1024-token chunks (so the sparse
    path runs middle and last chunks) beside two short ones, greedy, our backend at gamma=1 against FLASH_ATTN.
    gamma=1 is dense attention by another kernel (other bf16 rounding), so a near-tie may flip a late token: every
    first token must agree and 90 % of all; a wrong gather or misplaced rows would give other text altogether.
    With tp=2 each rank attends its 7 of the 14 query heads and the KV head they read. With an fp8 KV cache
    (FlashAttention 3: Hopper) both engines keep e4m3 keys and values; ours reads them back for the sparse path."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"a vLLM engine with tensor_parallel_size={tp} needs {tp} CUDA GPU(s)")
    if cache_dtype == "fp8" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("vLLM's FlashAttention keeps an fp8 KV cache on Hopper (FlashAttention 3) only")
    folder = model_folder()
    if folder is None:
        pytest.skip("no model folder: set SPARSE_PREFILL_VLLM_MODEL or fetch qwen2.5-coder-0.5b-instruct")
    runs = {}
    for name in ("FLASH_ATTN", "CUSTOM"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "SPARSE_PREFILL_CONFIG": "gamma=1.0,min_seq_len=1024", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_USE_FLASHINFER_SAMPLER": "0"}  # greedy samples nothing; spares importing FlashInfer
        result = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, "-c", ENGINE, folder, name, str(result), str(tp), cache_dtype], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads(result.read_text())
    assert tp > 1 or runs["CUSTOM"]["sparse_calls"] > 0, "the sparse path never ran"
    dense, sparse = runs["FLASH_ATTN"]["tokens"], runs["CUSTOM"]["tokens"]
    assert [t[0] for t in sparse] == [t[0] for t in dense]
    same = sum(a == b for x, y in zip(sparse, dense, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * sum(len(t) for t in dense), (sparse, dense)


def engine_config(max_model_len=131072, heads=14, tp=1, softcap=None):
    model = types.SimpleNamespace(max_model_len=max_model_len, get_num_attention_heads=lambda parallel: heads // tp,
                                  hf_text_config=types.SimpleNamespace(attn_logit_softcapping=softcap),
                                  dtype=torch.float16)
    return types.SimpleNamespace(model_config=model, parallel_config=types.SimpleNamespace(tensor_parallel_size=tp))


def test_the_builder_warms_the_kernels_up_once_for_the_engines_context(monkeypatch):
    """The builder is made once the KV cache exists, before vLLM's own warm-up: the kernels for prompts up to
    max_model_len compile then, not in a request's time to first token. Once per process and shape;
    $SPARSE_PREFILL_WARM_UP sets the length (0: none)."""
    monkeypatch.setenv("SPARSE_PREFILL_CONFIG", "proxy_heads=2")
    monkeypatch.setattr(backend, "_WARMED", set())
    monkeypatch.setattr(per_request, "triton_supports", lambda q, block_size: None)  # as on a GPU
    calls = []
    monkeypatch.setattr(per_request, "warm_up_kernels", lambda *args, **kw: calls.append((args, kw)) or 7)
    spec = types.SimpleNamespace(num_kv_heads=1, head_size=64, dtype=torch.bfloat16)
    config = plugin.config_from_env()
    assert backend.warm_up_engine(engine_config(tp=2), spec, torch.device("cpu"), config) == 7
    (args, kw), = calls
    assert args[:4] == (7, 1, 64, 131072) and args[4].proxy_heads == 1  # this rank's heads and its share of proxies
    assert kw["dtype"] == torch.bfloat16 and kw["softcap"] is None
    assert backend.warm_up_engine(engine_config(tp=2), spec, torch.device("cpu"), config) == 0 and len(calls) == 1
    monkeypatch.setenv("SPARSE_PREFILL_WARM_UP", "0")
    assert backend.warm_up_engine(engine_config(max_model_len=65536), spec, torch.device("cpu"), config) == 0
    monkeypatch.setenv("SPARSE_PREFILL_WARM_UP", "32768")
    assert backend.warm_up_engine(engine_config(), spec, torch.device("cpu"), config) == 7
    assert calls[-1][0][3] == 32768
    monkeypatch.setenv("SPARSE_PREFILL_WARM_UP", "lots")
    with pytest.raises(ValueError, match="SPARSE_PREFILL_WARM_UP"):
        backend.warm_up_engine(engine_config(), spec, torch.device("cpu"), config)
    monkeypatch.setenv("SPARSE_PREFILL_WARM_UP", "16384")  # an fp8 cache holds bytes: the model's dtype is warmed
    fp8 = types.SimpleNamespace(num_kv_heads=2, head_size=64, dtype=torch.uint8)
    assert backend.warm_up_engine(engine_config(), fp8, torch.device("cpu"), config) == 7
    assert calls[-1][1]["dtype"] == torch.float16


def test_a_failed_warm_up_is_said_and_the_engine_goes_on(monkeypatch):
    monkeypatch.setattr(backend, "_WARMED", set())
    monkeypatch.setattr(per_request, "triton_supports", lambda q, block_size: None)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(per_request, "warm_up_kernels", out_of_memory)
    spec = types.SimpleNamespace(num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    with pytest.warns(SparsePrefillWarning, match="warm-up failed"):
        assert backend.warm_up_engine(engine_config(), spec, torch.device("cpu"), plugin.config_from_env()) == 0
