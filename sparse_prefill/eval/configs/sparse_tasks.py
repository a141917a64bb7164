"""lm-eval loads `!function sparse_tasks.X` from this folder; the tasks live in sparse_prefill.eval.lm_harness."""

from sparse_prefill.eval.lm_harness import (  # noqa: F401
    cwe,
    fwe,
    niah_multikey,
    niah_multiquery,
    niah_multivalue,
    niah_single,
    passkey,
    process_results,
    vt,
)
