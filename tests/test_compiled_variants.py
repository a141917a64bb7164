"""A prompt's length must not decide which kernels get compiled.

Triton compiles one variant of a kernel per specialisation key: every constexpr's value, and for each other
integer argument whether it is 1 and whether it divides by 16 (unless the kernel lists it in
`do_not_specialize`), for each tensor its dtype and 16-byte alignment. A compile costs seconds on a GPU. A
server meets new prompt lengths, chunk lengths and chunk offsets with every request, so a key that follows them
compiles again and again in the middle of serving (seen on an H100/H200 GPU: the first mixed batch of
continuous batching took ten times as long as the same batch once compiled). Rule: within one power-of-two
bucket of key blocks, new lengths and offsets add no key to any kernel; a new bucket adds keys only to the
two policy kernels, whose row width (NKB) is that power of two.

The keys are computed here from each launch's arguments, as Triton's rules above state them, and the
`do_not_specialize` lists are read from the kernels' decorators, so the test does not depend on Triton's
internals (the interpreter of Triton 3.4 and of 3.9 differ).
"""

import ast
import contextlib
import importlib
import inspect

import pytest
import torch

from sparse_prefill import SparsePrefillConfig, kernels, selection, sparse_attention

KERNEL_MODULES = ("sparse_prefill.kernels.triton_attention", "sparse_prefill.selection.fused",
                  "sparse_prefill.selection.fused_policy")
POLICY_KERNELS = {"_calibrate_heads_kernel", "_choose_rows_kernel"}
CONFIG = SparsePrefillConfig(block_size=64, gamma=0.9, min_budget_tokens=128, min_seq_len=0, backend="triton",
                             exact_tail_tokens=64, question_blocks=2)


def not_specialised(module, name: str) -> set[str]:
    """The names a kernel's `@triton.jit(do_not_specialize=...)` decorator lists (a tuple or a module constant)."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call):
                    for kw in dec.keywords:
                        if kw.arg == "do_not_specialize":
                            if isinstance(kw.value, ast.Name):
                                return set(getattr(module, kw.value.id))
                            return set(ast.literal_eval(kw.value))
    return set()


def specialisation_key(fn, skip: set[str], args, kwargs) -> tuple:
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args, strict=False))
    bound.update(kwargs)
    key = []
    for name, value in bound.items():
        param = params.get(name)
        if param is None:  # launch options: num_warps, num_stages, maxnreg
            key.append((name, value))
        elif "constexpr" in str(param.annotation):
            key.append((name, value))
        elif isinstance(value, bool) or value is None:
            key.append((name, value))
        elif isinstance(value, int):
            width = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
            key.append((name, width) if name in skip else (name, width, value == 1, value % 16 == 0))
        elif isinstance(value, torch.Tensor):
            key.append((name, value.dtype, value.data_ptr() % 16 == 0))
        else:
            key.append((name, type(value).__name__))
    return tuple(key)


@contextlib.contextmanager
def recorded_keys():
    """Every kernel launch's (kernel, specialisation key), while the context is open."""
    seen: set[tuple] = set()
    patches = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, kernel in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(kernel, "fn"):
                skip = not_specialised(module, name)

                class Recorder:
                    def __init__(self, kernel, name, skip):
                        self.kernel, self.name, self.skip = kernel, name, skip

                    def __getitem__(self, grid):
                        def launch(*args, **kwargs):
                            seen.add((self.name, specialisation_key(self.kernel.fn, self.skip, args, kwargs)))
                            return self.kernel[grid](*args, **kwargs)
                        return launch

                patches.append((module, name, kernel))
                setattr(module, name, Recorder(kernel, name, skip))
    try:
        yield seen
    finally:
        for module, name, kernel in patches:
            setattr(module, name, kernel)


def run(q_len: int, k_len: int, last_chunk: bool = True):
    g = torch.Generator().manual_seed(q_len * 7919 + k_len)
    q = torch.randn(1, 4, q_len, 64, generator=g, dtype=torch.float16)
    k, v = (torch.randn(1, 2, k_len, 64, generator=g, dtype=torch.float16) for _ in range(2))
    sparse_attention(q, k, v, CONFIG, last_chunk=last_chunk)


# (q_len, k_len, last_chunk): a whole prompt, a chunk in the middle, the last chunk; key blocks <= 16 (one NKB)
REPRESENTATIVES = [(1024, 1024, True), (256, 768, False), (256, 1024, True)]
OTHER_LENGTHS = [(700, 700, True), (961, 961, True), (130, 517, False), (333, 1000, False), (77, 990, True),
                 (200, 1001, True)]


def as_on_cuda(mp: pytest.MonkeyPatch):
    """The kernels run where the package would run them on CUDA; here the interpreter stands in."""
    mp.setattr(selection, "fused_selection_supports", lambda q: None)
    mp.setattr(kernels, "triton_supports", lambda q, block_size: None)


@pytest.fixture(scope="module")
def representative_keys():
    with pytest.MonkeyPatch.context() as mp, recorded_keys() as seen:
        as_on_cuda(mp)
        for shape in REPRESENTATIVES:
            run(*shape)
    assert {name for name, _ in seen} >= {"_block_sparse_attention_kernel", "_row_stats_kernel",
                                          "_pooled_probs_kernel", "_pool_tokens_kernel"} | POLICY_KERNELS
    return seen


def test_new_lengths_and_offsets_compile_nothing_new(representative_keys, monkeypatch):
    as_on_cuda(monkeypatch)
    with recorded_keys() as seen:
        for shape in OTHER_LENGTHS:
            run(*shape)
    new = seen - representative_keys
    assert not new, "kernel variants that follow the length: " + "; ".join(
        f"{name}: {[kv for kv in key if kv not in dict_keys(representative_keys, name)]}" for name, key in new)


def dict_keys(seen, name):
    return {kv for n, key in seen if n == name for kv in key}


def test_a_new_bucket_of_key_blocks_compiles_only_the_policy_kernels(representative_keys, monkeypatch):
    as_on_cuda(monkeypatch)
    with recorded_keys() as seen:
        run(1500, 1500)  # 24 key blocks: NKB 32
    assert {name for name, _ in seen - representative_keys} == POLICY_KERNELS
