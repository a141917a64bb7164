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

KERNEL_MODULES = ("sparse_prefill.kernels.triton_attention", "sparse_prefill.kernels.triton_fp8",
                  "sparse_prefill.selection.fused", "sparse_prefill.selection.fused_policy")
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


class Recorder:
    """Stands in for a kernel: `kernel[grid](...)` adds the launch's (name, key) to `seen`, then launches."""

    def __init__(self, kernel, name: str, skip: set[str], seen: set):
        self.kernel, self.name, self.skip, self.seen = kernel, name, skip, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.add((self.name, specialisation_key(self.kernel.fn, self.skip, args, kwargs)))
            return self.kernel[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def recorded_keys():
    """Every kernel launch's (kernel, specialisation key), while the context is open."""
    seen: set[tuple] = set()
    patches = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, kernel in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(kernel, "fn"):
                patches.append((module, name, kernel))
                setattr(module, name, Recorder(kernel, name, not_specialised(module, name), seen))
    try:
        yield seen
    finally:
        for module, name, kernel in patches:
            setattr(module, name, kernel)


def run(q_len: int, k_len: int, last_chunk: bool = True, config: SparsePrefillConfig = CONFIG):
    g = torch.Generator().manual_seed(q_len * 7919 + k_len)
    # 2 query heads: a buffer of 2 x (blocks x blocks) fp32 cells is 16-byte aligned for some lengths only
    q = torch.randn(1, 2, q_len, 64, generator=g, dtype=torch.float16)
    k, v = (torch.randn(1, 1, k_len, 64, generator=g, dtype=torch.float16) for _ in range(2))
    sparse_attention(q, k, v, config, last_chunk=last_chunk)


# (q_len, k_len, last_chunk): a whole prompt, a chunk in the middle, the last chunk; key blocks <= 16 (one NKB)
REPRESENTATIVES = [(1024, 1024, True), (256, 768, False), (256, 1024, True)]
OTHER_LENGTHS = [(700, 700, True), (961, 961, True), (130, 517, False), (333, 1000, False), (77, 990, True),
                 (200, 1001, True)]
NEXT_BUCKET = [(1500, 1500, True), (300, 1400, False), (129, 1100, True)]  # 17-24 key blocks: NKB 32


def as_on_cuda(mp: pytest.MonkeyPatch):
    """The kernels run where the package would run them on CUDA; here the interpreter stands in."""
    mp.setattr(selection, "fused_selection_supports", lambda q: None)
    mp.setattr(kernels, "triton_supports", lambda q, block_size: None)


@pytest.fixture(scope="module")
def keys():
    """Each shape's launches' keys, recorded once for the tests below."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        as_on_cuda(mp)
        for shape in REPRESENTATIVES + OTHER_LENGTHS + NEXT_BUCKET:
            with recorded_keys() as seen:
                run(*shape)
            out[shape] = seen
    return out


def union(keys, shapes):
    return set().union(*(keys[shape] for shape in shapes))


def test_new_lengths_and_offsets_compile_nothing_new(keys):
    known = union(keys, REPRESENTATIVES)
    assert {name for name, _ in known} >= {"_block_sparse_attention_kernel", "_row_stats_kernel",
                                           "_pooled_probs_kernel", "_pool_tokens_kernel"} | POLICY_KERNELS
    new = union(keys, OTHER_LENGTHS) - known
    assert not new, "kernel variants that follow the length: " + "; ".join(
        f"{name}: {[kv for kv in key if kv not in dict_keys(known, name)]}" for name, key in new)


def dict_keys(seen, name):
    return {kv for n, key in seen if n == name for kv in key}


def test_a_new_bucket_of_key_blocks_compiles_only_the_policy_kernels(keys):
    new = union(keys, NEXT_BUCKET) - union(keys, REPRESENTATIVES + OTHER_LENGTHS)
    assert {name for name, _ in new} == POLICY_KERNELS


# ---------------------------------------------------------------------------------------------
# warm_up: every variant a prompt up to max_len needs, compiled before the first request
# ---------------------------------------------------------------------------------------------

def test_warm_up_launches_every_variant_the_calls_up_to_max_len_need(keys, monkeypatch):
    """Rule: after `warm_up_kernels(..., max_len)`, no call over at most max_len keys (whole prompt, middle chunk,
    last chunk, any length or offset) launches a variant the warm-up did not (the first such launch is a compile)."""
    from sparse_prefill.attention import warm_up_kernels

    as_on_cuda(monkeypatch)
    with recorded_keys() as warmed:
        calls = warm_up_kernels(2, 1, 64, 1500, CONFIG, dtype=torch.float16, device="cpu")
    assert calls == 5  # the three kinds at 16 key blocks, a middle and a last chunk at 32 (1500 keys: 24 blocks)
    needed = union(keys, REPRESENTATIVES + OTHER_LENGTHS + NEXT_BUCKET)
    assert needed <= warmed, f"not warmed up: {sorted({name for name, _ in needed - warmed})}"


def test_warm_up_of_a_patched_model_covers_its_own_prefill(monkeypatch):
    """`sparse_prefill.warm_up(model)` reads the heads, head_dim, dtype, device and config from the patched model:
    the model's own whole-prompt and chunked prefill then launch nothing new."""
    from model_zoo import cache_kwargs, tiny_model
    from transformers import DynamicCache

    from sparse_prefill import patch_model, warm_up
    from sparse_prefill.patches import per_request

    as_on_cuda(monkeypatch)
    monkeypatch.setattr(per_request, "triton_supports", lambda q, block_size: None)
    model = tiny_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       num_hidden_layers=1).to(torch.float16)
    with pytest.raises(ValueError, match="patch_model"):
        warm_up(model)
    patch_model(model, CONFIG.replace(backend="auto"))
    with recorded_keys() as warmed:
        assert warm_up(model, max_len=1000) == 3  # one bucket: a whole prompt, a middle and a last chunk
    ids = torch.randint(3, 128, (1, 1000), generator=torch.Generator().manual_seed(0))
    with recorded_keys() as needed, torch.no_grad():
        model(ids[:, :900])
        cache = DynamicCache(config=model.config)
        model(ids[:, :600], **cache_kwargs(model, cache))
        model(ids[:, 600:], **cache_kwargs(model, cache))
    assert needed and needed <= warmed, "not warmed up: " + "; ".join(
        f"{name}: {[kv for kv in key if kv not in dict_keys(warmed, name)]}" for name, key in needed - warmed)


def test_warm_up_off_the_gpu_does_nothing():
    from model_zoo import tiny_model

    from sparse_prefill import patch_model, warm_up

    model = patch_model(tiny_model("llama"), CONFIG.replace(backend="auto"))
    assert warm_up(model, max_len=4096) == 0  # CPU: the PyTorch reference runs, nothing to compile


def test_warm_up_covers_the_context_yarn_extends_it_to():
    """A config that carries YaRN often keeps the trained length in max_position_embeddings: the warm-up goes to
    the length rope scaling reaches."""
    from transformers import Qwen2Config

    from sparse_prefill.patches.transformers_attention import context_length

    plain = Qwen2Config(max_position_embeddings=32768)
    yarn = Qwen2Config(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6})
    assert context_length(plain) == 32768 and context_length(yarn) == 131072


# ---------------------------------------------------------------------------------------------
# attention_dtype="fp8": the pre-pass and the FP8 kernel follow no length either, and the warm-up compiles them
# ---------------------------------------------------------------------------------------------

FP8_CONFIG = CONFIG.replace(attention_dtype="fp8")


def test_fp8_variants_follow_no_length_and_are_warmed_up(monkeypatch):
    as_on_cuda(monkeypatch)
    monkeypatch.setattr(kernels, "fp8_triton_supports", lambda q, block_size: None)
    seen = {}
    for shape in REPRESENTATIVES + OTHER_LENGTHS[:3]:
        with recorded_keys() as keys_of_shape:
            run(*shape, config=FP8_CONFIG)
        seen[shape] = keys_of_shape
    known = union(seen, REPRESENTATIVES)
    assert {name for name, _ in known} >= {"_block_sparse_attention_kernel", "_quantize_blocks_kernel"}
    assert ("FP8", True) in dict_keys(known, "_block_sparse_attention_kernel")
    new = union(seen, OTHER_LENGTHS[:3]) - known
    assert not new, "FP8 variants that follow the length: " + "; ".join(
        f"{name}: {[kv for kv in key if kv not in dict_keys(known, name)]}" for name, key in new)
    from sparse_prefill.attention import warm_up_kernels

    with recorded_keys() as warmed:
        warm_up_kernels(2, 1, 64, 1024, FP8_CONFIG, dtype=torch.float16, device="cpu")
    assert union(seen, REPRESENTATIVES + OTHER_LENGTHS[:3]) <= warmed
