"""Each run's output folder: a new OUT_ROOT/<command>/<YYYYmmdd-HHMMSS>/ by default, or --out.

An --out that already holds results of an earlier run is refused (before any work) unless --overwrite,
which removes only the files the commands write; other files in the folder are left alone.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from .options import OUT_ROOT, CommandError

# What the commands write into their folder: an --out that holds any of these holds results.
RESULT_FILES = ("results.jsonl", "summary.json", "density.json", "niah_heatmap.png", "density_heatmap.png",
                "accuracy_vs_speedup.png", "recall.json", "recall.png", "demo.json", "kept_blocks.png")


def _results_in(folder: Path) -> list[str]:
    return [name for name in RESULT_FILES if (folder / name).exists()]


def check_output(out: Path | None, command: str, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is a file or already holds results (unless `overwrite`)."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder.")
    held = _results_in(out) if out.is_dir() else []
    if held and not overwrite:
        raise CommandError(f"--out {out} already holds results of an earlier run ({', '.join(held)}). Pass "
                           f"--overwrite to replace them, another --out, or no --out for a new folder per run "
                           f"under {OUT_ROOT / command}/.")


def output_dir(out: Path | None, command: str, overwrite: bool = False) -> Path:
    """The run's folder, created: `out` (its earlier results removed when `overwrite`), or by default a new
    OUT_ROOT/<command>/<YYYYmmdd-HHMMSS>[-N]/ so that no run replaces another's."""
    check_output(out, command, overwrite)
    if out is not None:
        out = Path(out)
        for name in _results_in(out) if out.is_dir() else []:
            (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        folder = OUT_ROOT / command / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")
