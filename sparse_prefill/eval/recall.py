"""Selection quality on real attention: captured softmax mass against density, per policy and layer.

`sparse-prefill recall` runs one forward pass of a real model on a long prompt, captures each
layer's post-RoPE queries and keys through transformers' `AttentionInterface` (so any model whose
attention goes through it works), and scores block-selection policies against exact attention:

* captured mass: the share of each query's exact softmax mass that falls inside the key blocks its
  query block keeps, averaged over queries (1.0 = nothing lost);
* density: kept causal blocks / all causal blocks (1.0 = dense).

Both come from one exact block-mass matrix per layer, M[b, h, i, j] = the mean over the queries of
query block i of their softmax mass in key block j, computed in query chunks (never N x N). Any
layout is then scored by summing M over its kept blocks.

Policies, all producing the same `BlockLayout` the kernel runs:
  ours        select_blocks() with the given config, gamma swept;
  oracle      per (head, query block) the fewest blocks whose exact mass reaches g, chosen from M
              itself: the least any block-sparse method needs to give every row g;
  flexprefill vertical-slash coverage from the last 128 queries (see peer_policies.py);
  xattention  stride-8 antidiagonal scores with a per-row cumulative threshold.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SparsePrefillConfig
from ..layout import causal_block_limits
from ..selection.budget import choose_blocks, last_block_mass
from ..selection.estimate import estimate_block_scores
from .options import DEFAULTS, RECALL_POLICIES
from .peer_policies import flexprefill_lines, flexprefill_select, xattention_block_mass, xattention_select

_ROWS_PER_CHUNK = 256


@dataclass
class LayerQK:
    """One attention layer's post-RoPE queries [B, Hq, L, D] and keys [B, Hkv, L, D], and its scale."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float


# ---------------------------------------------------------------------------------------------- capture
_CAPTURE_NAME = "sparse_prefill_recall_capture"


def capture_queries_and_keys(model, input_ids: torch.Tensor, store_dtype=torch.float16) -> list[LayerQK]:
    """Run `model` once on `input_ids` and return every attention layer's queries and keys (on CPU).

    A capturing function is registered through `AttentionInterface`; it records q and k and then
    calls the model's own attention implementation, so the forward pass is unchanged.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = model.config._attn_implementation
    if previous not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"recall needs a model whose attention goes through AttentionInterface; this one uses "
                         f"{previous!r}. Call model.set_attn_implementation('sdpa') first.")
    captured: list[LayerQK] = []
    inner = ALL_ATTENTION_FUNCTIONS[previous]

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        captured.append(LayerQK(query.detach().to("cpu", store_dtype), key.detach().to("cpu", store_dtype), scale))
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    AttentionInterface.register(_CAPTURE_NAME, capture)
    AttentionMaskInterface.register(_CAPTURE_NAME, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    model.set_attn_implementation(_CAPTURE_NAME)
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    return captured


# ------------------------------------------------------------------------------------------- exact mass
def exact_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """M fp32 [B, Hq, n_q_blocks, n_k_blocks] on q's device: the mean over each query block's rows of their
    exact causal softmax mass in each key block. Rows of M sum to 1. Computed a few query blocks at a time."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, bs, device = hq // hkv, block_size, q.device
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n_qb, n_kb = -(-lq // bs), -(-lk // bs)
    q_off = lk - lq
    out = torch.zeros(b, hq, n_qb, n_kb, device=device)
    rows_per_chunk = max(bs, _ROWS_PER_CHUNK // bs * bs)
    for r0 in range(0, lq, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, lq)
        k_end = min(lk, r1 + q_off)  # keys any row of the chunk may see
        kb_end = -(-k_end // bs)
        pos = torch.arange(r0, r1, device=device) + q_off
        allowed = torch.arange(k_end, device=device)[None, :] <= pos[:, None]
        qc = q[:, :, r0:r1].float().reshape(b, hkv, group * (r1 - r0), d) * scale
        s = qc @ k[:, :, :k_end].float().transpose(-1, -2)  # [B, Hkv, G*R, K]
        s = s.reshape(b, hkv, group, r1 - r0, k_end).masked_fill(~allowed, -math.inf)
        p = torch.softmax(s, dim=-1).reshape(b, hq, r1 - r0, k_end)
        p = torch.nn.functional.pad(p, (0, kb_end * bs - k_end)).reshape(b, hq, r1 - r0, kb_end, bs).sum(-1)
        out[:, :, r0 // bs:-(-r1 // bs), :kb_end] += _sum_rows_per_block(p, bs)
    rows = torch.clamp(lq - torch.arange(n_qb, device=device) * bs, max=bs).float()
    return out / rows[:, None]


def _sum_rows_per_block(p: torch.Tensor, bs: int) -> torch.Tensor:
    """Sum the rows of [B, H, R, K] (R starting at a block boundary) into their query blocks."""
    r = p.shape[2]
    n = -(-r // bs)
    p = torch.nn.functional.pad(p, (0, 0, 0, n * bs - r))
    return p.reshape(p.shape[0], p.shape[1], n, bs, p.shape[-1]).sum(3)


def score_mask(mask: torch.Tensor, block_mass: torch.Tensor, q_len: int, k_len: int,
               block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(captured mass, density) per head, fp32 [B, Hq] each, of a bool block mask [B, Hq, Qb, Kb]."""
    n_qb, n_kb = mask.shape[-2:]
    device = block_mass.device
    limits = causal_block_limits(n_qb, block_size, q_len, k_len, device=device)
    causal = torch.arange(n_kb, device=device)[None, :] < limits[:, None]
    rows = torch.clamp(q_len - torch.arange(n_qb, device=device) * block_size, max=block_size).float()
    per_row = (block_mass * mask).sum(-1)  # [B, H, Qb]
    captured = (per_row * rows).sum(-1) / rows.sum()
    density = (mask & causal).sum((-2, -1)).float() / causal.sum()
    return captured.cpu(), density.cpu()


def oracle_mask(block_mass: torch.Tensor, g: float) -> torch.Tensor:
    """Per (head, query block) the fewest key blocks whose exact mass reaches g of the row's."""
    order = block_mass.argsort(-1, descending=True)
    cumulative = block_mass.gather(-1, order).cumsum(-1)
    count = (cumulative < g * cumulative[..., -1:]).sum(-1, keepdim=True) + 1
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    return rank < count


# ----------------------------------------------------------------------------------------------- policies
Selector = Callable[[float], torch.Tensor]  # gamma -> bool block mask [B, Hq, Qb, Kb]


def _ours(layer: LayerQK, config: SparsePrefillConfig, block_mass: torch.Tensor) -> Selector:
    """`select_blocks`: the estimate and the exact last block do not depend on gamma, so they run once."""
    q, k, q_len, k_len = layer.q, layer.k, layer.q.shape[2], layer.k.shape[2]
    if q.is_cuda:
        from ..selection.fused import estimate_block_scores_fused as estimate
        from ..selection.fused import last_block_mass_fused as last
    else:
        estimate, last, q, k = estimate_block_scores, last_block_mass, q.float(), k.float()
    scores = estimate(q, k, config, scale=layer.scale)
    last_mass = last(q, k, config, scale=layer.scale)
    return lambda g: choose_blocks(scores, last_mass, config.replace(gamma=g), q_len, k_len)


def _oracle(layer: LayerQK, config: SparsePrefillConfig, block_mass: torch.Tensor) -> Selector:
    return lambda g: oracle_mask(block_mass, g)


def _flexprefill(layer: LayerQK, config: SparsePrefillConfig, block_mass: torch.Tensor) -> Selector:
    vertical, slash = flexprefill_lines(layer.q, layer.k, layer.scale)
    return lambda g: flexprefill_select(vertical, slash, config.replace(gamma=g), layer.q.shape[2], layer.k.shape[2])


def _xattention(layer: LayerQK, config: SparsePrefillConfig, block_mass: torch.Tensor) -> Selector:
    mass = xattention_block_mass(layer.q, layer.k, config.block_size, layer.scale)
    return lambda g: xattention_select(mass, config.replace(gamma=g), layer.q.shape[2], layer.k.shape[2])


POLICIES: dict[str, Callable[[LayerQK, SparsePrefillConfig, torch.Tensor], Selector]] = dict(
    zip(RECALL_POLICIES, (_ours, _oracle, _flexprefill, _xattention), strict=True))


def evaluate_layers(layers: list[LayerQK], config: SparsePrefillConfig, gammas=DEFAULTS["recall"].gammas,
                    policies=RECALL_POLICIES, device=None, log=print) -> dict:
    """Score every policy at every gamma on captured layers. Returns the JSON-ready result dict.

    `config` fixes everything but gamma (block size, budgets, stride, ...); everything runs on
    `device` (default: where the captured tensors are, the CPU).
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}.")
    bs = config.block_size
    curves = {p: {g: {"captured_mass": [], "density": []} for g in gammas} for p in policies}
    for index, layer in enumerate(layers):
        t0 = time.time()
        q_len, k_len = layer.q.shape[2], layer.k.shape[2]
        on_device = LayerQK(layer.q.to(device), layer.k.to(device), layer.scale) if device else layer
        block_mass = exact_block_mass(on_device.q, on_device.k, bs, layer.scale)
        for policy in policies:
            select = POLICIES[policy](on_device, config, block_mass)
            for g in gammas:
                captured, density = score_mask(select(g), block_mass, q_len, k_len, bs)
                curves[policy][g]["captured_mass"].append(captured.mean(0).tolist())
                curves[policy][g]["density"].append(density.mean(0).tolist())
        log(f"layer {index}: {time.time() - t0:.1f} s")
    result = {"config": {k: getattr(config, k) for k in config.__dataclass_fields__ if k != "gamma"},
              "layers": len(layers), "q_len": layers[0].q.shape[2] if layers else 0, "policies": {}}
    for policy, by_gamma in curves.items():
        points = []
        for g, per in by_gamma.items():
            mass, dens = torch.tensor(per["captured_mass"]), torch.tensor(per["density"])  # [layers, heads]
            points.append({"gamma": g, "captured_mass": mass.mean().item(), "density": dens.mean().item(),
                           "min_head_captured_mass": mass.min().item(),
                           "per_layer": {"captured_mass": mass.mean(1).tolist(), "density": dens.mean(1).tolist()},
                           "per_head": {"captured_mass": per["captured_mass"], "density": per["density"]}})
        result["policies"][policy] = points
    return result


def density_at_mass(points: list[dict], target: float) -> float | None:
    """Density at which a policy's curve reaches `target` captured mass (linear between gammas), or None."""
    points = sorted(points, key=lambda p: p["density"])
    for lo, hi in zip(points, points[1:], strict=False):
        if lo["captured_mass"] < target <= hi["captured_mass"]:
            t = (target - lo["captured_mass"]) / (hi["captured_mass"] - lo["captured_mass"])
            return lo["density"] + t * (hi["density"] - lo["density"])
    return points[0]["density"] if points and points[0]["captured_mass"] >= target else None


def summary_table(result: dict, target: float = 0.95) -> str:
    """A text table: one line per policy and gamma, then each policy's density at `target` captured mass."""
    lines = [f"{'policy':<12} {'gamma':>6} {'captured':>9} {'density':>8} {'worst head':>10}"]
    for policy, points in result["policies"].items():
        for p in points:
            lines.append(f"{policy:<12} {p['gamma']:>6.3f} {p['captured_mass']:>9.4f} {p['density']:>8.4f} "
                         f"{p['min_head_captured_mass']:>10.4f}")
    oracle = {p["gamma"]: p["density"] for p in result["policies"].get("oracle", [])}
    for policy, points in result["policies"].items():
        d = density_at_mass(points, target)
        vs = f" = {d / oracle[target]:.2f} x the oracle's density at g={target}" if d and target in oracle else ""
        lines.append(f"{policy}: captured mass {target} at density " + (f"{d:.4f}{vs}" if d else "not reached"))
    return "\n".join(lines)


def plot_recall(result: dict, path: str | Path) -> None:
    """PNG: captured mass against density per policy (left) and per layer for `ours` and the oracle (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for policy, points in result["policies"].items():
        left.plot([p["density"] for p in points], [p["captured_mass"] for p in points], "o-", label=policy)
        for p in points:
            left.annotate(f"{p['gamma']:g}", (p["density"], p["captured_mass"]), fontsize=7)
    left.set_xlabel("density (kept causal blocks / causal blocks)")
    left.set_ylabel("captured attention mass")
    left.set_title(f"{result.get('model', 'model')}, {result['q_len']} tokens")
    left.grid(alpha=0.3)
    left.legend()
    cmap = plt.get_cmap("viridis")
    for policy, style in (("ours", "-"), ("oracle", ":")):
        points = result["policies"].get(policy)
        if not points:
            continue
        n_layers = len(points[0]["per_layer"]["density"])
        for layer in range(n_layers):
            right.plot([p["per_layer"]["density"][layer] for p in points],
                       [p["per_layer"]["captured_mass"][layer] for p in points], style,
                       color=cmap(layer / max(1, n_layers - 1)), alpha=0.8)
    right.set_xlabel("density")
    right.set_ylabel("captured mass")
    right.set_title("per layer (color = depth): ours solid, oracle dotted")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- prompt
NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey."
QUESTION = "What is the passkey mentioned in the text above? Answer with the number only."


def passkey_prompt(tokenizer, n_tokens: int, depth: float = 0.5, key: int = 68217) -> torch.Tensor:
    """About `n_tokens` tokens: Python's `pydoc_data.topics` text as haystack, the passkey sentence at
    `depth`, then the question, in the tokenizer's chat template when it has one. Returns [1, L] ids."""
    from pydoc_data.topics import topics

    def wrap(text: str) -> str:
        message = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        return message[0]["content"]

    needle = NEEDLE.format(key=key)
    haystack_ids = tokenizer("\n\n".join(topics[t] for t in sorted(topics)), add_special_tokens=False)["input_ids"]
    budget = n_tokens - len(tokenizer(wrap(needle), add_special_tokens=False)["input_ids"])
    for _ in range(4):  # re-tokenising the spliced text shifts the count by a few tokens: trim and retry
        haystack = tokenizer.decode(haystack_ids[: max(0, budget)])
        cut = haystack.rfind(". ", 0, int(len(haystack) * depth)) + 1 if depth < 1 else len(haystack)
        ids = tokenizer(wrap(f"{haystack[:cut]} {needle} {haystack[cut:]}"), add_special_tokens=False,
                        return_tensors="pt")["input_ids"]
        if ids.shape[1] <= n_tokens:
            break
        budget -= ids.shape[1] - n_tokens
    return ids


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(args) -> int:
    """`sparse-prefill recall` (its flags: parsers.py)."""
    from .models import load_model
    from .options import config_from_args
    from .output import check_output, output_dir

    config = config_from_args(args, SparsePrefillConfig(min_seq_len=0))
    gammas, policies = tuple(args.gammas), tuple(args.policies)
    check_output(args.out, "recall", args.overwrite)
    model, tokenizer = load_model(args.model, device=args.device, yarn=getattr(args, "yarn", None))
    input_ids = passkey_prompt(tokenizer, args.tokens, args.depth)
    layers = capture_queries_and_keys(model, input_ids)
    if args.layers:
        layers = [layers[i] for i in args.layers]
    device = model.device if model.device.type == "cuda" else None
    del model
    result = evaluate_layers(layers, config, gammas, policies, device=device)
    result["model"] = str(args.model)
    out = output_dir(args.out, "recall", args.overwrite)
    (out / "recall.json").write_text(json.dumps(result))
    plot_recall(result, out / "recall.png")
    print(summary_table(result))
    print(f"wrote {out / 'recall.json'} and {out / 'recall.png'}")
    return 0
