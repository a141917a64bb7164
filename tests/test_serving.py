"""Continuous batching (`generate_batch`) with a patched model: packed requests, chunked prefill, faults.

transformers' continuous batching packs several requests into one row and prefills long prompts in chunks
through its paged cache. A patched model must enter it as it is, give dense's tokens with gamma=1, attend
each long request as if it were alone, and never let a request's output depend on its batch-mates.
CPU, tiny random-weight models; the paged cache is kept small so that a run takes a second.
"""

import functools
import inspect
import time
import warnings
from importlib.metadata import version

import pytest
import torch
from model_zoo import tiny_model
from transformers import GenerationConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sparse_prefill import SparsePrefillConfig, patch_model, sparse_attention, unpatch_model
from sparse_prefill.notices import forget_warnings
from sparse_prefill.patches import SparsePrefillWarning, packed, per_request
from sparse_prefill.patches import transformers_attention as glue

EXACT = SparsePrefillConfig(block_size=64, gamma=1.0, min_budget_tokens=0, min_seq_len=0)
TIGHT = SparsePrefillConfig(block_size=64, gamma=0.4, min_budget_tokens=0, min_seq_len=0, local_blocks=0,
                            exact_tail_tokens=64, question_blocks=2)
LENGTHS = (700, 40, 300, 150)  # one prompt chunked at 256 tokens a batch, packed with short ones
TRANSFORMERS = tuple(int(p) for p in version("transformers").split(".")[:2])


def _give_cpu_memory(patcher: pytest.MonkeyPatch) -> None:
    """transformers 5.0 (fixed by 5.8) sizes its paged cache from the GPU's free memory and fails on a CPU (None -
    int) before the first request, dense models included: give it a figure. Each test sets the cache's size."""
    from transformers.generation.continuous_batching import cache

    handler = getattr(cache, "PagedAttentionMemoryHandler", None)
    if handler is not None and hasattr(handler, "get_available_memory") and not torch.cuda.is_available():
        patcher.setattr(handler, "get_available_memory", staticmethod(lambda *args, **kwargs: 8 << 30))


@pytest.fixture(autouse=True)
def cpu_memory_for_the_paged_cache(monkeypatch):
    _give_cpu_memory(monkeypatch)


@functools.cache
def _dense_batching_fails() -> str | None:
    """None when this transformers' own continuous batching runs a tiny unpatched model here, else how it fails
    (5.4's fails in its metrics code): what cannot run dense is no test of the sparse path."""
    try:
        with pytest.MonkeyPatch.context() as patcher:
            _give_cpu_memory(patcher)
            tokens = generate_batch(tiny_model("llama"), prompts((40,)))
        return None if len(tokens[0]) == 4 else f"it gave {tokens}"
    except Exception as err:  # any failure of transformers' own engine
        return f"{type(err).__name__}: {err}"


@pytest.fixture
def dense_batching_runs():
    failure = _dense_batching_fails()
    if failure is not None:
        pytest.skip(f"transformers {version('transformers')}'s own continuous batching fails here, dense included "
                    f"({failure})")


needs_cb = pytest.mark.usefixtures("dense_batching_runs")


def prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def batching_sizes(gen: GenerationConfig, max_batch_tokens: int) -> dict:
    """The arguments that give continuous batching a small paged cache (pages of 32 tokens) and `max_batch_tokens`
    tokens a batch, as this transformers version takes them."""
    import transformers

    sizes = dict(max_batch_tokens=max_batch_tokens, num_blocks=128)
    if not hasattr(transformers, "ContinuousBatchingConfig"):  # < 5.4: generation config fields
        gen.update(**sizes, block_size=32)
        return {}
    config = transformers.ContinuousBatchingConfig
    page = "page_size" if "page_size" in inspect.signature(config).parameters else "block_size"  # < 5.18
    return {"continuous_batching_config": config(**sizes, **{page: 32})}


def generate_batch(model, inputs, max_batch_tokens=256, new_tokens=4):
    """Greedy tokens per request, in request order."""
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        out = model.generate_batch(inputs, gen, progress_bar=False, **batching_sizes(gen, max_batch_tokens))
    by_prompt = {tuple(result.prompt_ids): result.generated_tokens for result in out.values()}
    return [by_prompt[tuple(p)] for p in inputs]  # not by request id: 5.0 numbers the prompts after sorting them


@pytest.fixture
def sparse_calls(monkeypatch):
    """Each sparse call the packed path makes: (queries, keys, last_chunk)."""
    calls = []
    inner = per_request.sparse_attention

    def spy(q, k, v, config, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs["last_chunk"]))
        return inner(q, k, v, config, **kwargs)

    monkeypatch.setattr(per_request, "sparse_attention", spy)
    return calls


@needs_cb
@pytest.mark.parametrize("family, overrides", [
    ("llama", {}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 96}),  # every layer windowed: the engine's own attention, exactly
    ("qwen2", {"use_sliding_window": True, "sliding_window": 96,
               "layer_types": ["full_attention", "sliding_attention"]}),  # hybrid: layer 0 sparse, layer 1 not
])
def test_generate_batch_with_gamma_1_gives_dense_tokens(family, overrides, sparse_calls):
    if overrides.get("sliding_window") and TRANSFORMERS < (5, 8):
        pytest.skip("transformers 5.0's own continuous batching gives windowed layers answers that change from run to "
                    "run of the same unpatched model (5.8 gives the same answers)")
    model = tiny_model(family, **overrides)
    dense = generate_batch(model, prompts())
    name = model.config._attn_implementation  # "sdpa"; "paged|sdpa" where batching renamed it (< 5.10 or so)
    patch_model(model, EXACT)
    assert model.config._attn_implementation == name  # kept: what continuous batching accepts
    assert generate_batch(model, prompts()) == dense
    windowed = overrides.get("sliding_window") is not None and "layer_types" not in overrides
    assert bool(sparse_calls) != windowed, "long requests go sparse unless every layer is windowed"
    unpatch_model(model)
    assert generate_batch(model, prompts()) == dense


def batch_logits(model, inputs, max_batch_tokens):
    """Every logit the model computes through `generate_batch` (its lm_head's outputs, in order)."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    try:
        generate_batch(model, inputs, max_batch_tokens=max_batch_tokens)
    finally:
        hook.remove()
    return seen


@needs_cb
@pytest.mark.parametrize("seed", range(3))
def test_a_window_longer_than_a_chunk_and_shorter_than_the_prompt_keeps_the_windowed_logits(seed):
    """Mistral passes its window only as a call argument. On engines that hand the attention a chunk's new keys
    alone (< 5.24), a window of 300 keys looked longer than the 256-token chunk and the request went sparse over
    keys the window hides: greedy tokens differed from dense on 2 of 6 seeds. A request goes sparse in a windowed
    layer only when the window hides none of its keys; here none does, so the logits are dense's."""
    if TRANSFORMERS < (5, 8):
        pytest.skip("transformers 5.0's own continuous batching gives windowed layers answers that change from run to "
                    "run of the same unpatched model (5.8 gives the same answers)")
    model = tiny_model("mistral", sliding_window=300, seed=seed)
    inputs = prompts((900, 900), seed=seed)
    dense = batch_logits(model, inputs, max_batch_tokens=256)
    patch_model(model, EXACT)
    sparse = batch_logits(model, inputs, max_batch_tokens=256)
    unpatch_model(model)
    assert len(sparse) == len(dense)
    for got, want in zip(sparse, dense, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_cb
def test_chunked_prefill_marks_only_the_prompt_end_as_last_chunk(sparse_calls):
    model = patch_model(tiny_model("llama"), TIGHT)
    tokens = generate_batch(model, prompts((600,)), max_batch_tokens=256)
    assert len(tokens[0]) == 4
    # 600 tokens at 256 a batch: chunks of 256 (keys 256), 256 (keys 512), 88 (keys 600); one call per layer.
    assert sparse_calls == [(256, 256, False)] * 2 + [(256, 512, False)] * 2 + [(88, 600, True)] * 2


@needs_cb
def test_no_request_depends_on_its_batch_mates():
    model = patch_model(tiny_model("llama"), TIGHT)
    inputs = prompts((500, 300, 90, 40), seed=3)
    together = generate_batch(model, inputs, max_batch_tokens=2048)  # one prefill batch, no chunking
    alone = [generate_batch(model, [p], max_batch_tokens=2048)[0] for p in inputs]
    assert together == alone


@needs_cb
def test_a_long_request_arriving_while_another_decodes_gets_what_it_gets_alone(sparse_calls, monkeypatch):
    """The manager itself (`init_continuous_batching`), as a server drives it: a short request is decoding when
    a long one arrives, so the long prompt's chunks share packs with the short one's decode steps."""
    model = patch_model(tiny_model("llama"), TIGHT)
    short, long = prompts((40, 700), seed=7)
    packs, read = [], packed.read_packed

    def reading(*args):
        packs.append(read(*args)[0])
        return read(*args)

    monkeypatch.setattr(packed, "read_packed", reading)
    gen = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, **batching_sizes(gen, 256))
    manager.start()
    try:
        manager.add_request(short, request_id="short", max_new_tokens=64, streaming=True)
        assert 1 <= len(manager.get_result(request_id="short", timeout=30).generated_tokens) < 64  # decoding
        manager.add_request(long, request_id="long", max_new_tokens=4)
        results, deadline = {}, time.monotonic() + 60
        while len(results) < 2 and time.monotonic() < deadline:
            result = manager.get_result(timeout=5)
            if result is not None and result.is_finished():
                results[result.request_id] = result.generated_tokens
    finally:
        manager.stop(block=True, timeout=10)
    assert results == {"short": generate_batch(model, [short], new_tokens=64)[0],
                       "long": generate_batch(model, [long], new_tokens=4)[0]}
    assert any(p is not None and {1, 256 - 1} <= {qe - qs for qs, qe in p.q_bounds} for p in packs), \
        "a pack of the long prompt's chunk with the short request's decode step"
    assert any(keys == 700 and last for _, keys, last in sparse_calls)  # the long prompt's last chunk went sparse


@needs_cb
def test_an_eager_model_batches_sparse_as_paged_eager_and_unpatches_to_eager(sparse_calls):
    """Continuous batching takes eager attention only as "paged|eager" (it refuses "sparse_prefill:eager"): a
    patched eager model moved there stays sparse, gives dense's tokens with gamma 1, and unpatches to "eager"."""
    inputs = prompts((700, 40))
    dense = generate_batch(tiny_model("llama", attn_implementation="eager"), inputs)
    model = patch_model(tiny_model("llama", attn_implementation="eager"), EXACT)
    with pytest.raises(ValueError, match="sparse_prefill:eager"):  # transformers' own refusal, naming the fix
        generate_batch(model, inputs)
    model.set_attn_implementation("paged|eager")
    assert generate_batch(model, inputs) == dense
    assert any(keys == 700 and last for _, keys, last in sparse_calls)
    patch_model(model, TIGHT)  # patching again replaces the config and keeps the name it serves under
    assert model.config._attn_implementation == "paged|eager"
    unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    fresh = tiny_model("llama", attn_implementation="eager")
    ids = torch.tensor([inputs[0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@needs_cb
def test_a_prompt_whose_prefix_the_cache_shares_prefills_sparse_over_the_shared_keys(sparse_calls):
    """Prefix sharing (on by default): a second prompt with the first one's long prefix finds that prefix's pages in
    the cache and prefills only its own end, few queries over many keys. That end goes sparse over every key, the
    shared ones included, and with gamma 1 gives dense's tokens."""
    model = patch_model(tiny_model("llama"), EXACT)
    prefix, first_end, second_end = prompts((640, 40, 150), seed=11)
    first, second = prefix + first_end, prefix + second_end
    gen = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    sizes = batching_sizes(gen, 256)
    if "continuous_batching_config" in sizes and not hasattr(sizes["continuous_batching_config"],
                                                             "allow_block_sharing"):
        pytest.skip(f"transformers {version('transformers')} has no prefix sharing in continuous batching")
    manager = model.init_continuous_batching(generation_config=gen, **sizes)
    manager.start()
    try:
        got = {}
        for name, ids in (("first", first), ("second", second)):  # one after the other: the second finds the first's
            manager.add_request(ids, request_id=name, max_new_tokens=4)
            deadline = time.monotonic() + 60
            while name not in got and time.monotonic() < deadline:
                result = manager.get_result(request_id=name, timeout=5)
                if result is not None and result.is_finished():
                    got[name] = result.generated_tokens
    finally:
        manager.stop(block=True, timeout=10)
    shared = [(queries, keys) for queries, keys, last in sparse_calls if keys == len(second) and last]
    assert shared and shared[-1][0] < len(second_end) + 64, f"no prefix hit: sparse calls {sparse_calls}"
    unpatch_model(model)
    assert got == {"first": generate_batch(model, [first])[0], "second": generate_batch(model, [second])[0]}


# ---------------------------------------------------------------------------------------------
# The packed call itself: what the attention function gets from continuous batching
# ---------------------------------------------------------------------------------------------

def packed_call(q_lens, k_lens, seed=0):
    """q [1, 4, Tq, 16], k/v [1, 2, Tk, 16], sdpa's block-diagonal causal mask and the engine's arguments."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, sum(q_lens), 16, generator=g) * 2
    k, v = (torch.randn(1, 2, sum(k_lens), 16, generator=g) for _ in range(2))
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.full((1, 1, sum(q_lens), sum(k_lens)), torch.finfo(torch.float32).min)
    for i in range(len(q_lens)):
        rows = torch.arange(cu_q[i], cu_q[i + 1])
        cols = torch.arange(cu_k[i], cu_k[i + 1])
        allowed = cols[None] - cu_k[i] <= rows[:, None] - cu_q[i] + (k_lens[i] - q_lens[i])
        mask[0, 0, cu_q[i]:cu_q[i + 1], cu_k[i]:cu_k[i + 1]] = torch.where(allowed, 0.0, mask.min())
    kwargs = dict(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=max(q_lens), max_length_k=max(k_lens),
                  logits_indices=cu_q[1:] - 1, is_causal=False)
    return q, k, v, mask, kwargs


def attention_module(config):
    module = torch.nn.Module()
    module.is_causal, module.layer_idx, module.num_key_value_groups = True, 0, 2
    glue._CONFIGS[module] = config
    return ALL_ATTENTION_FUNCTIONS[glue._register("sdpa")], module


def attend_packed(engine, module, q, k, v, mask, kwargs, config, scaling=0.25):
    """The packed path on one call of `engine` (the engine's attention function)."""
    return packed.attend_packed(packed.EngineCall(engine, module, q, k, v, mask, 0.0, scaling, kwargs), config)


def request(x, bounds, i):
    return x[:, :, bounds[i]:bounds[i + 1]]


def test_long_requests_get_what_they_get_alone_and_the_rest_the_engines_call_over_their_own_pack():
    q_lens, k_lens = (300, 1, 40, 200), (300, 500, 40, 700)  # a prompt, a decode step, a short prompt, a chunk
    q, k, v, mask, kwargs = packed_call(q_lens, k_lens)
    attention, module = attention_module(TIGHT)
    out, weights = attention(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert weights is None and out.shape == (1, sum(q_lens), 4, 16)
    cu_q, cu_k = kwargs["cu_seq_lens_q"].tolist(), kwargs["cu_seq_lens_k"].tolist()
    for i in (0, 3):  # sparse, selected for this request alone: exactly what it gets alone
        got = out[:, cu_q[i]:cu_q[i + 1]].transpose(1, 2)
        want = sparse_attention(request(q, cu_q, i), request(k, cu_k, i), request(v, cu_k, i), TIGHT, scale=0.25)
        assert torch.equal(got, want), i
    # The decode step and the short prompt: the engine's function once, over a pack of the two alone (their rows
    # and columns of the mask), which is what each gets alone, rounding aside.
    rows = torch.cat([torch.arange(cu_q[1], cu_q[2]), torch.arange(cu_q[2], cu_q[3])])
    cols = torch.cat([torch.arange(cu_k[1], cu_k[2]), torch.arange(cu_k[2], cu_k[3])])
    pack = sdpa_attention_forward(module, q[:, :, rows], k[:, :, cols], v[:, :, cols], mask[:, :, rows][..., cols],
                                  scaling=0.25, is_causal=False)[0]
    assert torch.equal(out[:, rows], pack)
    for i in (1, 2):
        alone = sdpa_attention_forward(module, request(q, cu_q, i), request(k, cu_k, i), request(v, cu_k, i),
                                       mask[..., cu_q[i]:cu_q[i + 1], cu_k[i]:cu_k[i + 1]], scaling=0.25,
                                       is_causal=False)[0]
        torch.testing.assert_close(out[:, cu_q[i]:cu_q[i + 1]], alone, rtol=1e-6, atol=1e-6)
    dense = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=False)[0]
    assert (out - dense).abs().max() > 1e-3, "gamma 0.4 must change the long requests"


def test_a_pack_with_no_long_request_is_the_engines_call_unchanged(monkeypatch):
    q, k, v, mask, kwargs = packed_call((40, 30, 1), (40, 30, 900))
    attention, module = attention_module(TIGHT)
    monkeypatch.setattr(packed, "read_packed", lambda *a: pytest.fail("no host read for a pack of short requests"))
    out, _ = attention(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert torch.equal(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=False)[0])


def test_only_the_request_whose_last_query_gives_a_token_is_a_prompt_end(monkeypatch):
    q, k, v, mask, kwargs = packed_call((200, 150), (200, 800))
    kwargs["logits_indices"] = torch.tensor([349], dtype=torch.int32)  # request 0 is a chunk of a longer prompt
    seen = []
    monkeypatch.setattr(per_request, "sparse_attention", lambda q, *a, **kw: seen.append(kw["last_chunk"]) or q)
    attention, module = attention_module(TIGHT)
    attention(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert seen == [False, True]


def test_a_chunk_that_is_no_prompt_end_skips_the_tail_and_question_columns():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 4, 256, 16, generator=g) * 2, *(torch.randn(1, 2, 1024, 16, generator=g) for _ in "kv")
    config = TIGHT.replace(exact_tail_tokens=128, question_blocks=4)
    _, end = sparse_attention(q, k, v, config, return_layout=True)
    _, chunk = sparse_attention(q, k, v, config, last_chunk=False, return_layout=True)
    _, plain = sparse_attention(q, k, v, config.replace(exact_tail_tokens=0, question_blocks=0), return_layout=True)
    assert torch.equal(chunk.to_mask(), plain.to_mask())
    assert end.to_mask().sum() > chunk.to_mask().sum()


class OutOfResources(Exception):
    """What Triton raises for a kernel the GPU cannot hold (its errors are no RuntimeError)."""


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, OutOfResources])  # raised fresh: a kept one holds frames
def test_a_request_the_sparse_path_fails_on_runs_dense_with_one_warning(monkeypatch, error):
    q, k, v, mask, kwargs = packed_call((300, 200), (300, 200))

    def failing(*args, **kwargs):
        raise error("out of memory (simulated)")

    monkeypatch.setattr(per_request, "sparse_attention", failing)
    attention, module = attention_module(TIGHT)
    forget_warnings()
    with pytest.warns(SparsePrefillWarning, match=f"failed on.*{error.__name__}") as caught:
        out, _ = attention(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert len([w for w in caught if "failed on" in str(w.message)]) == 1
    dense = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=False)[0]
    assert torch.allclose(out, dense, atol=1e-5)


@pytest.mark.parametrize("change, reason", [
    (lambda kw: kw.update(cu_seq_lens_k=kw["cu_seq_lens_k"][:-1]), "matching"),
    (lambda kw: kw.update(cu_seq_lens_q=torch.tensor([0, 300, 900], dtype=torch.int32)), "do not fit"),
    (lambda kw: kw.update(cache=object()), "cache .* cannot update"),  # a cache of no transformers version
])
def test_packed_calls_the_sparse_path_cannot_read_go_to_the_engine_with_a_warning(change, reason):
    q, k, v, mask, kwargs = packed_call((300, 200), (300, 200))
    change(kwargs)
    calls = []
    dense = glue._ORIGINALS.get("sdpa")
    attention, module = attention_module(TIGHT)
    glue._ORIGINALS["sdpa"] = lambda *a, **kw: calls.append(kw) or (torch.zeros(1, 500, 4, 16), None)
    try:
        forget_warnings()
        with pytest.warns(SparsePrefillWarning, match=reason):
            attention(module, q, k, v, mask, scaling=0.25, **kwargs)
    finally:
        glue._ORIGINALS["sdpa"] = dense or sdpa_attention_forward
    assert len(calls) == 1 and calls[0].get("cu_seq_lens_q") is kwargs["cu_seq_lens_q"]


def test_a_packed_call_the_glue_fails_on_gets_the_engines_answer_with_one_warning(monkeypatch):
    """A fault of the serving glue itself (here: reading the lengths) must not stop the engine: the call gets the
    engine's own attention, said once."""
    q, k, v, mask, kwargs = packed_call((300, 200), (300, 200))
    monkeypatch.setattr(packed, "read_packed", lambda *args: [][0])
    attention, module = attention_module(TIGHT)
    forget_warnings()
    with pytest.warns(SparsePrefillWarning, match="packed call the sparse path failed on.*IndexError") as caught:
        for _ in range(2):
            out, _ = attention(module, q, k, v, mask, scaling=0.25, **kwargs)
    assert len([w for w in caught if "failed on" in str(w.message)]) == 1
    assert torch.equal(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=False)[0])


class IndexedCache:
    """A paged cache as transformers 5.0-5.18 hand it to the attention function: `update` writes this call's new
    keys at `write_index` and reads every request's keys back at `read_index`, [L, Hkv, D] (one layer group)."""

    def __init__(self, k, v, new_slots):
        self.keys, self.values = k[0].transpose(0, 1).clone(), v[0].transpose(0, 1).clone()
        self.keys[new_slots], self.values[new_slots] = 0.0, 0.0  # this call's keys are not written yet
        self.updates = 0

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        self.updates += 1
        self.keys[write_index[0]] = key_states[0].transpose(0, 1)
        self.values[write_index[0]] = value_states[0].transpose(0, 1)
        return self.keys[read_index[0]], self.values[read_index[0]]


class KwargsCache(IndexedCache):
    """The same as transformers 5.19-5.23 hand it: `update` also puts this layer's key lengths into the call's
    kwargs (in place) and returns [1, Hkv, L, D]."""

    def update(self, key_states, value_states, layer_idx, kwargs):
        for name in ("cu_seq_lens_k", "max_length_k"):
            kwargs[name] = kwargs[name]["full_attention"]
        keys, values = super().update(key_states, value_states, layer_idx, kwargs["read_index"], kwargs["write_index"])
        return keys.transpose(0, 1)[None], values.transpose(0, 1)[None]


def paged_sdpa_before_5_19(module, q, k, v, mask, cache=None, **kwargs):
    """The engine's function of those versions (5.18's `paged|sdpa`: no call without a cache)."""
    if cache is None:
        raise ValueError("`paged|sdpa` was called without a paged attention cache")
    k, v = cache.update(key_states=k, value_states=v, layer_idx=module.layer_idx, read_index=kwargs["read_index"],
                        write_index=kwargs["write_index"])
    return sdpa_attention_forward(module, q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, **kwargs)


def sdpa_5_19(module, q, k, v, mask, cache=None, **kwargs):
    """5.19-5.23's `sdpa`: it updates a cache of its own kind, if it gets one."""
    if isinstance(cache, KwargsCache):
        k, v = cache.update(k, v, module.layer_idx, kwargs=kwargs)
    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)


def cache_updating_call(q_lens, k_lens, cache_class):
    """`packed_call` as an engine that updates its cache in the attention function hands it over: the new keys
    alone, the cache holding every request's earlier keys. Also the call as >= 5.24 makes it, keys read back."""
    q, k, v, mask, kwargs = packed_call(q_lens, k_lens)
    ends = kwargs["cu_seq_lens_k"][1:].tolist()
    new_slots = torch.cat([torch.arange(end - n, end) for n, end in zip(q_lens, ends, strict=True)])
    cache = cache_class(k, v, new_slots)
    old = {name: kwargs[name] for name in ("cu_seq_lens_q", "logits_indices", "is_causal")}
    old.update(cache=cache, read_index=[torch.arange(sum(k_lens))], write_index=[new_slots])
    if cache_class is KwargsCache:
        old.update(cu_seq_lens_k={"full_attention": kwargs["cu_seq_lens_k"]}, max_length_q=kwargs["max_length_q"],
                   max_length_k={"full_attention": kwargs["max_length_k"]})
    else:
        old.update(cu_seq_lens_k=kwargs["cu_seq_lens_k"], max_seqlen_q=kwargs["max_length_q"],
                   max_seqlen_k=kwargs["max_length_k"])
    return (q, k[:, :, new_slots], v[:, :, new_slots], mask, old), (k, v, kwargs), cache


@pytest.mark.parametrize("cache_class, engine", [(IndexedCache, paged_sdpa_before_5_19), (KwargsCache, sdpa_5_19)])
def test_engines_that_update_their_cache_in_the_attention_get_it_updated_once_and_the_same_answer(cache_class,
                                                                                                  engine):
    """transformers < 5.24 hands the attention this call's keys and its paged cache: the wrapper updates the cache as
    the engine's function would, once, and answers as >= 5.24 does with the keys read back."""
    q_lens, k_lens = (300, 1, 40, 200), (300, 500, 40, 700)  # a prompt, a decode step, a short prompt, a chunk
    (q, k_new, v_new, mask, old), (k, v, kwargs), cache = cache_updating_call(q_lens, k_lens, cache_class)
    module = attention_module(TIGHT)[1]
    out = attend_packed(engine, module, q, k_new, v_new, mask, old, TIGHT)
    want = attend_packed(sdpa_attention_forward, module, q, k, v, mask, kwargs, TIGHT)
    assert torch.equal(out, want)
    assert cache.updates == 1 and torch.equal(cache.keys, k[0].transpose(0, 1))
    dense = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=False)[0]
    assert (out - dense).abs().max() > 1e-3, "gamma 0.4 must change the long requests"


@pytest.mark.parametrize("cache_class, engine", [(IndexedCache, paged_sdpa_before_5_19), (KwargsCache, sdpa_5_19)])
def test_an_engine_that_updates_its_cache_gets_a_call_with_no_long_request_untouched(cache_class, engine):
    (q, k_new, v_new, mask, old), _, cache = cache_updating_call((40, 1), (40, 900), cache_class)
    module = attention_module(TIGHT)[1]
    assert attend_packed(engine, module, q, k_new, v_new, mask, old, TIGHT) is None
    assert cache.updates == 0  # the engine's own function, called by the wrapper on None, makes the update


@pytest.mark.parametrize("cache_class, engine", [(IndexedCache, paged_sdpa_before_5_19), (KwargsCache, sdpa_5_19)])
def test_an_engine_that_updates_its_cache_gets_it_updated_once_when_the_glue_fails_after_the_update(
        cache_class, engine, monkeypatch):
    """A fault after the wrapper updated the cache: the engine's attention over the keys read back, no second
    update (the engine's own function would write them again)."""
    (q, k_new, v_new, mask, old), (k, v, kwargs), cache = cache_updating_call((300, 200), (300, 700), cache_class)
    monkeypatch.setattr(packed, "read_packed", lambda *args: [][0])
    module = attention_module(TIGHT)[1]
    forget_warnings()
    with pytest.warns(SparsePrefillWarning, match="failed on.*IndexError"):
        out = attend_packed(engine, module, q, k_new, v_new, mask, old, TIGHT)
    assert cache.updates == 1
    assert torch.equal(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, is_causal=False)[0])


def test_an_engine_that_updates_its_cache_has_its_requests_measured_by_the_keys_it_holds(sparse_calls, monkeypatch):
    """Such an engine hands the attention this call's new keys alone (500 here): whether a request is long enough
    for the sparse path is decided on the keys it holds once the cache is updated (700 for the chunk)."""
    (q, k_new, v_new, mask, old), _, cache = cache_updating_call((300, 200), (300, 700), IndexedCache)
    config = TIGHT.replace(min_seq_len=600)
    attention, module = attention_module(config)
    monkeypatch.setitem(glue._ORIGINALS, "sdpa", paged_sdpa_before_5_19)
    out, _ = attention(module, q, k_new, v_new, mask, scaling=0.25, **old)
    assert sparse_calls == [(200, 700, True)] and cache.updates == 1 and out.shape == (1, 500, 4, 16)


def test_a_flash_engine_that_updates_its_cache_gets_the_short_pack_as_its_varlen_call_wants_it():
    """5.0-5.18's `paged|flash_attention_2` reads keys [L, Hkv, D] back from its cache and takes lengths under
    `max_seqlen_*`, per layer type where a model mixes them (flash cannot run here: a stand-in records them)."""
    (q, k_new, v_new, _, old), _, cache = cache_updating_call((300, 40, 1), (300, 40, 77), IndexedCache)
    old.update(is_causal=True, cu_seq_lens_k={"full_attention": old["cu_seq_lens_k"]},
               max_seqlen_k={"full_attention": old["max_seqlen_k"]})
    handed = []

    def paged_flash(module, q, k, v, mask, cache=None, **kw):
        k, v = cache.update(key_states=k, value_states=v, layer_idx=module.layer_idx, read_index=kw["read_index"],
                            write_index=kw["write_index"])
        handed.append((tuple(k.shape), kw["cu_seq_lens_k"].tolist(), kw["max_seqlen_q"], kw["max_seqlen_k"]))
        return torch.zeros(1, q.shape[2], q.shape[1], q.shape[3]), None

    out = attend_packed(paged_flash, attention_module(TIGHT)[1], q, k_new, v_new, None, old, TIGHT)
    assert handed == [((117, 2, 16), [0, 40, 117], 40, 77)]  # one call: the short prompt and the decode step
    assert cache.updates == 1 and out[:, :300].abs().sum() > 0


def test_an_engine_that_updates_its_cache_keeps_the_exact_answer_when_the_sparse_path_cannot_read_the_call():
    """Once the wrapper has updated the cache the call cannot go back to the engine (it would update it again):
    a call the sparse path then declines is answered here, by the engine's function over the keys read back."""
    (q, k_new, v_new, mask, old), (k, v, kwargs), cache = cache_updating_call((300, 40), (300, 40), IndexedCache)
    old["cu_seq_lens_q"] = torch.tensor([0, 300, 900], dtype=torch.int32)  # lengths that do not fit the call
    forget_warnings()
    with pytest.warns(SparsePrefillWarning, match="do not fit"):
        out = attend_packed(paged_sdpa_before_5_19, attention_module(TIGHT)[1], q, k_new, v_new, mask, old, TIGHT)
    assert cache.updates == 1
    assert torch.equal(out, sdpa_attention_forward(attention_module(TIGHT)[1], q, k, v, mask, scaling=0.25,
                                                   is_causal=False)[0])


def test_flash_style_packs_give_the_engine_its_short_requests_in_one_call(monkeypatch):
    """Flash attention cannot run here: a stand-in records what the engine's function is handed."""
    q, k, v, _, kwargs = packed_call((300, 40, 1), (300, 40, 77))
    kwargs.update(is_causal=True, position_ids=torch.arange(341)[None])
    handed = []

    def flash(module, q, k, v, mask, **kw):
        handed.append((q.shape[2], k.shape[2], kw["cu_seq_lens_q"].tolist(), kw["cu_seq_lens_k"].tolist(),
                       kw["max_length_q"], kw["max_length_k"], tuple(kw["position_ids"].shape), mask))
        return torch.zeros(1, q.shape[2], q.shape[1], q.shape[3]), None

    out = attend_packed(flash, attention_module(TIGHT)[1], q, k, v, None, kwargs, TIGHT)
    assert handed == [(41, 117, [0, 40, 41], [0, 40, 117], 40, 77, (1, 41), None)]
    assert out.shape == (1, 341, 4, 16) and out[:, :300].abs().sum() > 0


def flash_recorder(handed):
    """A stand-in for flash attention (which cannot run here) that records (queries, keys) of each call."""
    def flash(module, q, k, v, mask, **kw):
        handed.append((q.shape[2], k.shape[2]))
        return torch.zeros(1, q.shape[2], q.shape[1], q.shape[3]), None
    return flash


def layer(config, index):
    module = attention_module(config)[1]
    module.layer_idx = index
    return module


def test_what_a_pack_holds_is_read_once_per_forward_and_later_layers_build_no_tensor_from_host_values(monkeypatch):
    """On a GPU a tensor built from host values is a copy that waits for every kernel queued before it (the loop
    measured 5 % over the engine's one call on an H200 while it built two such tensors per request and layer):
    the first layer of a forward reads the pack and builds its index tensors, the others reuse them."""
    import inspect as inspect_module

    built_here = []
    original = {name: getattr(torch, name) for name in ("tensor", "arange")}

    def spy(name):
        def built(*args, **kwargs):
            if inspect_module.stack()[1].filename.endswith("packed.py"):
                built_here.append(name)
            return original[name](*args, **kwargs)
        return built

    q, k, v, _, kwargs = packed_call((300, 40, 1), (300, 40, 77))
    kwargs.update(is_causal=True)
    for name in original:
        monkeypatch.setattr(torch, name, spy(name))
    handed, layers = [], [layer(TIGHT, i) for i in range(3)]
    attend_packed(flash_recorder(handed), layers[0], q, k, v, None, kwargs, TIGHT)
    assert built_here, "the first layer builds the pack's index tensors"
    built_here.clear()
    for module in layers[1:]:
        attend_packed(flash_recorder(handed), module, q, k, v, None, kwargs, TIGHT)
    assert handed == [(41, 117)] * 3 and not built_here


def test_a_buffer_the_engine_reuses_for_the_next_forward_is_read_again():
    """Engines reuse their length buffers from step to step, and tensors made under inference mode keep no version
    counter: what a pack holds is trusted only until a layer that read it reads it again (the next forward)."""
    q, k, v, _, kwargs = packed_call((300, 40, 1), (300, 40, 77))
    kwargs.update(is_causal=True)
    with torch.inference_mode():
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
            kwargs[name] = kwargs[name].clone()
    handed, module = [], layer(TIGHT, 0)
    attend_packed(flash_recorder(handed), module, q, k, v, None, kwargs, TIGHT)
    with torch.inference_mode():  # the next step: the same buffers, other requests (in place: no version moves)
        kwargs["cu_seq_lens_q"].copy_(torch.tensor([0, 40, 41, 341], dtype=torch.int32))
        kwargs["cu_seq_lens_k"].copy_(torch.tensor([0, 40, 117, 417], dtype=torch.int32))
    kwargs["logits_indices"] = kwargs["cu_seq_lens_q"][1:] - 1
    q2, k2, v2 = (torch.cat([x[:, :, 300:], x[:, :, :300]], dim=2) for x in (q, k, v))
    out = attend_packed(flash_recorder(handed), module, q2, k2, v2, None, kwargs, TIGHT)
    assert handed == [(41, 117), (41, 117)]
    assert out[:, 41:].abs().sum() > 0 and out[:, :41].abs().sum() == 0  # the long request's rows moved


def test_a_layer_makes_as_many_launches_for_8_short_requests_as_for_64(monkeypatch):
    """The short requests of a pack go to the engine in one call, whatever their number: the glue's own tensor
    operations per layer do not grow with the requests (one engine call and ~7 copies per short request before).
    Counted with the sparse path and the engine stubbed out, on a layer after the first (the first reads the pack)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(per_request, "sparse_attention", lambda q, *a, **kw: q)
    counts = []
    for shorts in (8, 64):
        q_lens, k_lens = (300, 200) + (1,) * shorts, (300, 700) + (500,) * shorts
        q, k, v, mask, kwargs = packed_call(q_lens, k_lens)
        handed, layers = [], [layer(TIGHT, i) for i in range(2)]
        attend_packed(flash_recorder(handed), layers[0], q, k, v, mask, kwargs, TIGHT)
        with Count() as count:
            attend_packed(flash_recorder(handed), layers[1], q, k, v, mask, kwargs, TIGHT)
        assert handed == [(shorts, 500 * shorts)] * 2
        counts.append(count.ops)
    # aten operations, views included: 24 under torch 2.13, 38 under 2.8
    assert counts[0] == counts[1] and counts[0] <= 50, counts


def test_long_requests_are_launched_before_the_short_ones(sparse_calls):
    """The host prepares the short pack's engine call while the long requests' kernels run, not before them with
    an idle GPU: a pack whose short requests come first still launches its long request first."""
    q, k, v, _, kwargs = packed_call((40, 1, 300), (40, 77, 300))
    kwargs.update(is_causal=True)
    order = []

    def flash(module, q, k, v, mask, **kw):
        order.append(("engine", q.shape[2], len(sparse_calls)))
        return torch.zeros(1, q.shape[2], q.shape[1], q.shape[3]), None

    out = attend_packed(flash, attention_module(TIGHT)[1], q, k, v, None, kwargs, TIGHT)
    assert sparse_calls == [(300, 300, True)] and order == [("engine", 41, 1)]
    assert out[:, 41:].abs().sum() > 0 and out[:, :41].abs().sum() == 0  # each output lands in its own rows


def test_the_engine_gets_each_request_as_fresh_aligned_tensors():
    """cuDNN's attention failed with a misaligned address on an H200 when handed views that start mid-buffer (a
    request's mask rows at an odd column, its queries mid-pack): the engine must get tensors laid out as a batch
    of that request alone would give them."""
    q, k, v, mask, kwargs = packed_call((300, 37), (300, 61))
    handed = []

    def sdpa(module, q, k, v, mask, **kw):
        handed.append((q, k, v, mask))
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    attend_packed(sdpa, attention_module(TIGHT)[1], q, k, v, mask, kwargs, TIGHT)
    (q1, k1, v1, m1), = handed
    assert m1.shape[-2:] == (37, 61) and (m1.stride(-2) * m1.element_size()) % 16 == 0
    assert all(t.data_ptr() % 16 == 0 and t.storage_offset() == 0 for t in (q1, k1, v1, m1))
    assert torch.equal(m1, mask[..., 300:, 300:]) and torch.equal(q1, q[:, :, 300:])


def test_unpatching_the_last_model_restores_the_registry_and_unpatched_models_compile_fully():
    patched, other = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))

    def compiled_logits():  # fullgraph: another model's calls pass through the wrapper without a graph break
        torch._dynamo.reset()
        with torch.no_grad():
            return torch.compile(other, backend="eager", fullgraph=True)(ids).logits

    want = compiled_logits()  # before any model is patched (compiled, as eager and compiled differ by rounding)
    patch_model(patched, EXACT)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward
    assert torch.equal(compiled_logits(), want)
    unpatch_model(patched)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
