"""Reading a transformers attention mask as per-row key ranges, or saying why it cannot be.

The sparse path handles causal attention over one contiguous range of valid keys per batch row,
which is what left or right padding produces. Any other mask (packed sequences, custom biases)
goes to the dense implementation. The mask is the same object for every layer of one forward, so
the last answer is cached against it.
"""

from __future__ import annotations

import weakref

import torch

_last: tuple[weakref.ref, int, torch.Tensor | None, str | None] | None = None


def key_range_from_mask(mask: torch.Tensor | None, q_len: int, k_len: int) -> tuple[torch.Tensor | None, str | None]:
    """(key_range int32 [B, 2] or None, None) when the mask is causal + padding, else (None, reason).

    Accepts the masks transformers builds for sdpa (bool 4-D, True = attend), eager (float 4-D,
    0 = attend) and flash attention (2-D padding mask, 1 = real token).
    """
    global _last
    if mask is None:
        return None, None
    if _last is not None and _last[0]() is mask and _last[1] == mask._version:
        return _last[2], _last[3]
    result = _read(mask, q_len, k_len)
    _last = (weakref.ref(mask), mask._version, *result)
    return result


def _read(mask: torch.Tensor, q_len: int, k_len: int) -> tuple[torch.Tensor | None, str | None]:
    if mask.dim() == 2:
        if mask.shape[-1] != k_len:
            return None, f"a 2-D attention mask of width {mask.shape[-1]} for {k_len} keys"
        key_range, reason = _contiguous_range(mask.bool())
        if reason is None and bool((key_range[:, 0] == 0).all() and (key_range[:, 1] == k_len).all()):
            return None, None
        return key_range, reason
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (q_len, k_len):
        return None, f"an attention mask of shape {tuple(mask.shape)} (expected [B, 1, {q_len}, {k_len}])"
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    else:
        allowed = mask[:, 0] == 0
        blocked = mask[:, 0] <= torch.finfo(mask.dtype).min / 2
        if not bool((allowed | blocked).all()):
            return None, "an additive attention bias (not a plain mask)"
    key_range, reason = _contiguous_range(allowed[:, -1])
    if reason is not None:
        return None, reason
    rows = torch.arange(q_len, device=mask.device)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len, device=mask.device)[None, :]
    start, end = key_range[:, 0, None, None], key_range[:, 1, None, None]
    expected = (cols <= rows) & (cols >= start) & (cols < end)
    live_rows = expected.any(-1, keepdim=True)  # rows that may see nothing are garbage in every backend
    if not bool(((allowed == expected) | ~live_rows).all()):
        return None, "an attention mask that is not causal + padding (packed sequences or a custom pattern)"
    if bool((key_range[:, 0] == 0).all() and (key_range[:, 1] == k_len).all()):
        return None, None  # no padding: plain causal attention
    return key_range, None


def _contiguous_range(valid: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """valid bool [B, Lk] -> int32 [B, 2] (start, end) when each row's True entries are contiguous."""
    k_len = valid.shape[-1]
    count = valid.sum(-1)
    start = valid.int().argmax(-1)
    end = k_len - valid.flip(-1).int().argmax(-1)
    end = torch.where(count == 0, start, end)
    if not bool((end - start == count).all()):
        return None, "a padding mask with holes (valid tokens must be contiguous in each row)"
    return torch.stack([start, end], -1).int(), None
