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
