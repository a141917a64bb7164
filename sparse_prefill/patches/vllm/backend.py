"""The vLLM attention backend: vLLM's FlashAttention backend, with long prefill run by `sparse_attention`.

vLLM imports this module only when `--attention-backend CUSTOM` selects it (`register` put its path under
AttentionBackendEnum.CUSTOM). Everything FlashAttention-specific stays FlashAttention's: the KV-cache layout and
its writes, the metadata builder, CUDA-graph support, and the forward of every request that does not go sparse.
Three subclasses add the rest:

- the builder reads, once per step, which requests go sparse (`paged.read_step`, from vLLM's host copies of
  the query offsets and sequence lengths: no GPU synchronisation) and keeps it on the metadata;
- the impl's forward runs FlashAttention's own forward ONCE over the whole step with the sparse requests' key
  counts set to 0 (the builder made those lengths once per step: `StepRequests.dense_seq_lens`), which attends
  every other request and only zeroes the sparse requests' rows; then it attends the sparse requests one by one:
  keys and values gathered from the paged cache through the request's block-table row
  (`paged.gather_request_kv`), selection and kernel by `sparse_attention`, written over their rows;
- the backend names the two and calls itself "CUSTOM".

The builder also warms the kernels up for prompts up to max_model_len when it is made (`warm_up_engine`), so
that no request waits for a Triton compile.

An fp8 KV cache (`--kv-cache-dtype fp8`, FlashAttention 3 on Hopper): the sparse requests' keys and values are read
back from the cache's bytes with its scales, and their queries, which vLLM quantised before this backend sees
them, likewise (`paged.Fp8Cache`); the rest of the step is FlashAttention's own fp8 attention.

What always runs FlashAttention unchanged, for the whole layer: layers with a sliding window, ALiBi, attention
sinks or a non-decoder attention type; KV caches quantised otherwise than fp8 e4m3 with a scale per layer or per
KV head (per-token scales, nvfp4); decode context parallelism; head sizes or
dtypes the Triton kernels do not take; cascade attention, per-request causal flags and multimodal prefix ranges;
a step being captured into a CUDA graph; vLLM's profiling run. Each is said once (SparsePrefillWarning).

Tensor parallelism: each rank's layers hold num_heads / tp of the query heads, and vLLM hands this impl only
those; `per_request.rank_config` gives an int `proxy_heads` its share, "q" and "kv" need nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import vllm

from ... import stats
from ...config import SparsePrefillConfig
from ...notices import warn_once
from ..per_request import (
    attend_alone,
    call_reason,
    capturing,
    check_proxy_heads,
    rank_config,
    warm_up_layer,
    warn_dense,
    warn_failed,
)
from . import ENV_WARM_UP, config_from_env, version_problem
from .paged import Fp8Cache, StepRequests, gather_request_kv, read_step

_problem = version_problem(getattr(vllm, "__version__", "unknown"))
if _problem is not None:
    raise RuntimeError(_problem)  # not an ImportError: vLLM would swallow that into "ImportError"

try:
    from vllm.config import get_current_vllm_config_or_none
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import is_quantized_kv_cache
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadata,
        FlashAttentionMetadataBuilder,
    )
except ImportError as err:  # a supported version that lacks what it should have: say so plainly
    raise RuntimeError(f"sparse_prefill's vLLM backend cannot import vLLM's FlashAttention backend ({err}); "
                       f"vLLM {vllm.__version__} is not laid out as the supported versions are.") from err

# When a list, each sparse request appends {"layer", "queries", "keys", "gather_ms", "attend_ms"} (CUDA events,
# synchronised per request: for measuring only; bench/bench_vllm.py sets it in an engine of its own).
TIMINGS: list[dict] | None = None


@dataclasses.dataclass
class SparsePrefillMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata and the step's requests (None: no request goes sparse in this step)."""

    step: StepRequests | None = None


_WARMED: set[tuple] = set()  # shapes warmed up in this process (`per_request.warm_up_layer`)
FP8_CACHES = ("fp8", "fp8_e4m3")  # the fp8 caches FlashAttention keeps (e4m3, a scale per layer or KV head)


def warm_up_engine(vllm_config, kv_cache_spec, device, config: SparsePrefillConfig) -> int:
    """Compile the sparse path's kernels for prompts up to the engine's max_model_len before its first request
    (`per_request.warm_up_layer`): builders are made once the KV cache exists, before vLLM's own warm-up and graph
    capture. $SPARSE_PREFILL_WARM_UP sets another length (0: none). Once per process and shape; a failure is
    said once and the first long requests compile instead. Returns the number of sparse calls made."""
    length = os.environ.get(ENV_WARM_UP, "").strip()
    if length and not length.isdigit():
        raise ValueError(f"{ENV_WARM_UP}={length!r}: give a number of tokens (0: no warm-up).")
    max_len = int(length) if length else vllm_config.model_config.max_model_len
    heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    config = rank_config(config, heads, heads * vllm_config.parallel_config.tensor_parallel_size)
    softcap = getattr(vllm_config.model_config.hf_text_config, "attn_logit_softcapping", None)
    # an fp8 cache holds bytes; the sparse path reads it back in the model's dtype (paged.Fp8Cache)
    dtype = kv_cache_spec.dtype if kv_cache_spec.dtype.is_floating_point and kv_cache_spec.dtype.itemsize > 1 \
        else vllm_config.model_config.dtype
    try:
        return warm_up_layer(heads, kv_cache_spec.num_kv_heads, kv_cache_spec.head_size, max_len, config,
                             dtype=dtype, device=device, softcap=softcap, done=_WARMED)
    except Exception as err:  # out of memory, a kernel this GPU cannot compile: serve all the same
        warn_once(f"sparse_prefill: the kernel warm-up failed ({type(err).__name__}: {err}); the first long "
                  "requests compile the kernels instead.")
        return 0


class SparsePrefillMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder; adds which requests of the step go sparse."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sparse_config = config_from_env()
        warm_up_engine(vllm_config, kv_cache_spec, device, self.sparse_config)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> SparsePrefillMetadata:
        return self._build(common_prefix_len, common_attn_metadata, fast_build, plan=True)

    def build_for_cudagraph_capture(self, common_attn_metadata) -> SparsePrefillMetadata:
        return self._build(0, common_attn_metadata, False, plan=False)  # a captured graph replays FlashAttention

    def _build(self, common_prefix_len, common, fast_build, plan: bool) -> SparsePrefillMetadata:
        metadata = super().build(common_prefix_len, common, fast_build)
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(FlashAttentionMetadata)}
        step = None
        if plan:
            seq_lens = common.seq_lens_cpu_upper_bound  # exact for prefill rows, which are the ones that matter
            if seq_lens is None:
                seq_lens = common._seq_lens_cpu  # vLLM's own host copy, when it kept one
            step = read_step(common.query_start_loc_cpu, seq_lens, common.num_reqs, common.max_query_len,
                             common.max_seq_len, self.sparse_config)
        if step is not None and step.any_dense:  # once per step: the lengths FlashAttention runs the rest with
            sparse = torch.tensor(step.sparse_indices, dtype=torch.long).to(metadata.seq_lens.device, non_blocking=True)
            step = dataclasses.replace(step, dense_seq_lens=metadata.seq_lens.index_fill(0, sparse, 0))
        return SparsePrefillMetadata(**fields, step=step)

    def use_cascade_attention(self, common_prefix_len, query_lens, *args, **kwargs) -> bool:
        """No cascade attention in a step with a block of prefill queries: it would send the whole step, long
        prefill included, to FlashAttention's cascade kernel. Otherwise FlashAttention's own decision."""
        if len(query_lens) and int(query_lens.max()) >= self.sparse_config.block_size:
            return False
        return super().use_cascade_attention(common_prefix_len, query_lens, *args, **kwargs)


class SparsePrefillImpl(FlashAttentionImpl):
    """FlashAttention's impl; its forward runs the step's long prefill requests through `sparse_attention`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = config_from_env()
        shards, total_kv = _tensor_parallel(self.num_kv_heads)
        check_proxy_heads(config, self.num_heads * shards, total_kv, shards)
        self.sparse_config = rank_config(config, self.num_heads, self.num_heads * shards)
        self.dense_reason = self._layer_reason()
        if self.dense_reason is not None:
            warn_dense(self.dense_reason)

    def _layer_reason(self) -> str | None:
        """Why this layer always runs FlashAttention (`per_request.call_reason` on what the layer is), or None."""
        lacks = [name for name, present in (
            ("ALiBi layers", self.alibi_slopes is not None),
            ("attention sinks (not supported by the sparse path)", self.sinks is not None),
            (f"a {self.kv_cache_dtype} KV cache (the sparse path reads fp16/bf16 caches and fp8 e4m3 ones)",
             is_quantized_kv_cache(self.kv_cache_dtype) and self.kv_cache_dtype not in FP8_CACHES),
            ("decode context parallelism (each rank holds part of every request's keys)", self.dcp_world_size > 1),
        ) if present]
        window = None if tuple(self.sliding_window) == (-1, -1) else self.sliding_window[0] + 1
        kind = getattr(self.attn_type, "value", self.attn_type)
        not_causal = None if self.attn_type == AttentionType.DECODER else (
            f"{kind} attention (the sparse path is causal self-attention)")
        return call_reason(None, self.sparse_config, not_causal=not_causal, window=window, lacks=tuple(lacks))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = getattr(attn_metadata, "step", None)
        if (step is None or self.dense_reason is not None or output_scale is not None
                or output_block_scale is not None or not self._step_fits(query, attn_metadata, output.dtype)):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        with stats.in_layer(layer) if stats.RECORDERS else contextlib.nullcontext():  # `stats.record()`
            return self._forward_step(layer, query, key, value, kv_cache, attn_metadata, output, step)

    def _forward_step(self, layer, query, key, value, kv_cache, attn_metadata, output, step: StepRequests):
        """A step that goes partly sparse: FlashAttention once for the rest, then each sparse request."""
        if step.dense_seq_lens is not None:  # every other request in one call; the sparse rows are overwritten below
            whole = dataclasses.replace(attn_metadata, seq_lens=step.dense_seq_lens, scheduler_metadata=None, step=None)
            FlashAttentionImpl.forward(self, layer, query, key, value, kv_cache, whole, output)
        requests = step.requests
        fp8 = None if self.kv_cache_dtype not in FP8_CACHES else Fp8Cache(
            current_platform.fp8_dtype(), layer._q_scale, layer._k_scale, layer._v_scale, output.dtype)
        for i in step.sparse_indices:
            (qs, qe), (_, seq_len) = requests.q_bounds[i], requests.k_bounds[i]
            marks = _marks()
            try:
                k, v = gather_request_kv(kv_cache, attn_metadata.block_table[i], seq_len, fp8)
                if marks:
                    marks[1].record()
            except Exception as err:  # out of memory for a long request's copy, say: FlashAttention runs it
                warn_failed(err)
                out = None
            else:
                q = (query[qs:qe] if fp8 is None else fp8.queries(query[qs:qe])).transpose(0, 1).unsqueeze(0)
                out = attend_alone(q, k, v, self.sparse_config, scale=self.scale,
                                   softcap=self.logits_soft_cap or None, last_chunk=requests.last_chunk[i])
            if out is None:  # it failed (out of memory, say): FlashAttention runs it alone
                self._flash_attention_on(layer, query, key, value, kv_cache, attn_metadata, output, step, i)
                continue
            output[qs:qe].copy_(out[0].transpose(0, 1))
            _record(marks, layer, qe - qs, seq_len)
        return output

    def _step_fits(self, query, metadata, dtype: torch.dtype) -> bool:
        """Whether this call can split its step (else FlashAttention runs all of it), saying why once if not. `dtype`:
        the model's, in which the sparse path reads a query vLLM quantised for an fp8 cache."""
        if metadata.use_cascade or metadata.causal is not True or metadata.mm_prefix_range_tensor is not None:
            return False  # features of a step, not of the layer: FlashAttention's, silently
        if query.dtype != dtype and self.kv_cache_dtype in FP8_CACHES:
            query = query[:0].to(dtype)
        reason = call_reason(query, self.sparse_config)  # a CUDA graph being captured, a query Triton cannot take
        if reason is not None:
            if not capturing(query):
                warn_dense(reason)
            return False
        return True

    def _flash_attention_on(self, layer, query, key, value, kv_cache, metadata, output, step: StepRequests,
                            i: int) -> None:
        """FlashAttention's forward on request i alone (one the sparse path failed on): its metadata and query rows."""
        start, stop = step.requests.q_bounds[i]
        sub = dataclasses.replace(
            metadata, num_actual_tokens=stop - start, max_query_len=stop - start,
            query_start_loc=metadata.query_start_loc[i:i + 2] - start, seq_lens=metadata.seq_lens[i:i + 1],
            block_table=metadata.block_table[i:i + 1], scheduler_metadata=None, step=None)
        rows = slice(start, stop)
        FlashAttentionImpl.forward(self, layer, query[rows], None if key is None else key[rows],
                                   None if value is None else value[rows], kv_cache, sub, output[rows])


class SparsePrefillBackend(FlashAttentionBackend):
    """vLLM's FlashAttention backend whose long prefill requests run block-sparse (`--attention-backend CUSTOM`)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparsePrefillImpl]:
        return SparsePrefillImpl

    @staticmethod
    def get_builder_cls() -> type[SparsePrefillMetadataBuilder]:
        return SparsePrefillMetadataBuilder


def _tensor_parallel(local_kv_heads: int) -> tuple[int, int]:
    """(tensor-parallel size, the layer's KV heads in all) as vLLM configured them."""
    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return 1, local_kv_heads
    shards = vllm_config.parallel_config.tensor_parallel_size
    total_kv = local_kv_heads * shards
    model = vllm_config.model_config
    if model is not None:  # vLLM replicates KV heads when there are fewer than ranks
        total_kv = min(total_kv, model.get_total_num_kv_heads())
    return shards, total_kv


def _marks() -> list | None:
    """CUDA events around one request's gather and attention while TIMINGS collects them, else None."""
    if TIMINGS is None:
        return None
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    marks[0].record()
    return marks


def _record(marks: list | None, layer, queries: int, keys: int) -> None:
    if marks is None or TIMINGS is None:
        return
    marks[2].record()
    marks[2].synchronize()
    TIMINGS.append({"layer": getattr(layer, "layer_name", None), "queries": queries, "keys": keys,
                    "gather_ms": marks[0].elapsed_time(marks[1]), "attend_ms": marks[1].elapsed_time(marks[2])})
