"""Perplexity of long text, dense vs sparse: how much the attention the sparse path drops costs.

One forward over the whole text (the sparse path works at prefill), per-token losses from the
hidden states in chunks, so the [length x vocab] logits never exist at once. Reported over all
tokens and over the second half, where long-range attention (and so sparsity) matters most.
"""

from __future__ import annotations

import math
import time

import torch

from ..config import SparsePrefillConfig
from ..patches import unpatch_model
from .recording import LayoutRecorder, intercept_layouts, num_layers
from .runner import model_device, set_mode, synchronize

_LOGIT_CHUNK = 1024


@torch.inference_mode()
def token_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token, fp32 [length - 1], for input_ids [1, length]."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    losses = []
    for start in range(0, input_ids.shape[1] - 1, _LOGIT_CHUNK):
        stop = min(start + _LOGIT_CHUNK, input_ids.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        targets = input_ids[:, start + 1:stop + 1]
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none"))
    return torch.cat(losses)


def perplexity_rows(model, input_ids: list[int], config: SparsePrefillConfig, modes=("dense", "sparse")) -> list[dict]:
    """One row per mode: perplexity (all tokens and second half), forward seconds, sparse density."""
    device = model_device(model)
    ids = torch.tensor([input_ids], device=device)
    recorder = LayoutRecorder(num_layers(model))
    rows = []
    try:
        with intercept_layouts(model, recorder):
            for mode in modes:
                set_mode(model, mode, config)
                recorder.reset()
                synchronize(device)
                start = time.perf_counter()
                losses = token_losses(model, ids)
                synchronize(device)
                seconds = time.perf_counter() - start
                half = losses[losses.shape[0] // 2:]
                rows.append({"length": len(input_ids), "mode": mode, "ppl": math.exp(float(losses.mean())),
                             "ppl_second_half": math.exp(float(half.mean())), "seconds": seconds,
                             "density": recorder.mean_density() if mode == "sparse" else None})
    finally:
        unpatch_model(model)
    return rows
