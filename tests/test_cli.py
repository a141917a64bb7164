"""`sparse-prefill` commands, run end to end on the embedded tiny model (CPU, seconds each)."""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_prefill.cli import build_parser, main
from sparse_prefill.config import SparsePrefillConfig
from sparse_prefill.eval import options, output
from sparse_prefill.eval.options import DEFAULTS, parse_lengths

FAST = ["--min-budget-tokens", "64", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]
CPU_NOTE = "note: on CPU the sparse path runs the plain-PyTorch reference and is several times slower than dense"


def test_help_lists_every_command(capsys):
    build_parser().print_help()
    out = capsys.readouterr().out
    for command in ("demo", "niah", "ruler", "ppl", "speed", "sweep", "recall", "fetch-model", "lm-eval"):
        assert command in out
    assert main([]) == 0


def test_building_the_parser_imports_neither_torch_nor_transformers():
    code = ("import sys; from sparse_prefill.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    code = ("import sys; from sparse_prefill.cli import main\n"
            "for command in ('niah', 'demo', 'recall'):\n    try:\n        main([command, '--help'])\n"
            "    except SystemExit as exit:\n        assert exit.code == 0\n"
            "print(*(m in sys.modules for m in ('torch', 'transformers', 'matplotlib')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "--proxy-heads" in run.stdout and "--fetch" in run.stdout and "captured softmax mass" in run.stdout
    assert run.stdout.split()[-3:] == ["False", "False", "False"]


def test_every_command_takes_the_config_flags():
    parser = build_parser()
    for command in (["niah"], ["ruler"], ["ppl"], ["speed"], ["sweep"], ["recall", "--model", "m.gguf"]):
        args = parser.parse_args([*command, "--proxy-heads", "q", "--stride", "16", "--min-budget-tokens", "1024"])
        config = options.config_from_args(args)
        assert (config.proxy_heads, config.stride, config.min_budget_tokens) == ("q", 16, 1024), command


def test_proxy_heads_on_the_command_line_reaches_the_config(tmp_path, monkeypatch, capsys):
    from sparse_prefill.eval import perplexity

    used = []
    monkeypatch.setattr(perplexity, "perplexity_rows", lambda model, ids, config: used.append(config) or [])
    assert main(["ppl", "--proxy-heads", "q", "--gamma", "0.9", "--min-seq-len", "auto", "--lengths", "256",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    (config,) = used
    assert (config.proxy_heads, config.gamma, config.min_seq_len) == ("q", 0.9, None)
    assert (config.block_size, config.min_budget_tokens) == (64, 256)  # the tiny model's preset underneath
    assert "proxy_heads='q'" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--proxy-heads", "x"), ("--block-size", "96"), ("--gamma", "high")])
def test_a_bad_config_flag_is_a_clear_error_before_the_model_loads(tmp_path, monkeypatch, capsys, flag, value):
    from sparse_prefill.eval import archs

    monkeypatch.setattr(archs, "resolve_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["niah", flag, value, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-prefill niah: error: ") and flag[2:].replace("-", "_") in err and value in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_lengths_accept_k_suffixes():
    assert parse_lengths("4k, 8192,0.5k") == [4096, 8192, 512]


def test_niah_writes_results_summary_heatmaps_and_density(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text("stale line from an earlier run\n")
    (tmp_path / "accuracy_vs_speedup.png").write_text("a picture of another command's run")
    assert main(["niah", "--lengths", "384", "--depths", "0,1", "--out", str(tmp_path), "--overwrite", *FAST]) == 0
    out = capsys.readouterr().out
    assert "sparse-prefill-tiny (random weights)" in out and "random weights" in out.splitlines()[-1]
    assert f"output folder: {tmp_path}" in out and out.count(CPU_NOTE) == 1
    assert not (tmp_path / "accuracy_vs_speedup.png").exists()  # --overwrite cleared the earlier results
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and {r["mode"] for r in rows} == {"dense", "sparse"}  # stale line gone
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(s["length"], s["mode"]) for s in summary} == {(n, m) for n in (384,) for m in ("dense", "sparse")}
    for name in ("niah_heatmap.png", "density_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 2000
    assert len(json.loads((tmp_path / "density.json").read_text())["layers"]) == 2


def test_niah_multikey_runs_at_its_default_lengths(tmp_path, capsys):
    assert main(["niah", "--task", "niah_multikey", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"niah_multikey"} and {r["length"] for r in rows} == {768, 1024, 2048}
    assert len(rows) == 3 * 5 * 2  # lengths x the 5 default depths x dense and sparse


def test_ruler_runs_every_task_at_its_default_lengths(tmp_path, capsys):
    assert main(["ruler", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    lengths = {task: sorted({r["length"] for r in rows if r["task"] == task}) for task in options.TINY_MIN_LENGTH}
    assert set(lengths) <= {r["task"] for r in rows} and len({r["task"] for r in rows}) == 8
    assert all(found == [768, 1024] for found in lengths.values()), lengths
    assert {r["length"] for r in rows if r["task"] == "passkey"} == {512, 1024}
    assert capsys.readouterr().out.count(CPU_NOTE) == 1


def test_the_tiny_default_lengths_fit_every_task():
    from sparse_prefill.eval.archs import byte_tokenizer
    from sparse_prefill.eval.tasks import TASKS, make_example

    tok = byte_tokenizer()
    for task in TASKS:
        shortest = max(512, options.TINY_MIN_LENGTH.get(task, 0))
        for seed in range(5):
            for haystack in ("noise", "prose"):
                assert len(make_example(task, tok, shortest, 0.5, seed, haystack).input_ids) == shortest


def test_a_length_too_short_for_a_task_names_it_and_says_what_to_do(tmp_path, capsys):
    assert main(["niah", "--task", "niah_multikey", "--lengths", "512", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "niah_multikey" in err and "length=512" in err and "needs at least 567 tokens" in err
    assert "longer --lengths" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # no folder for a run that never started


def test_ruler_runs_the_asked_tasks(tmp_path, capsys):
    assert main(["ruler", "--tasks", "vt,cwe", "--lengths", "560", "--out", str(tmp_path), *FAST]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in rows}) == ["cwe", "vt"] and len(rows) == 4
    assert "cwe" in capsys.readouterr().out


def test_ppl_reports_dense_and_sparse_perplexity(tmp_path, capsys):
    assert main(["ppl", "--lengths", "256", "--out", str(tmp_path), *FAST]) == 0
    assert capsys.readouterr().out.count(CPU_NOTE) == 1
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["dense", "sparse"]
    # random weights over a 272-token vocabulary: perplexity near the vocabulary size, finite in both modes
    assert all(50 < r["ppl"] < 1000 for r in rows) and rows[1]["density"] is not None
    assert rows[0]["length"] == 256


def test_speed_times_attention_and_end_to_end_with_forced_density(tmp_path, capsys):
    assert main(["speed", "--lengths", "256", "--repeats", "1", "--densities", "0.5", "--out", str(tmp_path),
                 *FAST]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    variants = [(r["what"], r["variant"]) for r in rows]
    assert variants == [("attention", "dense sdpa"), ("attention", "sparse select"), ("attention", "sparse kernel"),
                        ("attention", "sparse total"), ("end-to-end", "dense sdpa"), ("end-to-end", "sparse")]
    e2e = rows[-1]
    assert e2e["note"] == "forced densities" and e2e["sparse_layers"] == 2 and e2e["density"] < 0.9
    assert isinstance(e2e["top1_match"], bool) and -1 <= e2e["logit_cosine"] <= 1.0001


def test_dense_backends_can_be_narrowed_and_reject_unknown_names():
    from sparse_prefill.eval.speed import dense_backends

    assert dense_backends(torch.device("cpu"), ["cudnn"]) == {"sdpa": None}  # the CPU has one dense path
    with pytest.raises(ValueError, match="cudnn"):
        dense_backends(torch.device("cpu"), ["cudnn", "fa3"])


def test_sweep_writes_the_accuracy_vs_speedup_curve(tmp_path, capsys):
    assert main(["sweep", "--gammas", "0.5,1.0", "--lengths", "384", "--depths", "0.5", "--out", str(tmp_path),
                 *FAST]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["gamma"] for p in summary["sparse"]] == [0.5, 1.0]
    assert summary["sparse"][0]["density"] < summary["sparse"][1]["density"] == pytest.approx(1.0)
    assert (tmp_path / "accuracy_vs_speedup.png").stat().st_size > 2000


def test_each_run_gets_its_own_folder_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(output.time, "strftime", lambda fmt, *t: "20250102-030405")  # two runs, one second
    printed = []
    for _ in range(2):
        assert main(["ppl", "--lengths", "256", *FAST]) == 0
        printed += re.findall(r"^output folder: (.+)$", capsys.readouterr().out, re.M)
    assert printed == [str(Path("sparse_prefill_out", "ppl", name)) for name in ("20250102-030405",
                                                                               "20250102-030405-2")]
    for folder in printed:
        assert len((tmp_path / folder / "results.jsonl").read_text().splitlines()) == 2


def test_an_out_folder_holding_results_is_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    from sparse_prefill.eval import archs

    assert main(["ppl", "--lengths", "256", "--out", str(tmp_path), *FAST]) == 0
    results = (tmp_path / "results.jsonl").read_text()
    (tmp_path / "notes.txt").write_text("mine")
    real = archs.resolve_model
    monkeypatch.setattr(archs, "resolve_model", lambda *a, **k: pytest.fail("loaded the model"))
    capsys.readouterr()
    assert main(["ppl", "--lengths", "384", "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} already holds results" in err and "results.jsonl" in err and "--overwrite" in err
    assert (tmp_path / "results.jsonl").read_text() == results
    monkeypatch.setattr(archs, "resolve_model", real)
    assert main(["ppl", "--lengths", "384", "--out", str(tmp_path), "--overwrite", *FAST]) == 0
    assert {json.loads(line)["length"] for line in (tmp_path / "results.jsonl").read_text().splitlines()} == {384}
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only sparse-prefill's own results are replaced


def test_fetch_model_lists_the_pins(capsys):
    assert main(["fetch-model"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "qwen2.5-coder-1.5b-instruct" in out


# ---------------------------------------------------------------- a user's mistake: one line, exit 2

def _one_line_error(capsys, command: str) -> str:
    """The error `sparse-prefill COMMAND` printed: exactly one line, the command's, and no traceback."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"sparse-prefill {command}: error: "), err
    return err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail a test that gets as far as loading a model (or running the demo) instead of refusing first."""
    from sparse_prefill.eval import archs, demo, models

    for module, name in ((archs, "resolve_model"), (models, "load_model"), (demo, "synthetic_demo"),
                         (demo, "model_demo"), (models, "fetch_model")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("went on after a mistake"))


@pytest.mark.parametrize("command", ["niah", "demo", "ppl", "recall"])
@pytest.mark.parametrize("kind", ["missing", "folder without config.json", "not a .gguf file"])
def test_a_bad_model_path_is_one_line_naming_what_to_pass(tmp_path, capsys, no_model_loads, command, kind):
    path = {"missing": tmp_path / "nosuchmodel", "folder without config.json": tmp_path,
            "not a .gguf file": tmp_path / "weights.bin"}[kind]
    if kind == "not a .gguf file":
        path.write_bytes(b"weights")
    assert main([command, "--model", str(path)]) == 2
    err = _one_line_error(capsys, command)
    assert f"--model {path} " in err and "a .gguf file, nor a pinned model name" in err and "pass one" in err


def test_fetching_an_unknown_model_is_one_line_naming_the_pins(capsys, no_model_loads):
    assert main(["fetch-model", "nosuchmodel"]) == 2
    err = _one_line_error(capsys, "fetch-model")
    assert "'nosuchmodel'" in err and "smollm2-135m-instruct" in err


@pytest.mark.parametrize("argv, expected", [
    (["niah", "--model", "x", "--arch", "llama-3.1-8b"], "either --model"),
    (["niah", "--arch", "gpt-5"], "Unknown --arch 'gpt-5'; choose one of: "),
    (["niah", "--device", "gpu"], "--device gpu is no device torch knows; pass cuda, cuda:N or cpu"),
])
def test_a_bad_choice_is_one_line_before_anything_runs(tmp_path, capsys, no_model_loads, argv, expected):
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 2
    assert expected in _one_line_error(capsys, argv[0])


@pytest.mark.parametrize("command", ["demo", "niah"])
def test_a_gpu_asked_for_that_is_not_there_is_refused(tmp_path, monkeypatch, capsys, no_model_loads, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([command, "--device", "cuda", "--no-progress", "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys, command)
    assert "--device cuda: torch sees no CUDA GPU" in err and "--device cpu" in err


@pytest.mark.parametrize("argv, expected", [
    (["niah", "--lengths", "4kk"], "argument --lengths: '4kk' is not a length in tokens; write e.g. 4k,8192"),
    (["niah", "--lengths", "1k,0"], "'0' is not a length in tokens"),
    (["sweep", "--gammas", "0.5,x"], "argument --gammas: 'x' is not a number; write e.g. 0.5,0.9"),
    (["ruler", "--tasks", "vt,nope"], "argument --tasks: 'nope' is not one of niah_single, "),
    (["recall", "--model", "m.gguf", "--layers", "0,a"], "argument --layers: 'a' is not an integer"),
    (["recall", "--model", "m.gguf", "--policies", "ours,best"], "'best' is not one of ours, oracle, "),
    (["niah", "--task", "nope"], "argument --task: invalid choice: 'nope'"),
])
def test_a_value_argparse_refuses_is_one_line_naming_it(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = _one_line_error(capsys, argv[0])
    assert expected in err and f"(see `sparse-prefill {argv[0]} --help`)" in err


def test_mistakes_are_refused_before_torch_or_transformers_is_imported():
    """Refusing a bad --gamma, --model or --lengths takes a fraction of a second, not the seconds of the imports.
    (A --stride of 128 is refused only on the tiny default model, whose preset has blocks of 64.)"""
    code = ("import sys; from sparse_prefill.cli import main\n"
            "codes = [main(['niah', '--gamma', '2']), main(['ppl', '--model', '/nonexistent/model']),\n"
            "         main(['fetch-model', 'nosuchmodel']), main(['speed', '--stride', '128'])]\n"
            "try:\n    main(['niah', '--lengths', '4kk'])\nexcept SystemExit as exit:\n    codes.append(exit.code)\n"
            "print(*codes, *(m in sys.modules for m in ('torch', 'transformers')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["2", "2", "2", "2", "2", "False", "False"]
    assert len(run.stderr.splitlines()) == 5 and "SparsePrefillConfig.gamma=2.0 is not allowed" in run.stderr
    assert "stride must be an int >= 1 that divides block_size=64" in run.stderr


# ---------------------------------------------------------------- help and version

def test_version_prints_the_package_version(capsys):
    import sparse_prefill

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"sparse-prefill {sparse_prefill.__version__}\n"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices


def test_every_command_and_every_flag_says_what_it_is():
    """Each command has a line in `sparse-prefill --help` and a description on its own page; each of its flags a
    help that says more than its default."""
    (listing,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {action.dest for action in listing._choices_actions} == set(_subparsers())
    assert all(action.help for action in listing._choices_actions)
    for name, parser in _subparsers().items():
        if name == "serve":  # its page is its own (patches/serve.py, tested below)
            continue
        assert parser.description, name
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help and not action.help.startswith("default"), (name, action.option_strings)


def _without_spaces(text: str) -> str:
    return "".join(text.split())  # argparse wraps help lines, also after a hyphen


def test_the_config_flags_help_is_the_config_fields_own():
    """The flags' help comes from SparsePrefillConfig's field metadata: change a field's meaning there and every
    command's help follows."""
    text = _without_spaces(_help_of("niah"))
    for field in dataclasses.fields(SparsePrefillConfig):
        assert _without_spaces(field.metadata["meaning"]) in text, field.name
        assert f"--{field.name.replace('_', '-')}{field.metadata['metavar']}" in text


@pytest.fixture
def serve_glue():
    serve = pytest.importorskip("sparse_prefill.patches.serve")
    try:
        serve.check_version()
    except RuntimeError as err:
        pytest.skip(str(err))
    return serve


def test_serve_help_states_the_meaning_and_default_of_our_flags(serve_glue, capsys):
    with pytest.raises(SystemExit) as exit:  # transformers serve's own help follows ours
        main(["serve", "--help"])
    assert exit.value.code == 0
    text = _without_spaces(capsys.readouterr().out)
    for field in dataclasses.fields(SparsePrefillConfig):
        default = "auto" if field.default is None else field.default
        flag = f"--{field.name.replace('_', '-')}{field.metadata['metavar']}"
        assert _without_spaces(f"{field.metadata['meaning']} (default {default})") in text and flag in text
    assert "--warm-upTOKENScompilethekernels" in text and text.index("--gammaG") < text.index("force_model")


def test_serve_refuses_a_model_that_is_neither_a_path_nor_a_hub_repo_id(serve_glue, tmp_path, capsys):
    assert main(["serve", "/nonexistent/model", "--gamma", "0.9", "--port", "9"]) == 2
    err = _one_line_error(capsys, "serve")
    assert "MODEL /nonexistent/model does not exist" in err and "owner/name" in err
    for model in (None, str(tmp_path), "owner/name", "owner/name@v1", "owner/name:weights.gguf", "gpt2"):
        serve_glue.check_model(model)  # a path that exists, or what the Hub could hold: left to transformers serve
    for model in ("/nonexistent/model", "models/a/b", "~/model", str(tmp_path / "missing.gguf")):
        with pytest.raises(ValueError, match="no Hub repo id"):
            serve_glue.check_model(model)


def test_serve_refuses_a_bad_warm_up_in_one_line(serve_glue, capsys):
    assert main(["serve", "owner/name", "--warm-up", "soon"]) == 2
    assert "--warm-up" in _one_line_error(capsys, "serve")


def test_lm_eval_help_tells_of_sparse_hf_and_its_model_args_first(capsys):
    pytest.importorskip("lm_eval")
    with pytest.raises(SystemExit) as exit:
        main(["lm-eval", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    ours = out[:out.index("usage: lm-eval")]  # lm-eval's own help follows ours
    assert "--model sparse_hf" in ours and "sparse=False" in ours and "max_length" in ours
    assert all(field.name in ours for field in dataclasses.fields(SparsePrefillConfig))
    assert "sparse_ruler" in ours and "sparse_passkey" in ours


def test_the_demo_says_why_its_config_is_not_the_librarys(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--out", str(tmp_path)]) == 0  # the synthetic problem, 4K tokens
    out = capsys.readouterr().out
    config, note = out.splitlines()[1:3]
    assert config.startswith("config: SparsePrefillConfig(block_size=64,")
    assert note.startswith("note: the library's default config except block_size 64 (library 128), "
                           "min_budget_tokens 256 (library 1024), exact_tail_tokens 64 (library 256), "
                           "question_blocks 2 (library 8): scaled down for a 4k-token prompt")
    assert "min_seq_len 0 (library auto: 12288), so that the sparse path runs at every length" in note


def test_the_demos_note_follows_its_config():
    from sparse_prefill.eval.demo import config_note

    demo = DEFAULTS["demo"]
    long = config_note(SparsePrefillConfig(min_seq_len=0), 32 * 1024, demo)  # the GPU demo's: 32K tokens
    assert "block_size" not in long and "scaled" not in long and "min_seq_len 0 (library auto" in long
    assert config_note(SparsePrefillConfig(), 32 * 1024, demo) == "note: the library's default config."
    synthetic = config_note(SparsePrefillConfig(block_size=64), 8 * 1024, demo)
    assert "block_size 64 (library 128): the synthetic problem's budgets at every length" in synthetic


def _help_of(command: str) -> str:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return " ".join(subparsers.choices[command].format_help().split())


class _Stop(Exception):
    """Raised by a stand-in once it has seen what the run would do."""


def test_each_commands_defaults_are_stated_once(tmp_path, monkeypatch):
    """Rule: a command's defaults live in options.DEFAULTS only. Change them there, and the help text and the
    run both follow (lengths and seeds per model kind, depths)."""
    from sparse_prefill.eval import perplexity, runner

    seen = {}

    def record(model, tokenizer, examples, config, **kwargs):
        seen.update(lengths=sorted({e.length for e in examples}), depths=sorted({e.depth for e in examples}),
                    n=len(examples))
        raise _Stop

    monkeypatch.setattr(runner, "run_examples", record)
    monkeypatch.setattr(perplexity, "perplexity_rows", lambda model, ids, config: seen.setdefault("ppl", []).append(
        len(ids)) or [])
    for command in ("niah", "sweep", "ppl"):
        changed = dataclasses.replace(DEFAULTS[command], tiny_lengths=(384, 448), lengths=(5 * 1024,),
                                      depths=(0.25, 0.75), tiny_seeds=2)
        monkeypatch.setitem(DEFAULTS, command, changed)
        text = _help_of(command)
        assert "384,448" in text and "5k" in text, command
        if command != "ppl":
            assert "(default 0.25,0.75)" in text and "(default 2 on the tiny model" in text
            with pytest.raises(_Stop):
                main([command, "--no-progress", "--out", str(tmp_path / command)])
            assert seen == {"lengths": [384, 448], "depths": [0.25, 0.75], "n": 2 * 2 * 2}, command
        else:
            assert main([command, "--no-progress", "--out", str(tmp_path / command)]) == 0
            assert seen["ppl"] == [384, 448]


def test_help_states_the_library_and_command_defaults():
    text = _help_of("niah")
    assert "(library default 0.95)" in text and "(library default 128)" in text  # SparsePrefillConfig's own
    assert "(default 0 here" in text and "block-size 64, min-budget-tokens 256" in text  # commands' and tiny preset
    assert "from 768 for niah_multikey" in text
    recall = _help_of("recall")
    assert "(default 8192)" in recall and "(default 0.8,0.85,0.9,0.93,0.95,0.97,0.99)" in recall


def test_recall_flags_parse_to_typed_values():
    args = build_parser().parse_args(["recall", "--model", "m", "--gammas", "0.5, 0.9", "--policies", "ours, oracle",
                                      "--layers", "0,3"])
    assert (args.gammas, args.policies, args.layers) == ([0.5, 0.9], ["ours", "oracle"], [0, 3])
    assert args.func.target == "recall.run_cli" and build_parser().parse_args(["demo"]).func.target == "demo.run_demo"
