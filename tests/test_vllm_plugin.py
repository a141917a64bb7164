"""The vLLM plugin's engine-independent parts, without vLLM: the paged gather, vLLM's step metadata read into
requests, which requests go sparse, the config channel, registration and packaging.

vLLM cannot be installed here (its wheels are CUDA builds), so everything the backend does that does not need a
vLLM class is a plain function tested here; `test_vllm_backend.py` tests the classes where vLLM imports.
"""

import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sparse_prefill import SparsePrefillConfig
from sparse_prefill.config import config_from_text
from sparse_prefill.patches import vllm as plugin
from sparse_prefill.patches.per_request import PackedRequests, check_proxy_heads, rank_config
from sparse_prefill.patches.vllm.paged import StepRequests, gather_request_kv, read_step

ROOT = Path(__file__).resolve().parents[1]
PAGE, HKV, D = 16, 2, 8


def paged_cache(lengths, num_blocks=40, layout="NHD", seed=0):
    """A vLLM FlashAttention cache [num_blocks, 2, PAGE, HKV, D] holding requests of `lengths`, their pages spread
    over the cache out of order, written one token at a time (the reference); also each request's block-table row
    (padded with garbage page ids past its length) and its true keys and values [Hkv, L, D]."""
    g = torch.Generator().manual_seed(seed)
    if layout == "NHD":
        cache = torch.full((num_blocks, 2, PAGE, HKV, D), float("nan"))
    else:  # "HND": heads before tokens in memory, the same logical shape
        cache = torch.full((num_blocks, 2, HKV, PAGE, D), float("nan")).transpose(2, 3)
    free = torch.randperm(num_blocks - 1, generator=g).tolist()  # block 0 stays unused, as vLLM's null block
    rows, truth = [], []
    width = max(-(-n // PAGE) for n in lengths) + 2
    for n in lengths:
        pages = [free.pop() + 1 for _ in range(-(-n // PAGE))]
        k, v = torch.randn(HKV, n, D, generator=g), torch.randn(HKV, n, D, generator=g)
        for pos in range(n):
            cache[pages[pos // PAGE], 0, pos % PAGE] = k[:, pos]
            cache[pages[pos // PAGE], 1, pos % PAGE] = v[:, pos]
        rows.append(torch.tensor(pages + [num_blocks + 7] * (width - len(pages)), dtype=torch.int32))
        truth.append((k, v))
    return cache, torch.stack(rows), truth


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gather_reads_each_request_from_its_pages(layout):
    """Rule: request i's keys/values are its first seq_len positions, in order, from the pages its block-table row
    lists (odd lengths end mid-page; pages lie out of order; entries past the length are never read)."""
    lengths = [1, 15, 16, 17, 50, 3 * PAGE]
    cache, table, truth = paged_cache(lengths, layout=layout)
    for i, n in enumerate(lengths):
        k, v = gather_request_kv(cache, table[i], n)
        assert k.shape == v.shape == (1, HKV, n, D)
        torch.testing.assert_close(k[0], truth[i][0], rtol=0, atol=0)
        torch.testing.assert_close(v[0], truth[i][1], rtol=0, atol=0)


def test_gather_result_is_laid_out_like_transformers_views():
    """The gathered [1, Hkv, L, D] is tokens-then-heads in memory with a unit head-dim stride (what transformers
    hands the selection and kernel, read without a copy), and a fresh tensor: the cache is never aliased."""
    cache, table, _ = paged_cache([40])
    k, _ = gather_request_kv(cache, table[0], 40)
    assert k.stride()[1:] == (D, HKV * D, 1)
    assert k.untyped_storage().data_ptr() != cache.untyped_storage().data_ptr()


def query_start_loc(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


CFG = SparsePrefillConfig(block_size=64, min_seq_len=256)


def test_read_step_bounds_and_which_requests_go_sparse():
    """Rules: request i's queries are [qsl[i], qsl[i+1]) and its keys its whole sequence (0, seq_len); a request
    goes sparse with a block of queries and min_seq_len keys. Decode (1 query), a short prompt, a long prompt's
    chunk, a prefix-cache hit's first chunk (64 new queries over 300 cached keys) and a chunk too small (63)."""
    q_lens = [1, 100, 128, 64, 63]
    seq_lens = [900, 100, 512, 364, 900]
    step = read_step(query_start_loc(q_lens), torch.tensor(seq_lens), len(q_lens), max(q_lens), max(seq_lens), CFG)
    assert step.requests.q_bounds == ((0, 1), (1, 101), (101, 229), (229, 293), (293, 356))
    assert step.requests.k_bounds == tuple((0, n) for n in seq_lens)
    assert step.sparse == (False, False, True, True, False)
    assert step.requests.last_chunk == (True,) * 5  # the metadata cannot tell a middle chunk: the safe choice


def test_read_step_reads_nothing_when_the_maxima_rule_sparse_out():
    """Rule: a decode step or a step of short prompts is decided from vLLM's host maxima alone, before any tensor
    is read; and a step without vLLM's host copy of the lengths stays dense rather than wait for the GPU."""
    class Unreadable:
        def __getitem__(self, _):
            raise AssertionError("read a tensor for a step the maxima rule out")

    assert read_step(Unreadable(), Unreadable(), 8, 1, 100_000, CFG) is None  # decode only
    assert read_step(Unreadable(), Unreadable(), 8, 4096, 255, CFG) is None  # every prompt below min_seq_len
    assert read_step(query_start_loc([512]), None, 1, 512, 512, CFG) is None
    step = read_step(query_start_loc([1, 1]), torch.tensor([900, 900]), 2, 1, 900, CFG)
    assert step is None


def test_read_step_is_none_when_no_request_is_long_or_the_batch_is_not_causal():
    """Maxima can say "maybe" (one request has many queries, another many keys) while no single request is long;
    and a request with more queries than keys is no causal prefill: FlashAttention takes such a step whole."""
    assert read_step(query_start_loc([200, 1]), torch.tensor([200, 900]), 2, 200, 900, CFG) is None
    assert read_step(query_start_loc([300]), torch.tensor([280]), 1, 300, 280, CFG) is None


def test_a_step_names_its_sparse_requests_and_whether_flash_attention_has_work():
    """Rule: the sparse requests are named once per step; FlashAttention runs (one call, the sparse requests' keys
    zeroed) only when some other request has queries (vLLM's padded requests have none)."""
    q_lens = [1, 1, 500, 20, 0, 500, 0, 0]
    edges = query_start_loc(q_lens).tolist()
    bounds = tuple(zip(edges[:-1], edges[1:], strict=True))
    requests = PackedRequests(bounds, tuple((0, 600) for _ in q_lens), (True,) * 8)
    step = StepRequests(requests, requests.sparse(CFG))
    assert step.sparse == (False, False, True, False, False, True, False, False)
    assert step.sparse_indices == (2, 5) and step.any_dense
    only_long = PackedRequests(bounds[2:3] + bounds[4:5], ((0, 600), (0, 16)), (True, True))
    assert not StepRequests(only_long, only_long.sparse(CFG)).any_dense  # the padded request has no query


def test_prefix_cache_hit_counts_cached_keys():
    """The prefix-caching case: a first chunk whose sequence is longer than its queries (the prefix came from the
    cache) goes sparse on its total keys; the same queries without the cached prefix stay dense."""
    hit = PackedRequests(((0, 128),), ((0, 4096),), (True,))
    cold = PackedRequests(((0, 128),), ((0, 128),), (True,))
    assert hit.sparse(CFG) == (True,)
    assert cold.sparse(CFG) == (False,)


def test_config_from_text_and_env():
    """The config channel: SPARSE_PREFILL_CONFIG holds `field=value` pairs parsed by config_from_options; unset or
    empty gives the defaults; every mistake names the variable and what is wrong."""
    assert config_from_text("gamma=0.9, min_seq_len=auto,proxy_heads=kv") == SparsePrefillConfig(
        gamma=0.9, min_seq_len=None, proxy_heads="kv")
    assert plugin.config_from_env({}) == SparsePrefillConfig()
    assert plugin.config_from_env({"SPARSE_PREFILL_CONFIG": ""}) == SparsePrefillConfig()
    assert plugin.config_from_env({"SPARSE_PREFILL_CONFIG": "min-seq-len=0,block_size=64"}) == SparsePrefillConfig(
        min_seq_len=0, block_size=64)
    for text, words in [("gamma0.9", "field=value"), ("gama=0.9", "Unknown SparsePrefillConfig field"),
                        ("gamma=1.5", "gamma"), ("gamma=0.9,gamma=0.8", "twice")]:
        with pytest.raises(ValueError, match=words) as err:
            plugin.config_from_env({"SPARSE_PREFILL_CONFIG": text})
        assert "SPARSE_PREFILL_CONFIG" in str(err.value)


def test_version_problem_names_the_supported_versions():
    assert plugin.version_problem("0.24.0") is None
    assert plugin.version_problem("0.24.2.dev7+gabc") is None
    for version in ("0.25.0", "0.23.1", "1.0.0", "dev"):
        problem = plugin.version_problem(version)
        assert "0.24.x" in problem and version in problem


def fake_vllm(monkeypatch, version="0.24.0", taken_by=None):
    """A stand-in for the two names of vLLM's registry that `register` uses (a dict of overrides)."""
    overrides = {}

    class Custom:
        def is_overridden(self):
            return self in overrides

        def get_path(self):
            return overrides[self]

    class Enum:
        CUSTOM = Custom()

    if taken_by is not None:
        overrides[Enum.CUSTOM] = taken_by
    registry = types.ModuleType("vllm.v1.attention.backends.registry")
    registry.AttentionBackendEnum = Enum
    registry.register_backend = lambda backend, path: overrides.__setitem__(backend, path)
    vllm = types.ModuleType("vllm")
    vllm.__version__ = version
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    for name in ("vllm.v1", "vllm.v1.attention", "vllm.v1.attention.backends"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.registry", registry)
    return overrides, Enum.CUSTOM


def test_register_puts_the_backend_path_under_custom(monkeypatch, caplog):
    overrides, custom = fake_vllm(monkeypatch)
    plugin.register()
    plugin.register()  # vLLM may load plugins more than once
    assert overrides == {custom: plugin.BACKEND_PATH}
    overrides, custom = fake_vllm(monkeypatch, version="0.26.1")  # unsupported: registered, and said
    with caplog.at_level(logging.INFO, logger="vllm.plugins.sparse_prefill"):
        plugin.register()
    assert overrides == {custom: plugin.BACKEND_PATH}
    assert "supports vLLM 0.24.x" in caplog.text


def test_register_leaves_another_plugins_backend_alone(monkeypatch, caplog):
    overrides, custom = fake_vllm(monkeypatch, taken_by="other.plugin.Backend")
    with caplog.at_level(logging.WARNING, logger="vllm.plugins.sparse_prefill"):
        plugin.register()
    assert overrides == {custom: "other.plugin.Backend"}
    assert "other.plugin.Backend" in caplog.text


def test_register_never_raises_without_a_registry(monkeypatch, caplog):
    """A vLLM process that cannot import the registry (another vLLM layout, or none) keeps running."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with caplog.at_level(logging.INFO, logger="vllm.plugins.sparse_prefill"):
        assert plugin.register() is None
    assert "not registered" in caplog.text


def test_importing_the_plugin_imports_neither_torch_nor_transformers():
    """vLLM imports the entry point's module in every process it starts: that import must cost nothing."""
    code = ("import sys, sparse_prefill.patches.vllm as p; p.config_from_env({}); "
            "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_pyproject_declares_the_entry_point_and_the_extra():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["sparse_prefill"]
    module, _, name = target.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is plugin.register
    assert any(dep.replace(" ", "").startswith("vllm>=0.24") for dep in project["optional-dependencies"]["vllm"])


def test_rank_config_gives_each_slice_its_share_of_int_proxies():
    """Tensor parallelism: a rank seeing 7 of 14 query heads runs half of an int proxy count; "q"/"kv" unchanged;
    a split that leaves a proxy across two ranks is refused, saying what fits."""
    config = SparsePrefillConfig(proxy_heads=2)
    assert rank_config(config, 7, 14).proxy_heads == 1
    assert rank_config(config, 14, 14) is config
    assert rank_config(config.replace(proxy_heads="kv"), 7, 14).proxy_heads == "kv"
    check_proxy_heads(config, 14, 2, shards=2)
    with pytest.raises(ValueError, match="multiple of 2"):
        check_proxy_heads(config.replace(proxy_heads=1), 14, 2, shards=2)
    with pytest.raises(ValueError, match="does not fit"):
        check_proxy_heads(config.replace(proxy_heads=3), 14, 2)
