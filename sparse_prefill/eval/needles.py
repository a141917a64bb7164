"""Where a needle was dropped: per layer and head, did the question's rows keep the needle's key blocks?

A retrieval answer is read at the end of the prompt: the question's rows (and the last row, which
gives the first answer token) must attend the tokens of the needle. `NeedleProbe` sits in the
sparse path (through `recording.intercept_layouts`) and, for every layer, compares the layout the
selection chose with the exact attention of the question's rows:

    mass    share of the question rows' exact softmax mass on the needle's tokens, per head
            (a head that reads the needle has a large one)
    kept    whether every key block holding needle tokens was kept for every query block the
            question rows fall in

A lost answer whose needle mass sat in heads with kept=False points at the selection; one whose
needle was kept everywhere points elsewhere (the approximated middle rows, or the model itself).
With several needles the same two numbers are also taken for each later needle's rows over the
earlier needles (`link_*`): the rows of a needle's own later mentions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout import BlockLayout


@dataclass
class NeedleProbe:
    """A layout hook that records, per layer, each head's needle mass and kept flag for one prompt.

    needle_spans: [start, end) token positions of the needles that matter for the answer.
    question: [start, end) positions of the question rows (the prompt after its context).
    """

    needle_spans: list[tuple[int, int]]
    question: tuple[int, int]
    layers: dict[int, dict] = field(default_factory=dict)

    @torch.inference_mode()
    def __call__(self, layer, q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> BlockLayout:
        if layer is None or q.shape[0] != 1 or q.shape[2] != k.shape[2]:
            return layout  # the probe reads whole-prompt, single-row prefill only
        kept_mask = layout.to_mask()[0]  # [Hq, Qb, Kb]
        mass, kept = _reading(q, k, kept_mask, layout.block_size, self.question, self.needle_spans)
        record = {"mass": mass, "kept": kept}
        needles = sorted(self.needle_spans)
        if len(needles) > 1:  # each later mention's rows over the earlier mentions
            links = [_reading(q, k, kept_mask, layout.block_size, later, needles[:i])
                     for i, later in enumerate(needles) if i > 0]
            record["link_mass"] = [sum(m[h] for m, _ in links) for h in range(q.shape[1])]
            record["link_kept"] = [all(ok[h] for _, ok in links) for h in range(q.shape[1])]
        self.layers[layer] = record
        return layout

    def summary(self) -> dict:
        """Needle mass in dropped vs kept (layer, head) pairs, the worst dropped ones, and the same for the
        later mentions' rows over the earlier ones (several needles only)."""
        out = _split(self.layers, "mass", "kept")
        out["worst_dropped"] = out.pop("worst")
        if any("link_mass" in rec for rec in self.layers.values()):
            link = _split(self.layers, "link_mass", "link_kept")
            out.update(link_mass_dropped=link["dropped"], link_mass_kept=link["kept"],
                       link_heads_dropping=link["heads_dropping"], link_worst_dropped=link["worst"])
        out["needle_mass_dropped"], out["needle_mass_kept"] = out.pop("dropped"), out.pop("kept")
        return out


def _reading(q, k, kept_mask, block_size: int, rows: tuple[int, int], targets) -> tuple[list, list]:
    """Per head: the exact softmax mass rows [start, end) put on the target spans, and whether every key
    block holding target tokens is kept for every query block of those rows."""
    start, end = rows
    hq, hkv, length = q.shape[1], k.shape[1], k.shape[2]
    queries = q[0, :, start:end].float() / q.shape[-1] ** 0.5  # [Hq, R, D]; sdpa's default scale
    keys = k[0].float().repeat_interleave(hq // hkv, dim=0)  # [Hq, L, D]
    visible = torch.arange(length, device=q.device)[None] <= torch.arange(start, end, device=q.device)[:, None]
    probs = torch.softmax((queries @ keys.transpose(-1, -2)).masked_fill(~visible, -float("inf")), -1)
    target = torch.zeros(length, dtype=torch.bool, device=q.device)
    for s, e in targets:
        target[s:e] = True
    mass = probs[..., target].sum(-1).mean(-1)  # [Hq]
    blocks = torch.unique(torch.nonzero(target).flatten() // block_size)
    q_blocks = torch.arange(start // block_size, (end - 1) // block_size + 1, device=q.device)
    kept = kept_mask[:, q_blocks][:, :, blocks].flatten(1).all(-1)  # [Hq]
    return mass.cpu().tolist(), kept.cpu().tolist()


def _split(layers: dict, mass_key: str, kept_key: str) -> dict:
    dropped, kept, worst, heads = 0.0, 0.0, [], 0
    for layer, rec in sorted(layers.items()):
        if mass_key not in rec:
            continue
        heads += len(rec[mass_key])
        for head, (m, ok) in enumerate(zip(rec[mass_key], rec[kept_key], strict=True)):
            if ok:
                kept += m
            else:
                dropped += m
                worst.append((m, layer, head))
    worst.sort(reverse=True)
    return {"dropped": dropped, "kept": kept, "heads_dropping": len(worst), "heads": heads,
            "worst": [{"layer": la, "head": h, "mass": round(m, 4)} for m, la, h in worst[:5]]}


def relevant_needles(example) -> list[tuple[int, int]]:
    """The needles the answer needs: the asked one for single/multi-key, every needle for the others."""
    if example.task in ("niah_single", "niah_multikey", "passkey"):
        return [tuple(example.needle_spans[0])]
    return [tuple(span) for span in example.needle_spans]


def question_rows(example) -> tuple[int, int]:
    """Positions after the context: the question, the answer prefix and the chat template's tail."""
    return example.context_span[1], example.length
