"""Evaluation: does sparse prefill keep dense's answers, and how much time does it save?

    tasks.py      seeded RULER-style prompts of an exact token length (haystack.py: offline text)
    runner.py     dense vs sparse on the same model and prompts: score, TTFT, memory, density
    recording.py  the layouts the sparse path chose, per layer and head (or forced, for timing)
    speed.py      attention-only and end-to-end prefill time against dense SDPA backends
    perplexity.py long-text perplexity, dense vs sparse
    plots.py      NIAH heatmap, accuracy vs speedup, density per layer x head
    models.py     pinned trained models (GGUF inside PyPI wheels) and the model loader
    archs.py      random-weight architectures and the embedded tiny default
    commands.py   the `sparse-prefill` subcommands; lm_harness.py: lm-eval's `sparse_hf` and tasks

Nothing here is imported by `sparse_prefill` itself: evaluation needs the `eval` extra.
"""
