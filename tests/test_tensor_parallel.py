"""Sparse prefill under transformers' tensor parallelism: a sharded patched model selects and computes what the
unsharded one does.

transformers' `tp_plan="auto"` splits each attention layer's heads over the ranks: rank r holds a contiguous slice
of the query heads and the KV heads they read (whole KV groups). The selection is local to a KV group when
`proxy_heads` is "q" or "kv", so each rank must choose, for its heads, exactly the rows the unsharded model chooses
for them, and the all-reduced logits must equal the unsharded logits to fp32 rounding.

The distributed test launches `python -m torch.distributed.run --standalone --nproc-per-node 2` on this file (two
CPU processes, gloo; about 25 s on 2 cores, mostly the two processes' imports) while the unsharded model runs here.
Layouts are recorded where `sparse_attention` asks `select_blocks` for them (`eval.recording.intercept_layouts`).
"""

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from model_zoo import COMMON, tiny_model

import sparse_prefill
from sparse_prefill import SparsePrefillConfig, patch_model, select_blocks, unpatch_model
from sparse_prefill.eval.recording import intercept_layouts

WORLD = 2
# Short prompts need a small block and budget to be sparse: gamma 0.8 on the sharpened tiny model keeps ~85 % of the
# causal blocks, and the int-proxy runs below show that another estimate changes most rows.
CONFIG = SparsePrefillConfig(block_size=64, gamma=0.8, min_seq_len=0, min_budget_tokens=64, exact_tail_tokens=64,
                             question_blocks=2)
PROMPT = torch.randint(3, COMMON["vocab_size"], (1, 2048), generator=torch.Generator().manual_seed(0))
# "q" and "kv" keep their meaning on a rank; an int is a count of proxies for the whole layer, so each rank runs its
# share (2 -> 1, 4 -> 2); 1 proxy pools heads that live on both ranks, which patch_model refuses under TP.
PROXIES = ("q", "kv", 1, 2, 4)
LOGIT_TOLERANCE = 1e-5  # fp32: the row-parallel projections sum partial products in another order (measured ~1e-6)
TIMEOUT_S = 240  # the whole 2-process run, imports included; it takes ~25 s on 2 cores


def run_patched(model, proxy_heads) -> dict:
    """Logits and per-layer layouts (bool masks [1, H, Qb, Kb]) of one patched forward over PROMPT; or the error."""
    masks = {}

    def record(layer, q, k, layout):
        masks[layer] = layout.to_mask().cpu()
        return layout

    try:
        patch_model(model, CONFIG.replace(proxy_heads=proxy_heads))
        with torch.no_grad(), intercept_layouts(model, record):
            logits = model(input_ids=PROMPT).logits
    except ValueError as err:
        return {"error": str(err)}
    finally:
        unpatch_model(model)
    return {"logits": logits, "masks": masks}


def greedy_tokens(model) -> list[int]:
    """Four greedy tokens after PROMPT, patched: a sparse prefill, then decode steps on the previous attention."""
    patch_model(model, CONFIG)
    try:
        return model.generate(PROMPT, max_new_tokens=4, do_sample=False)[0, PROMPT.shape[1]:].tolist()
    finally:
        unpatch_model(model)


def tensor_parallel_kwargs() -> dict:
    """`from_pretrained` arguments for the model's own TP plan over every rank (the plain `tp_plan` on older
    transformers, which newer ones deprecate for a DistributedConfig)."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def worker(checkpoint: str, out_dir: str) -> None:
    """One rank: load the checkpoint sharded over the torchrun world, run every proxy kind, save what it saw."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **tensor_parallel_kwargs()).eval()
    results = {proxy: run_patched(model, proxy) for proxy in PROXIES}
    results["generate"] = greedy_tokens(model)
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


def _launch(checkpoint: Path, out_dir: Path) -> subprocess.Popen:
    root = str(Path(sparse_prefill.__file__).resolve().parents[1])  # the ranks import the copy this test imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", __file__,
               "--worker", str(checkpoint), str(out_dir)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends torchrun and its ranks


def _finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"the 2-process run failed (exit {proc.returncode}):\n{output[-4000:]}"
    return output


gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available in this torch build")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(unsharded results, [rank 0 results, rank 1 results]) per proxy kind, from one 2-process launch."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("tensor_parallel")
    tiny_model("llama").save_pretrained(tmp / "checkpoint")
    proc = _launch(tmp / "checkpoint", tmp)
    try:  # the unsharded runs overlap the ranks'
        model = AutoModelForCausalLM.from_pretrained(tmp / "checkpoint", dtype=torch.float32).eval()
        unsharded = {proxy: run_patched(model, proxy) for proxy in PROXIES}
        unsharded["generate"] = greedy_tokens(model)
    finally:
        _finish(proc)
    return unsharded, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def head_slice(mask: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows of the unsharded layout for the query heads `rank` holds (a contiguous slice of 1/WORLD)."""
    per_rank = mask.shape[1] // WORLD
    return mask[:, rank * per_rank:(rank + 1) * per_rank]


def causal_density(mask: torch.Tensor) -> float:
    n = mask.shape[-1]
    return float(mask.sum()) / (mask.shape[0] * mask.shape[1] * n * (n + 1) // 2)


@gloo
@pytest.mark.parametrize("proxy_heads", ["q", "kv"])
def test_sharded_model_selects_and_computes_what_the_unsharded_one_does(runs, proxy_heads):
    unsharded, ranks = runs
    full = unsharded[proxy_heads]
    assert set(full["masks"]) == {0, 1}, "both layers must run the sparse path"
    assert all(causal_density(m) < 0.9 for m in full["masks"].values()), "the layouts must be genuinely sparse"
    for rank, got in enumerate(ranks):
        got = got[proxy_heads]
        assert "error" not in got, got.get("error")
        for layer, mask in full["masks"].items():
            local = got["masks"][layer]
            assert local.shape[1] == COMMON["num_attention_heads"] // WORLD, "the heads must be sharded"
            assert torch.equal(local, head_slice(mask, rank)), f"rank {rank} layer {layer}: another layout"
        diff = (got["logits"] - full["logits"]).abs().max()
        assert diff <= LOGIT_TOLERANCE, f"rank {rank}: logits differ by {diff:.2e}"


@gloo
def test_sharded_model_generates_what_the_unsharded_one_does(runs):
    unsharded, ranks = runs
    assert all(got["generate"] == unsharded["generate"] for got in ranks), (unsharded["generate"], ranks)


@gloo
@pytest.mark.parametrize("proxy_heads", [2, 4])
def test_an_int_number_of_proxies_selects_what_it_selects_unsharded(runs, proxy_heads):
    """Each rank runs its share of the proxies (P / N), each pooling the same heads as unsharded."""
    unsharded, ranks = runs
    assert not torch.equal(unsharded[2]["masks"][0], unsharded[4]["masks"][0]), \
        "the test needs 2 and 4 proxies to choose different layouts"
    for rank, got in enumerate(ranks):
        assert "error" not in got[proxy_heads], got[proxy_heads].get("error")
        for layer, mask in unsharded[proxy_heads]["masks"].items():
            assert torch.equal(got[proxy_heads]["masks"][layer], head_slice(mask, rank)), (rank, layer)


@gloo
def test_a_proxy_that_pools_heads_of_several_ranks_is_refused_at_patch_time(runs):
    unsharded, ranks = runs
    assert "error" not in unsharded[1], "1 proxy fits 4 query heads over 2 KV heads"
    for got in ranks:
        assert "pools heads that tensor parallelism puts on 2 GPUs" in got[1].get("error", ""), got[1]


def rank_share(model, tp_size=2, dtensor=False):
    """`model` as one of `tp_size` ranks holds it, without a process group: each layer's q/k projections cut to the
    rank's rows, recorded as transformers 5.8-5.12 do (plain shares, `model._tp_size`) or as 5.16 does (weights
    keeping the layer's shape with `to_local()` giving the share, no `_tp_size`)."""
    for layer in model.model.layers:
        attention = layer.self_attn
        for name in ("q_proj", "k_proj"):
            proj = getattr(attention, name)
            rows = proj.weight.shape[0] // tp_size
            if dtensor:
                share = proj.weight.detach()[:rows]
                proj.weight.to_local = lambda share=share: share
            else:
                setattr(attention, name, torch.nn.Linear(proj.in_features, rows, bias=proj.bias is not None))
    if not dtensor:
        model._tp_size = tp_size
    return model


@pytest.mark.parametrize("dtensor", [False, True], ids=["plain shares (5.8-5.12)", "DTensor, no _tp_size (5.16)"])
def test_patch_time_checks_count_the_whole_layer_however_transformers_records_the_sharding(dtensor):
    """The tiny Llama has 4 query heads over 2 KV heads. On 2 ranks, 2 proxies (one per rank) fit and 1 proxy (pooling
    both ranks' heads) does not, whichever way the release records the sharding. Before, the plain shares were
    divided twice (2 refused) and the DTensor release was taken for one GPU (1 accepted)."""
    unpatch_model(patch_model(rank_share(tiny_model("llama"), dtensor=dtensor), CONFIG.replace(proxy_heads=2)))
    with pytest.raises(ValueError, match="pools heads that tensor parallelism puts on 2 GPUs"):
        patch_model(rank_share(tiny_model("llama"), dtensor=dtensor), CONFIG.replace(proxy_heads=1))
    unpatch_model(patch_model(tiny_model("llama"), CONFIG.replace(proxy_heads=1)))  # unsharded: 1 proxy fits


@pytest.mark.parametrize("dtensor", [False, True], ids=["plain shares (5.8-5.12)", "DTensor, no _tp_size (5.16)"])
def test_the_warm_up_compiles_for_the_heads_a_rank_attends(dtensor, monkeypatch):
    """Each rank's attention sees its 2 of the 4 query heads and 1 of the 2 KV heads: the warm-up runs that, not
    the whole layer (which would cost each rank twice the work and memory at start)."""
    from sparse_prefill.patches import per_request, transformers_attention

    monkeypatch.setattr(per_request, "triton_supports", lambda q, block_size: None)  # as on a GPU
    asked = []
    monkeypatch.setattr(per_request, "warm_up_kernels", lambda *args, **kw: asked.append(args[:2]) or 1)
    model = patch_model(rank_share(tiny_model("llama"), dtensor=dtensor), CONFIG.replace(backend="auto"))
    try:
        assert transformers_attention.warm_up(model, max_len=1024) == 1 and asked == [(2, 1)]
    finally:
        unpatch_model(model)


@pytest.fixture(scope="module")
def layer_qk():
    """Layer 0's q [1, 4, L, 16] and k [1, 2, L, 16] of the unsharded tiny model over PROMPT."""
    captured = {}

    def capture(layer, q, k, layout):
        captured.setdefault(layer, (q, k))
        return layout

    model = tiny_model("llama")
    patch_model(model, CONFIG)
    with torch.no_grad(), intercept_layouts(model, capture):
        model(input_ids=PROMPT)
    unpatch_model(model)
    return captured[0]


@pytest.mark.parametrize("proxy_heads", ["q", "kv", 1, 2])
def test_selection_on_a_slice_of_kv_groups_is_that_slice_of_the_selection(layer_qk, proxy_heads):
    """What TP relies on, without processes: select_blocks on a contiguous slice of whole KV groups gives the rows
    the whole layer's selection gives those heads ("q", "kv"); an int P on the slice means P proxies over the
    slice's heads, as P*N proxies do over the whole layer."""
    q, k = layer_qk
    hq, hkv = q.shape[1] // WORLD, k.shape[1] // WORLD
    whole_proxies = proxy_heads * WORLD if isinstance(proxy_heads, int) else proxy_heads
    whole = select_blocks(q, k, CONFIG.replace(proxy_heads=whole_proxies)).to_mask()
    assert causal_density(whole) < 0.9
    for rank in range(WORLD):
        part = select_blocks(q[:, rank * hq:(rank + 1) * hq], k[:, rank * hkv:(rank + 1) * hkv],
                             CONFIG.replace(proxy_heads=proxy_heads)).to_mask()
        assert torch.equal(part, head_slice(whole, rank)), f"rank {rank}'s heads select other blocks"


if __name__ == "__main__":  # one rank of the 2-process run (see _launch)
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), required=True)
    worker(*parser.parse_args().worker)
