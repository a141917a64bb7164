"""Evaluation: does sparse prefill keep dense's answers, and how much time does it save?

    tasks.py      seeded RULER-style prompts of an exact token length (haystack.py: offline text)
    runner.py     dense vs sparse on the same model and prompts: score, TTFT, memory, density
    recording.py  the layouts the sparse path chose, per layer and head (or forced, for timing)
    speed.py      attention-only and end-to-end prefill time against dense SDPA backends
    perplexity.py long-text perplexity, dense vs sparse
    plots.py      NIAH heatmap, accuracy vs speedup, density per layer x head
    models.py     pinned trained models (GGUF inside PyPI wheels) and the model loader
    archs.py      random-weight architectures and the embedded tiny default
    recall.py     captured attention mass vs density of selection policies, against an exact oracle
    synthetic.py  an attention problem with known structure (sink, local decay, needles) for the demo

The `sparse-prefill` command, in the order a run goes through it:
    options.py    every command's defaults (stated once) and the shared flag groups; no torch
    parsers.py    the subcommands' parsers, one block each; runs are named, imported only when run;
                  check_args: the user's mistakes, refused before torch is imported
    output.py     each run's output folder
    session.py    model, config, prompts and notes shared by the model-running commands
    commands.py   niah, ruler, ppl, speed, sweep, fetch-model; demo.py: the first command to run
    lm_harness.py lm-eval's `sparse_hf` model and tasks

Nothing here is imported by `sparse_prefill` itself: evaluation needs the `eval` extra.
"""
