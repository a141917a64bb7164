"""What every model-running command shares: the model, its config, the command's defaults, the output folder,
the prompts, and the table and notes printed last."""

from __future__ import annotations

from pathlib import Path

from .options import DEFAULTS, CommandError, command_config, runs_tiny
from .output import check_output, output_dir

RANDOM_NOTE = ("note: {name} has random weights, so it cannot retrieve needles (accuracy ~0 in both modes); "
                "this run checks the pipeline. Pass --model (a HF folder, a .gguf file or a pinned name, see "
                "`sparse-prefill fetch-model`) for real numbers.")
CPU_NOTE = ("note: on CPU the sparse path runs the plain-PyTorch reference and is several times slower than dense, "
             "so CPU runs check accuracy and density, not speed (speed needs a CUDA GPU).")
SUMMARY_COLUMNS = ("n", "accuracy", "lost", "density", "ttft_s", "speedup", "peak_gib")


class Session:
    """One run of a model-running command: everything that can be refused is checked before the model loads."""

    def __init__(self, args):
        import torch

        from .archs import is_random, resolve_model

        self.defaults = DEFAULTS[args.command]
        self.tiny = runs_tiny(args)
        self.config = command_config(args)
        check_output(args.out, args.command, args.overwrite)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        self.model, self.tokenizer, self.name = resolve_model(args.model, args.arch, dtype=dtype, device=args.device,
                                                                 yarn=getattr(args, "yarn", None))
        self.random = is_random(self.name)
        self.device = next(self.model.parameters()).device
        self._out, self._out_args = None, (args.out, args.command, args.overwrite)
        self.progress = not getattr(args, "no_progress", False)
        print(f"model: {self.name} on {self.device}, {next(self.model.parameters()).dtype}")
        print(f"config: {self.config}")

    @property
    def out(self) -> Path:
        """The run's folder, made on first use (so a run refused while building its examples leaves none)."""
        if self._out is None:
            self._out = output_dir(*self._out_args)
            print(f"output folder: {self._out}")
        return self._out

    def lengths(self, args, task: str | None = None) -> list[int]:
        """--lengths, else the command's default for this model kind (and task)."""
        return args.lengths or self.defaults.lengths_for(self.random, task)

    def seeds(self, args) -> list[int]:
        return list(range(args.seeds or self.defaults.seeds_for(self.random)))

    def fresh(self, name: str) -> Path:
        path = self.out / name
        path.unlink(missing_ok=True)
        return path

    def examples(self, args, tasks):
        """Every example of `tasks` at its lengths, --depths and seeds."""
        from .tasks import TaskDoesNotFit, make_examples

        chat = False if args.no_chat_template else None
        examples = []
        for task in tasks:
            try:
                examples += make_examples([task], self.tokenizer, self.lengths(args, task), args.depths,
                                          self.seeds(args), args.haystack, chat)
            except TaskDoesNotFit as err:
                raise CommandError(f"{err} Pass longer --lengths (this example needs {err.least_length} or more; "
                                   "leave --lengths out for the defaults, which fit every task).") from None
            except ValueError as err:
                raise CommandError(str(err)) from None
        return examples

    def density_outputs(self, rows) -> list[Path]:
        """density.json and density_heatmap.png of the sparse rows (none when the sparse path never ran)."""
        from .plots import plot_density_heatmap
        from .runner import write_density_json

        data = write_density_json(rows, self.out / "density.json", self.name)
        if data is None:
            print("note: the sparse path never ran (every prompt shorter than --min-seq-len?); no density recorded.")
            return []
        return [self.out / "density.json",
                plot_density_heatmap(data["layer_head"], self.out / "density_heatmap.png",
                                     f"{self.name}: density per layer x head")]

    def note_random(self) -> None:
        if self.random:
            print(RANDOM_NOTE.format(name=self.name) + " `sparse-prefill demo` is the first command to run.")

    def note_cpu(self) -> None:
        """Under a table of times: CPU times say nothing of the sparse path's speed."""
        if self.device.type == "cpu":
            print(CPU_NOTE)


def print_summary(rows, keys) -> list[dict]:
    from .runner import format_table, summarize

    summary = summarize(rows, keys)
    print(format_table(summary, [*keys, *SUMMARY_COLUMNS]))
    return summary


def print_written(paths) -> None:
    print("wrote: " + ", ".join(str(p) for p in paths))
