"""The `sparse-prefill` command: a demo, evaluation, speed and model-fetching subcommands.

    sparse-prefill demo | niah | ruler | ppl | speed | sweep | recall | fetch-model | lm-eval | serve

`demo` is the first command to run. The others run with no `--model` on the embedded tiny random-weight
model (a smoke run on a CPU). Their flags and defaults live in `sparse_prefill.eval.parsers` and
`eval.options`, their runs in `eval.commands`, `eval.recall` and `eval.demo`. Building the parser imports
neither torch nor transformers, so `--help` is instant. `serve` runs transformers serve with every model it
loads patched (`sparse_prefill.patches.serve`).

A user's mistake (a bad value, a model path that is not there, a GPU that is not there) ends the command with
one line, `sparse-prefill COMMAND: error: ...`, naming the problem and the fix, and exit status 2; what the
flags and the file system can tell is refused before torch and transformers are imported (`eval.parsers.check_args`).
A bug still ends with its traceback.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, the problem and where the flags are explained, instead of
    argparse's usage block above it (its subcommands' parsers are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sparse-prefill", description="Block-sparse prefill for transformers models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .eval.parsers import add_parsers

    add_parsers(subparsers)
    subparsers.add_parser("serve", add_help=False, help="transformers serve with every model it loads patched; "
                          "SparsePrefillConfig fields as flags (--gamma 0.9), the rest go to transformers serve")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # every argument after it belongs to lm_eval, untouched by our parser
        from .eval.lm_harness import main as lm_eval_main

        return lm_eval_main(argv[1:])
    if argv[:1] == ["serve"]:  # our config flags, then every other argument belongs to transformers serve
        from .patches.serve import main as serve_main

        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .eval.options import CommandError
    from .eval.parsers import check_args

    try:
        check_args(args)  # the user's mistakes, found before the command imports torch and transformers
        return args.func(args)
    except CommandError as err:  # a request we cannot carry out: its message, no traceback
        print(f"sparse-prefill {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
