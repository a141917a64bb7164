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
        start, end = self.question
        hq, hkv, length = q.shape[1], k.shape[1], k.shape[2]
        bs = layout.block_size
        rows = q[0, :, start:end].float() / q.shape[-1] ** 0.5  # [Hq, R, D]; scale as sdpa's default
        keys = k[0].float().repeat_interleave(hq // hkv, dim=0)  # [Hq, L, D]
        logits = rows @ keys.transpose(-1, -2)
        visible = torch.arange(length, device=q.device)[None] <= torch.arange(start, end, device=q.device)[:, None]
        probs = torch.softmax(logits.masked_fill(~visible, -float("inf")), -1)  # [Hq, R, L]
        needle = torch.zeros(length, dtype=torch.bool, device=q.device)
        for s, e in self.needle_spans:
            needle[s:e] = True
        mass = probs[..., needle].sum(-1).mean(-1)  # [Hq]
        blocks = torch.unique(torch.nonzero(needle).flatten() // bs)
        q_blocks = torch.arange(start // bs, (end - 1) // bs + 1, device=q.device)
        kept = layout.to_mask()[0][:, q_blocks][:, :, blocks].flatten(1).all(-1)  # [Hq]
        self.layers[layer] = {"mass": mass.cpu().tolist(), "kept": kept.cpu().tolist()}
        return layout

    def summary(self) -> dict:
        """Needle mass in dropped vs kept (layer, head) pairs, and the worst dropped ones."""
        dropped, kept, worst = 0.0, 0.0, []
        for layer, rec in sorted(self.layers.items()):
            for head, (m, ok) in enumerate(zip(rec["mass"], rec["kept"], strict=True)):
                if ok:
                    kept += m
                else:
                    dropped += m
                    worst.append((m, layer, head))
        worst.sort(reverse=True)
        heads = sum(len(rec["mass"]) for rec in self.layers.values())
        return {"needle_mass_dropped": dropped, "needle_mass_kept": kept,
                "heads_dropping": len(worst), "heads": heads,
                "worst_dropped": [{"layer": la, "head": h, "mass": round(m, 4)} for m, la, h in worst[:5]]}


def relevant_needles(example) -> list[tuple[int, int]]:
    """The needles the answer needs: the asked one for single/multi-key, every needle for the others."""
    if example.task in ("niah_single", "niah_multikey", "passkey"):
        return [tuple(example.needle_spans[0])]
    return [tuple(span) for span in example.needle_spans]


def question_rows(example) -> tuple[int, int]:
    """Positions after the context: the question, the answer prefix and the chat template's tail."""
    return example.context_span[1], example.length
