"""Shared test setup: CPU only, Triton kernels through the interpreter."""

import os

import pytest
import torch

# Must be set before any @triton.jit function is defined; without a GPU the kernels run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def no_recorder_outlives_its_test():
    """A `log_prefills` a test starts (the serve loader's, run in-process) must not record the next tests' calls."""
    from sparse_prefill import stats

    yield
    for recorder in list(stats.RECORDERS):
        stats.stop_logging(recorder)


@pytest.fixture
def poisoned_kernel_outputs(monkeypatch):
    """Fill the Triton attention kernel's output and lse buffers with NaN, so elements it forgets to write fail."""
    from sparse_prefill.kernels import triton_attention

    allocate = triton_attention._allocate_outputs

    def poisoned(q, return_lse):
        out, lse = allocate(q, return_lse)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        return out, lse

    monkeypatch.setattr(triton_attention, "_allocate_outputs", poisoned)
