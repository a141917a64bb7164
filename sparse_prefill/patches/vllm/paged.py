"""vLLM's batch in the library's terms, without importing vLLM: which requests a step holds, which go sparse, where
FlashAttention takes the rest (one call per layer), and one request's keys and values read from the paged cache.

vLLM (V1) runs one forward per scheduler step over a packed batch: request i owns query tokens
[query_start_loc[i], query_start_loc[i + 1]) and its first seq_lens[i] positions are in the paged KV cache (this
step's tokens included: the cache is written before the attention runs), in the pages block_table[i] lists. A
prefill chunk's queries are the last of those positions; a prefix-cache hit starts a prompt with positions the
cache already held.

Why gather first, not a paged-aware kernel. The selection and the block-sparse kernel read keys and values as
strided [1, Hkv, L, D] tensors; reading them through a block table instead would put an indirection into every
load of the fused selection kernels and the attention kernel (and TMA tensor descriptors cannot follow a block
table: one of our 128-token key blocks spans several of vLLM's 16-token pages). The gather is one copy of the
request's keys and values per layer, O(L) bytes, against attention's O(L^2 * density) work, and its buffers live
only for the call. What it costs against the sparse attention it feeds is measured, not assumed:
`bench/bench_vllm.py` times it separately (the "gather" columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import SparsePrefillConfig
from ..per_request import PackedRequests, too_short_for_sparse


@dataclass(frozen=True)
class StepRequests:
    """The requests of one vLLM step and which of them go sparse (built once per step, read by every layer).

    `dense_seq_lens` (device, made by the backend's builder): the step's seq_lens with the sparse requests' set to
    0, so that ONE FlashAttention call per layer runs every other request (a request with no keys only has its
    rows zeroed, which the sparse output then replaces)."""

    requests: PackedRequests
    sparse: tuple[bool, ...]
    dense_seq_lens: torch.Tensor | None = None

    @property
    def sparse_indices(self) -> tuple[int, ...]:
        return tuple(i for i, on in enumerate(self.sparse) if on)

    @property
    def any_dense(self) -> bool:
        """Whether some request that does not go sparse has queries (else FlashAttention has nothing to do)."""
        return any(not on and qe > qs for on, (qs, qe) in zip(self.sparse, self.requests.q_bounds, strict=True))


def read_step(query_start_loc: torch.Tensor, seq_lens: torch.Tensor | None, num_reqs: int, max_query_len: int,
              max_seq_len: int, config: SparsePrefillConfig) -> StepRequests | None:
    """The step's requests when at least one goes sparse, else None (FlashAttention runs the step unchanged).

    query_start_loc [num_reqs + 1] and seq_lens [num_reqs] are host tensors (vLLM keeps CPU copies; for prefill
    rows its seq_lens are exact, for decode rows an upper bound, which only ever decides "short"). None for
    seq_lens: the host copy is not available, so nothing goes sparse rather than wait for the GPU.
    `max_query_len`/`max_seq_len` (upper bounds) rule out steps with no long request before any tensor is read.

    Every chunk counts as its prompt's last (`last_chunk=True`): vLLM's attention metadata does not say whether
    a prefill chunk ends its prompt (the prompt length is not in it), and treating a middle chunk as the last only
    costs its exact tail and question columns, while treating the last chunk as a middle one would drop them from
    the rows that hold the question.
    """
    if seq_lens is None or too_short_for_sparse(max_query_len, max_seq_len, config):
        return None
    edges = query_start_loc[:num_reqs + 1].tolist()
    lengths = seq_lens[:num_reqs].tolist()
    q_bounds = tuple(zip(edges[:-1], edges[1:], strict=True))
    if any(qe - qs > length for (qs, qe), length in zip(q_bounds, lengths, strict=True)):
        return None  # more queries than keys: not a causal prefill this reading understands
    requests = PackedRequests(q_bounds, tuple((0, length) for length in lengths), (True,) * num_reqs)
    sparse = requests.sparse(config)
    return StepRequests(requests, sparse) if any(sparse) else None


@dataclass(frozen=True)
class Fp8Cache:
    """How vLLM keeps an fp8 KV cache (`--kv-cache-dtype fp8`): bytes that read as `dtype` (e4m3), each key the
    stored value times `k_scale` and each value times `v_scale` (one scale per layer, or one per KV head), and the
    query quantised the same way with `q_scale` before the attention backend sees it. The sparse path reads them
    back in `into`, the model's dtype: the selection ranks blocks in it, and `attention_dtype` decides the
    arithmetic of the kept blocks as for any other cache."""

    dtype: torch.dtype
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    into: torch.dtype

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """[1, Hkv, L, D] bytes of the cache -> the keys in `into`."""
        return self._read(k, self.k_scale)

    def values(self, v: torch.Tensor) -> torch.Tensor:
        return self._read(v, self.v_scale)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """[Lq, Hq, D] as the layer quantised them -> `into`; a query in the model's dtype (a backend that
        quantises none) is returned as it is."""
        return q if q.dtype == self.into else self._read(q, self.q_scale)

    def _read(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x (heads in dim 1) as `dtype`, times `scale` (one, or one per KV head, which a KV head's group of query
        heads shares), in fp32 and rounded once to `into`."""
        scale = scale.to(device=x.device, dtype=torch.float32).reshape(-1)
        if scale.numel() > 1:
            scale = scale.repeat_interleave(x.shape[1] // scale.numel()).reshape(1, -1, *[1] * (x.dim() - 2))
        return (x.view(self.dtype).to(torch.float32) * scale).to(self.into)


def gather_request_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int,
                      fp8: Fp8Cache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's keys and values, each [1, Hkv, seq_len, D], read from vLLM's paged cache.

    kv_cache: [num_blocks, 2, block_size, Hkv, D], vLLM's FlashAttention layout (keys at index 0 of dim 1,
    values at 1), with any strides (the "HND" layout is the same shape with permuted strides). block_row: the
    request's row of the block table (its pages in order; entries past its length are ignored). The result is
    strided like the [1, Hkv, L, D] views transformers passes (tokens then heads in memory), which the selection
    and the kernel read without a copy. With `fp8` (an fp8 cache: its bytes), they are read back in the model's
    dtype with the cache's scales (`Fp8Cache`).
    """
    page = kv_cache.shape[2]
    pages = block_row[:-(-seq_len // page)].to(device=kv_cache.device, dtype=torch.long)

    def read(which: int) -> torch.Tensor:
        rows = kv_cache[:, which].index_select(0, pages)  # [n, page, Hkv, D]: one copy
        return rows.reshape(-1, *rows.shape[2:])[:seq_len].transpose(0, 1).unsqueeze(0)

    if fp8 is None:
        return read(0), read(1)
    return fp8.keys(read(0)), fp8.values(read(1))
