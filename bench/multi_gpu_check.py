"""Multi-GPU placement check: a model split over cuda:0 and cuda:1 with accelerate, patched.

Run once on a machine with two GPUs:

    PYTHONUNBUFFERED=1 python bench/multi_gpu_check.py [--seq-len 16384] [--devices cuda:0,cuda:1]

(`--devices cpu,cpu --seq-len 512` smoke-tests the script itself without GPUs.)

A random-weight Llama-style model (4 layers, head_dim 128, GQA 8/2) in bf16 is dispatched with layers
0-1 on cuda:0 and layers 2-3 on cuda:1, while the current CUDA device stays cuda:0, so a kernel that
launched on the current device instead of its tensors' device would fail or give garbage. Checks:

1. gamma=1.0 (every causal block; exact attention through the Triton kernel) matches dense sdpa logits
   within bf16 tolerance (its mean error against fp32 dense logits at most 1.25x that of dense bf16), and
   every layer ran the sparse path on its own GPU with that GPU current at the kernel launch;
2. the default config runs and its logits are finite (agreement with dense is reported, not asserted:
   random weights attend almost uniformly, the worst case for any sparse method);
3. a left-padded batch of two prompts (16K and 12K tokens) at gamma=1.0 gives, row by row, what each
   prompt gives alone under dense attention.

Prints one line per layer call (where it ran, which device was current at the kernel launch) and a
short table last; writes the details as JSON under $OUT when that variable is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparse_prefill.attention as sparse_attention_module  # noqa: E402
from sparse_prefill import SparsePrefillConfig, patch_model, unpatch_model  # noqa: E402
from sparse_prefill.patches import transformers_attention as glue  # noqa: E402

EXACT = SparsePrefillConfig(gamma=1.0, min_budget_tokens=0, min_seq_len=0)


def build_model(seq_len: int, devices: list[str]):
    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                         max_position_embeddings=max(seq_len, 4096) + 16, rope_theta=1e6)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # sharper attention than the init gives, closer to a trained model's
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    first, second = devices
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                  "model.layers.1": first, "model.layers.2": second, "model.layers.3": second,
                  "model.norm": second, "lm_head": second}
    return dispatch_model(model, device_map=device_map, main_device=first)


class Recorder:
    """Wraps the glue and the kernel dispatch to log where each layer ran and which device was current."""

    def __init__(self):
        self.calls, self.launches = [], []
        self._glue, self._kernel = glue._sparse_prefill, sparse_attention_module.block_sparse_attention

    def __enter__(self):
        def glue_spy(previous, module, query, *args):
            out = self._glue(previous, module, query, *args)
            self.calls.append({"layer": module.layer_idx, "device": str(query.device), "sparse": out is not None,
                               "q_len": query.shape[2]})
            return out

        def kernel_spy(q, *args, **kwargs):
            current = f"cuda:{torch.cuda.current_device()}" if q.is_cuda else str(q.device)
            self.launches.append({"device": str(q.device), "current": current})
            return self._kernel(q, *args, **kwargs)

        glue._sparse_prefill, sparse_attention_module.block_sparse_attention = glue_spy, kernel_spy
        return self

    def __exit__(self, *exc):
        glue._sparse_prefill, sparse_attention_module.block_sparse_attention = self._glue, self._kernel


def synchronize() -> None:
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def run(model, ids, **kwargs):
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, **kwargs).logits
    synchronize()
    return logits.float(), time.perf_counter() - start


def agreement(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got - want).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "rel_max": (diff.max() / want.abs().max()).item(),
            "top1": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="the two devices to split the layers over")
    args = parser.parse_args()
    devices = args.devices.split(",")
    if len(devices) != 2:
        sys.exit(f"--devices takes two devices, got {args.devices!r}")
    if any(d.startswith("cuda") for d in devices):
        if torch.cuda.device_count() < 2:
            sys.exit(f"needs two CUDA devices, found {torch.cuda.device_count()}")
        torch.cuda.set_device(devices[0])  # the current device stays the first GPU throughout
    n = args.seq_len
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {name} x{torch.cuda.device_count()}, devices {devices}, seq_len {n}")
    model = build_model(n, devices)
    ids = torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(1)).to(devices[0])
    results, failures = {}, []

    dense, dense_s = run(model, ids)
    patch_model(model, EXACT)
    with Recorder() as rec:
        exact, exact_s = run(model, ids)
    results["exact"] = {"seconds": exact_s, "calls": rec.calls, "launches": rec.launches}
    for call in rec.calls:
        print(f"  gamma=1.0 layer {call['layer']}: {call['device']}, sparse={call['sparse']}")
    for launch in rec.launches:
        if launch["device"] != launch["current"]:
            failures.append(f"kernel for {launch['device']} launched while {launch['current']} was current")
    if {c["device"] for c in rec.calls} != set(devices) or not all(c["sparse"] for c in rec.calls):
        failures.append(f"expected sparse calls on both devices, got {rec.calls}")

    patch_model(model, SparsePrefillConfig())
    with Recorder() as rec:
        default, default_s = run(model, ids)
    results["default"] = {"seconds": default_s, "calls": rec.calls}
    if not torch.isfinite(default).all():
        failures.append("default config gave non-finite logits")

    # A left-padded batch: row 1 holds the last 3/4 of the prompt after n/4 pad tokens.
    pad = n // 4
    batch = ids.expand(2, -1).clone()
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    unpatch_model(model)
    alone, _ = run(model, ids[:, pad:])
    patch_model(model, EXACT)
    with Recorder() as rec:
        padded, padded_s = run(model, batch, attention_mask=mask, position_ids=positions)
    results["padded"] = {"seconds": padded_s, "calls": rec.calls}
    unpatch_model(model)

    # bf16 itself is the tolerance: dense fp32 logits are the yardstick, and the sparse path at gamma=1
    # must be as close to them as dense bf16 is (its mean error at most 1.25x dense bf16's).
    truth, _ = run(model.float(), ids)
    noise = agreement(dense, truth)["mean_abs"]
    table = {
        "dense bf16 vs fp32": (agreement(dense, truth), dense_s, None),
        "gamma=1.0 vs fp32": (agreement(exact, truth), exact_s, 1.25 * noise),
        "gamma=1.0 vs dense": (agreement(exact, dense), exact_s, 1.5 * noise),
        "default vs dense": (agreement(default, dense), default_s, None),
        "padded row 0 vs alone": (agreement(padded[0:1], dense), padded_s, 1.5 * noise),
        "padded row 1 vs alone": (agreement(padded[1:2, pad:], alone), padded_s, 1.5 * noise),
    }
    print(f"\n{'run':<23}{'mean|diff|':>11}{'max|diff|':>11}{'top-1':>8}{'bound':>9}{'seconds':>9}")
    for label, (numbers, seconds, bound) in table.items():
        results.setdefault("agreement", {})[label] = {**numbers, "bound": bound}
        print(f"{label:<23}{numbers['mean_abs']:>11.4f}{numbers['max_abs']:>11.4f}{numbers['top1']:>8.4f}"
              f"{'-' if bound is None else f'{bound:.4f}':>9}{seconds:>9.2f}")
        if bound is not None and not numbers["mean_abs"] <= bound:
            failures.append(f"{label}: mean |diff| {numbers['mean_abs']:.4f} above the bf16 bound {bound:.4f}")
    print("(seconds: one forward each; the first sparse calls include Triton compilation)")

    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "multi_gpu_check.json"), "w") as f:
            json.dump({"seq_len": n, "device": name, "devices": devices, "results": results,
                       "failures": failures}, f, indent=1)
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
