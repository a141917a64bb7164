"""The versions we declare are the versions we test, and the kernels run interpreted on every Triton we allow.

`.ci/floor.txt` pins the lowest version of each dependency that `pyproject.toml` declares; CI's floor stage
(`.ci/run`) runs the default tests under those pins. Triton 3.4-3.6's interpreter cannot run a loop whose bounds
are runtime values with numpy >= 2.4 unless `sparse_prefill/kernels/interpreter.py` mends it.
"""

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from model_zoo import tiny_model
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import AutoModelForCausalLM

import sparse_prefill.kernels  # noqa: F401  (importing the kernels mends old interpreters)
from sparse_prefill.kernels.interpreter import interpreting

ROOT = Path(__file__).resolve().parents[1]


def requirements(lines) -> dict[str, Requirement]:
    reqs = (Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return {req.name: req for req in reqs}


def only_version(req: Requirement, operator: str) -> Version:
    versions = [Version(spec.version) for spec in req.specifier if spec.operator == operator]
    assert len(versions) == 1, f"{req} should have exactly one '{operator}' bound"
    return versions[0]


def test_ci_floor_pins_exactly_the_declared_lower_bounds():
    # Rule: every core dependency has a floor, and the floor stage installs that floor, nothing older or newer.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = requirements(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    pinned = requirements((ROOT / ".ci" / "floor.txt").read_text().splitlines())
    assert pinned.keys() == declared.keys(), "pin each dependency pyproject.toml declares in .ci/floor.txt"
    for name, req in declared.items():
        floor, pin = only_version(req, ">="), only_version(pinned[name], "==")
        assert pin == floor, f"{name}: .ci/floor.txt pins {pin}, pyproject.toml declares >= {floor}"
        assert str(pinned[name].marker) == str(req.marker), f"{name}: the markers differ"


def test_transformers_can_use_the_installed_accelerate(tmp_path):
    # Rule: the accelerate floor is one our transformers floor accepts. transformers 5.0 treats accelerate < 1.1
    # as absent and refuses device_map; with 1.1 it fails importing a helper that 1.2 added.
    saved = tiny_model("llama")
    saved.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, saved.model.layers[0].self_attn.q_proj.weight)


@triton.jit
def _sum_first_n(x_ptr, n_ptr, out_ptr):
    n = tl.load(n_ptr)  # a runtime loop bound: a one-element array under the interpreter
    total = tl.zeros((1,), dtype=tl.float32)
    for i in range(0, n):
        total += tl.load(x_ptr + i + tl.arange(0, 1))
    tl.store(out_ptr + tl.arange(0, 1), total)


def test_interpreted_loops_with_runtime_bounds_run():
    # Triton 3.4-3.6 + numpy >= 2.4 raised "only 0-dimensional arrays can be converted to Python scalars" here,
    # as in every loop of the attention and selection kernels.
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.arange(1.0, 9.0, device=device)
    out = torch.zeros(1, device=device)
    _sum_first_n[(1,)](x, torch.tensor([5], dtype=torch.int32, device=device), out)
    assert out.item() == 15.0
