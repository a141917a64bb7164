"""Reading a transformers attention mask as per-row key ranges, or saying why it cannot be.

The sparse path handles causal attention over one contiguous range of valid keys per batch row,
which is what left or right padding produces. Any other mask (packed sequences, custom biases,
windows) goes to the dense implementation. Static caches add one twist: they hand every slot of
the cache to the attention, and the slots past the last query are empty (masked out); the reading
says how many keys are real so the sparse path can drop the rest.

Reading a mask costs a few host synchronisations and a pass over [B, Lq, Lk]. The mask is the
same tensor for every layer of one forward, so the answer is stored on the tensor itself (per
query/key length, `remembered`) and later layers pay nothing; it expires when the tensor changes in
place, or when a layer that read it already reads it again (the next forward over a reused buffer).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

_QUERY_ROWS_PER_STEP = 1024  # mask rows checked at once: bounds the checking memory to O(B * 1024 * Lk)
_CACHE_ATTRIBUTE = "_sparse_prefill_readings"


@dataclass(frozen=True)
class MaskReading:
    """What the sparse path needs to know from a causal + padding mask.

    num_keys: how many leading keys are real. The queries are the last `q_len` of them; keys past
        `num_keys` are empty static-cache slots that no query may see.
    key_range: int32 [B, 2], each row's valid keys [start, end) on the mask's device; None when no
        row is padded.
    rows: the same ranges as Python ints (read once per mask, so per-row work needs no host sync),
        or None when no row is padded.
    """

    num_keys: int
    key_range: torch.Tensor | None = None
    rows: tuple[tuple[int, int], ...] | None = None


def read_mask(mask, q_len: int, k_len: int, previous: str, reader=None) -> tuple[MaskReading | None, str | None]:
    """(MaskReading, None) when the mask is causal + padding, else (None, why not).

    Accepts what transformers hands the attention of `previous`: sdpa's bool masks [B, 1, Lq, Lk]
    (True = attend) or None, eager's float masks (0 = attend, dtype minimum = blocked) and flash
    attention's 2-D padding masks [B, Lk] (1 = real token) or None. `reader`: the calling layer
    (`remembered`).
    """
    if mask is None:
        return _read_missing_mask(q_len, k_len, previous)
    if not isinstance(mask, torch.Tensor):
        return None, f"an attention mask of type {type(mask).__name__}"
    if mask.dim() == 2:
        return remembered(mask, ("padding", k_len), lambda: _read_padding_mask(mask, k_len), reader)
    return remembered(mask, ("full", q_len, k_len), lambda: _read_full_mask(mask, q_len, k_len), reader)


@dataclass
class _Remembered:
    version: int | None
    result: object
    readers: weakref.WeakSet = field(default_factory=weakref.WeakSet)


def remembered(tensor: torch.Tensor, key, compute, reader=None):
    """`compute()`, stored on `tensor` under `key` while it can be trusted.

    What a model hands every layer of one forward (a mask, the packed sequence lengths) is one tensor object,
    so the first layer reads it to the host and the others reuse the answer. The answer expires when the tensor
    changes in place (its version counter moves) or when `reader` (the calling layer) has read it before: a
    layer reads once per forward, so that is the next forward, which may have rewritten a reused buffer in a way
    no counter shows (tensors made under `torch.inference_mode` keep none, and engines reuse their buffers).
    Without a reader, a tensor with no version counter is never trusted twice.
    """
    version = _version(tensor)
    readings = getattr(tensor, _CACHE_ATTRIBUTE, None)
    if readings is None:
        readings = {}
        setattr(tensor, _CACHE_ATTRIBUTE, readings)
    seen = readings.get(key)
    fresh = seen is not None and seen.version == version and (
        reader not in seen.readers if reader is not None else version is not None)
    if not fresh:
        seen = readings[key] = _Remembered(version, compute())
    if reader is not None:
        seen.readers.add(reader)
    return seen.result


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def _read_missing_mask(q_len: int, k_len: int, previous: str) -> tuple[MaskReading | None, str | None]:
    if previous == "eager":
        # transformers always builds a mask for causal eager attention; none means every key is visible.
        return None, "eager attention without a mask (it attends to every key, not causally)"
    if previous == "sdpa" and q_len < k_len:
        # Mirrors sdpa_attention_forward: with no mask and fewer queries than keys (only the first prefill
        # into a StaticCache), the keys past q_len are empty cache slots and are dropped.
        return MaskReading(num_keys=q_len), None
    return MaskReading(num_keys=k_len), None  # flash attention aligns causality bottom-right: queries last


def _read_padding_mask(mask: torch.Tensor, k_len: int) -> tuple[MaskReading | None, str | None]:
    """A flash-attention 2-D mask [B, Lk]: 1 = real token."""
    if mask.shape[-1] != k_len:
        return None, f"a 2-D attention mask of width {mask.shape[-1]} for {k_len} keys (a static cache?)"
    key_range, reason = _contiguous_range(mask.bool())
    if reason is not None:
        return None, reason
    return _reading(key_range, k_len), None


def _read_full_mask(mask: torch.Tensor, q_len: int, k_len: int) -> tuple[MaskReading | None, str | None]:
    """A 4-D sdpa (bool) or eager (float) mask [B, 1, Lq, Lk], checked to be causal + padding."""
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (q_len, k_len):
        return None, f"an attention mask of shape {tuple(mask.shape)} (expected [B, 1, {q_len}, {k_len}])"
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return None, f"an attention mask of dtype {mask.dtype}"

    def allowed(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed [B, r1-r0, Lk], whether every entry is a plain allow/block)."""
        rows = mask[:, 0, r0:r1]
        if rows.dtype == torch.bool:
            return rows, torch.ones((), dtype=torch.bool, device=mask.device)
        ok = rows == 0
        return ok, (ok | (rows <= torch.finfo(rows.dtype).min / 2)).all()

    # The last query sees every valid key of its row: that gives the ranges, the rest is checked.
    last, plain = allowed(q_len - 1, q_len)
    key_range, reason = _contiguous_range(last[:, 0])
    if reason is not None:
        return None, reason
    ranges = key_range.tolist()
    num_keys = max([q_len] + [end for _, end in ranges])
    offset = num_keys - q_len  # queries are the last q_len of the num_keys real keys
    cols = torch.arange(k_len, device=mask.device)
    start, end = key_range[:, 0, None, None], key_range[:, 1, None, None]
    matches = torch.ones((), dtype=torch.bool, device=mask.device)
    for r0 in range(0, q_len, _QUERY_ROWS_PER_STEP):
        r1 = min(r0 + _QUERY_ROWS_PER_STEP, q_len)
        got, plain_rows = allowed(r0, r1)
        plain &= plain_rows
        positions = torch.arange(r0, r1, device=mask.device)[:, None] + offset
        expected = (cols <= positions) & (cols >= start) & (cols < end)
        live = expected.any(-1, keepdim=True)  # a row that may see nothing is a pad query: its output is unused
        matches &= ((got == expected) | ~live).all()
    if not bool(plain):
        return None, "an additive attention bias (not a plain mask)"
    if not bool(matches):
        return None, "an attention mask that is not causal + padding (packed sequences, windows or a custom pattern)"
    return _reading(key_range, num_keys, ranges), None


def _reading(key_range: torch.Tensor, num_keys: int, ranges: list | None = None) -> MaskReading:
    ranges = key_range.tolist() if ranges is None else ranges
    if all(start == 0 and end == num_keys for start, end in ranges):
        return MaskReading(num_keys=num_keys)
    return MaskReading(num_keys=num_keys, key_range=key_range, rows=tuple((s, e) for s, e in ranges))


def _contiguous_range(valid: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """valid bool [B, Lk] -> int32 [B, 2] (start, end) when each row's True entries are contiguous."""
    k_len = valid.shape[-1]
    count = valid.sum(-1)
    start = valid.int().argmax(-1)
    end = k_len - valid.flip(-1).int().argmax(-1)
    start = torch.where(count == 0, torch.zeros_like(start), start)
    end = torch.where(count == 0, start, end)
    if not bool((end - start == count).all()):
        return None, "a padding mask with holes (valid tokens must be contiguous in each row)"
    return torch.stack([start, end], -1).int(), None
