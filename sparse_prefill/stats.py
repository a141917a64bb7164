"""What the sparse path did, per prefill call: `record()` collects it, nothing is read until asked.

    with sparse_prefill.record(model) as stats:
        model.generate(**inputs, max_new_tokens=32)
    print(stats)              # a short table: calls, sparse or dense and why, kept blocks, attention saved
    stats.summary()           # the same as a dict; stats.calls: every call; stats.prompts(): per prompt

One `Call` per attention call of a prefill (per layer, and per request of a continuous-batching pack): its
queries and keys, whether it went sparse and, if not, why (the reason the glue decided on: too short, a sliding
window, a feature the sparse path lacks, ...), and the blocks its layout kept of the causal blocks it could have
kept. Decode steps are no prefill and are not recorded. The kept-block counts stay on the device (one small
reduction per sparse call, no host synchronisation) until a figure is asked for; outside `record()` the glue
pays one check of an empty list per call. "Attention saved" is by the kernel's cost model: its time follows
the blocks it attends, so a call that keeps a fraction d of the causal blocks costs about d of dense attention.
`record(timing=True)` also times each sparse call (CUDA events, read when asked).

`log_prefills(model)` prints one line per prompt the sparse path saw (`sparse-prefill serve` turns it on): its
tokens, the layers that went sparse, the kept blocks and its prefill time. A prompt is reported at the first
attention call after the device has finished its last chunk (its counts were copied to the host behind the
kernels, and a CUDA event says when they arrived), so reporting never waits for the GPU.

A prompt prefilled in chunks (continuous batching) is followed across forwards by its key counts: a chunk over
keys [s, e) continues the prompt whose keys ended at s. Two requests of one length that alternate chunks in the
same forwards may be told apart wrongly; each call's own figures are exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import weakref
from collections.abc import Callable, Iterator

import torch

RECORDERS: list[PrefillStats] = []  # the active recorders: the glue checks this list before anything else
_current_layer: list = [None]  # the attention module whose call the glue is running (set only while recording)


@dataclasses.dataclass
class Call:
    """One prefill attention call: one layer, one request."""

    layer: str
    queries: int
    keys: int
    sparse: bool
    reason: str | None = None  # why it stayed dense (None when sparse)
    last_chunk: bool = True  # whether its queries end their prompt
    causal_blocks: int = 0  # causal blocks over its rows and heads (sparse calls)
    kept: torch.Tensor | int | None = None  # blocks its layout kept: a device scalar until read
    timing: tuple | None = None  # (start, end): CUDA events, or host clock readings
    forward: int = 0  # which forward of the recording it ran in

    @property
    def kept_blocks(self) -> int:
        if isinstance(self.kept, torch.Tensor):
            if self.timing is not None and not isinstance(self.timing[1], float):
                self.timing[1].synchronize()  # a copy to pinned host memory was queued before this event
            self.kept = int(self.kept)  # a host synchronisation, once (none for a copy already made)
        return self.kept or 0

    @property
    def done(self) -> bool:
        """Whether the device has finished this call (always, for untimed calls and on the host clock)."""
        return self.timing is None or isinstance(self.timing[1], float) or self.timing[1].query()

    @property
    def density(self) -> float | None:
        """Kept / causal blocks (None for a dense call)."""
        return self.kept_blocks / self.causal_blocks if self.sparse and self.causal_blocks else None

    @property
    def seconds(self) -> float | None:
        """The sparse call's own time, selection and kernel, with `record(timing=True)`; else None."""
        return None if self.timing is None else _elapsed(*self.timing)


@dataclasses.dataclass
class Prompt:
    """One prompt's prefill as the sparse path saw it: the calls of its chunks in every layer."""

    tokens: int  # its keys after the last chunk: the prompt's length
    queries: int = 0  # the queries prefilled (fewer than tokens after a prefix-cache hit)
    calls: list[Call] = dataclasses.field(default_factory=list)

    @property
    def layers(self) -> int:
        return len({c.layer for c in self.calls})

    @property
    def sparse_layers(self) -> int:
        return len({c.layer for c in self.calls if c.sparse})

    @property
    def density(self) -> float | None:
        """Kept / causal blocks over its sparse calls (None when none went sparse)."""
        causal = sum(c.causal_blocks for c in self.calls if c.sparse)
        return sum(c.kept_blocks for c in self.calls if c.sparse) / causal if causal else None

    @property
    def seconds(self) -> float | None:
        """From the start of its first timed sparse call to the end of its last, on the device's clock: the prompt's
        prefill as the engine ran it, other requests' work in the same forwards included."""
        timed = [c.timing for c in self.calls if c.timing is not None]
        return _elapsed(timed[0][0], timed[-1][1]) if timed else None

    def line(self) -> str:
        density, seconds = self.density, self.seconds
        kept = "no layer sparse" if density is None else f"kept {100 * density:.1f} % of the causal blocks"
        took = "" if seconds is None else f", prefill {seconds:.3f} s"
        return (f"sparse_prefill: prompt of {self.tokens} tokens ({self.queries} prefilled): sparse in "
                f"{self.sparse_layers} of {self.layers} layers, {kept}{took}")


class PrefillStats:
    """The prefill calls recorded while `record()` was active (module docstring)."""

    def __init__(self, model: torch.nn.Module | None = None, timing: bool = False,
                 on_prompt: Callable[[Prompt], None] | None = None):
        self.timing = timing
        self.calls: list[Call] = []
        self._every_model = model is None
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if model is not None:
            self._names.update({module: name for name, module in model.named_modules()})
        self._forward = 0
        self._entered: set[int] = set()  # ids of the layers called in the current forward
        self._on_prompt = on_prompt  # `log_prefills`: prompts are followed as they end, calls not kept
        self._this_forward: list[Call] = []
        self._open: dict[int, Prompt] = {}  # prompts awaiting their next chunk, by the key count they end at
        self._ended: list[Prompt] = []  # prompts whose last chunk ran, until the device has finished them

    def covers(self, module) -> bool:
        return self._every_model or module is None or module in self._names

    # ----------------------------------------------------------------------------------------- reading
    def prompts(self) -> list[Prompt]:
        """The prompts whose last chunk was recorded, each with its chunks' calls in every layer."""
        ended, open_prompts = [], {}
        for forward in _by_forward(self.calls):
            ended += _chain(forward, open_prompts)
        return ended

    def summary(self) -> dict:
        """Calls, sparse and dense ones (dense by reason), kept and causal blocks, the attention saved by the kernel's
        cost model and the density per layer. Reads the kept-block counts from the device (one synchronisation)."""
        sparse = [c for c in self.calls if c.sparse]
        on_device = [c for c in sparse if isinstance(c.kept, torch.Tensor) and c.kept.is_cuda]
        if on_device:  # one read for all (timed calls' counts are copies on the host: `kept_blocks` waits for them)
            for call, kept in zip(on_device, torch.stack([c.kept for c in on_device]).tolist(), strict=True):
                call.kept = kept
        reasons: dict[str, int] = {}
        for call in self.calls:
            if not call.sparse:
                reasons[call.reason] = reasons.get(call.reason, 0) + 1
        layers: dict[str, list[int]] = {}
        for call in sparse:
            kept_causal = layers.setdefault(call.layer, [0, 0])
            kept_causal[0] += call.kept_blocks
            kept_causal[1] += call.causal_blocks
        kept, causal = sum(k for k, _ in layers.values()), sum(c for _, c in layers.values())
        timed = [c.seconds for c in sparse if c.timing is not None]
        return {
            "calls": len(self.calls), "sparse_calls": len(sparse), "dense_calls": len(self.calls) - len(sparse),
            "dense_reasons": reasons, "kept_blocks": kept, "causal_blocks": causal,
            "density": kept / causal if causal else None, "attention_saved": 1 - kept / causal if causal else None,
            "density_by_layer": {name: k / c for name, (k, c) in layers.items() if c},
            "sparse_seconds": sum(timed) if timed else None,
        }

    def __str__(self) -> str:
        s = self.summary()
        lines = [f"prefill attention calls: {s['calls']} ({s['sparse_calls']} sparse, {s['dense_calls']} dense)"]
        if s["density"] is not None:
            lines.append(f"sparse calls kept {s['kept_blocks']} of {s['causal_blocks']} causal blocks "
                         f"({100 * s['density']:.1f} %): about {100 * s['attention_saved']:.0f} % of their attention "
                         "saved")
        if s["sparse_seconds"] is not None:
            lines.append(f"time in sparse calls (selection and kernel): {s['sparse_seconds']:.3f} s")
        lines += [f"dense, {n} call{'s' * (n != 1)}: {reason}" for reason, n in s["dense_reasons"].items()]
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------------- writing
    def _enter(self, module) -> None:
        """A layer's attention call begins; a layer called before in this forward begins the next forward."""
        if id(module) in self._entered:
            self._forward += 1
            self._entered.clear()
            self._end_forward()
        self._entered.add(id(module))
        if self._ended:
            self._report(wait=False)

    def _add(self, module, call: Call) -> None:
        call.layer = "sparse_attention" if module is None else self._names.get(module) or _layer_name(module)
        call.forward = self._forward
        if self._on_prompt is None:
            self.calls.append(call)
        else:
            self._this_forward.append(call)

    def _end_forward(self) -> None:
        """`log_prefills`: the prompts that ended in the forward just finished wait for the device to finish them."""
        if self._on_prompt is None:
            return
        calls, self._this_forward = self._this_forward, []
        self._ended += _chain(calls, self._open)

    def _report(self, wait: bool) -> None:
        """Hand `on_prompt` each ended prompt the device has finished (all of them with `wait`), in order."""
        while self._ended and (wait or all(c.done for c in self._ended[0].calls)):
            self._on_prompt(self._ended.pop(0))

    def close(self) -> None:
        self._end_forward()
        if self._on_prompt is not None:
            self._report(wait=True)


def _layer_name(module) -> str:
    name = getattr(module, "layer_name", None)  # vLLM's attention layers carry their name
    return name if isinstance(name, str) else f"layer {getattr(module, 'layer_idx', '?')}"


def _by_forward(calls: list[Call]) -> list[list[Call]]:
    forwards: dict[int, list[Call]] = {}
    for call in calls:
        forwards.setdefault(call.forward, []).append(call)
    return [forwards[f] for f in sorted(forwards)]


def _chain(forward: list[Call], open_prompts: dict[int, Prompt]) -> list[Prompt]:
    """Group one forward's calls into request chunks (in each layer, the n-th call over (queries, keys) is the n-th
    such request of the pack), attach each chunk to the open prompt whose keys end where its keys start, and return
    the prompts whose last chunk this was; the others stay in `open_prompts` under the key count they end at."""
    chunks: dict[tuple, list[Call]] = {}
    seen: dict[tuple, int] = {}
    for call in forward:
        shape = (call.layer, call.queries, call.keys, call.last_chunk)
        nth = seen.get(shape, 0)
        seen[shape] = nth + 1
        chunks.setdefault((call.queries, call.keys, call.last_chunk, nth), []).append(call)
    ended = []
    for (queries, keys, last_chunk, _), calls in chunks.items():
        prompt = open_prompts.pop(keys - queries, None) or Prompt(keys)
        prompt.tokens, prompt.queries = keys, prompt.queries + queries
        prompt.calls += calls
        if last_chunk:
            ended.append(prompt)
        else:
            open_prompts[keys] = prompt
    return ended


def causal_blocks(q_len: int, k_len: int, block_size: int) -> int:
    """Blocks of causal attention for the last q_len of k_len positions, one head: the sum over query blocks of the
    key blocks up to each one's last row (`layout.causal_block_limits`, in closed form on the host)."""
    n = -(-q_len // block_size)
    if n == 0:
        return 0
    before = (k_len - q_len - 1) // block_size  # full query blocks: row i sees (before + i + 2) key blocks
    return (n - 1) * (before + 2) + (n - 1) * (n - 2) // 2 + (k_len - 1) // block_size + 1


def _elapsed(start, end) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@contextlib.contextmanager
def record(model: torch.nn.Module | None = None, *, timing: bool = False) -> Iterator[PrefillStats]:
    """Record what the sparse path does inside the block: in `model`'s layers, or in every patched model and every
    direct `sparse_attention` call when None. `timing=True` times each sparse call (CUDA events on a GPU)."""
    stats = PrefillStats(model, timing)
    RECORDERS.append(stats)
    try:
        yield stats
    finally:
        RECORDERS.remove(stats)
        stats.close()


def log_prefills(model: torch.nn.Module | None = None, write: Callable[[str], None] | None = None,
                 min_tokens: int = 0) -> PrefillStats:
    """Write one line per prompt of at least `min_tokens` tokens that `model` prefills from now on (module
    docstring), to stderr unless `write` is given. Keeps nothing but the prompts still being prefilled.
    `stop_logging` ends it."""
    def line(prompt: Prompt) -> None:
        if prompt.tokens >= min_tokens:
            (write or _stderr)(prompt.line())

    stats = PrefillStats(model, timing=True, on_prompt=line)
    RECORDERS.append(stats)
    if model is not None:  # a model that is gone logs nothing more: its logger goes with it
        weakref.finalize(model, stop_logging, stats)
    return stats


def stop_logging(stats: PrefillStats) -> None:
    if stats in RECORDERS:
        RECORDERS.remove(stats)
        stats.close()


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- what the glue calls (only while RECORDERS is set)

@contextlib.contextmanager
def in_layer(module) -> Iterator[None]:
    """The glue runs `module`'s attention call inside this block: the sparse calls made in it are that layer's."""
    for stats in RECORDERS:
        if stats.covers(module):
            stats._enter(module)
    _current_layer[0] = module
    try:
        yield
    finally:
        _current_layer[0] = None


def started():
    """A start mark for a timed sparse call (a CUDA event recorded now on a GPU, else the host clock), or None."""
    if not any(s.timing for s in RECORDERS):
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def note_sparse(q: torch.Tensor, k: torch.Tensor, layout, last_chunk: bool, start=None) -> None:
    """A sparse call of q [B, Hq, Lq, D] over k [B, Hkv, Lk, D] that attended `layout`'s blocks."""
    module = _current_layer[0]
    recorders = [s for s in RECORDERS if s.covers(module)]
    if not recorders:
        return
    batch, heads, q_len = q.shape[:3]
    causal = causal_blocks(q_len, k.shape[2], layout.block_size)
    kept = layout.counts.sum(dtype=torch.int64)  # on the device until read
    if start is not None and kept.is_cuda:  # timed (and logged): a copy the host reads once the device is done
        kept = kept.to("cpu", non_blocking=True)
    timing = None
    if start is not None:
        end = time.perf_counter() if isinstance(start, float) else torch.cuda.Event(enable_timing=True)
        if not isinstance(end, float):
            end.record()
        timing = (start, end)
    for stats in recorders:
        stats._add(module, Call("", q_len, k.shape[2], True, None, last_chunk, causal * batch * heads, kept, timing))


def note_dense(module, queries: int, keys: int, reason: str, last_chunk: bool = True) -> None:
    """A prefill call (not a decode step) of `module` (None: the layer being run) that stayed dense, and why."""
    if queries <= 1 < keys:  # a decode step: no prefill
        return
    module = module if module is not None else _current_layer[0]
    for stats in RECORDERS:
        if stats.covers(module):
            stats._add(module, Call("", queries, keys, False, reason, last_chunk))
