"""The selection-quality harness: exact block mass, scoring, oracle, peer policies, capture, CLI."""

import json
import math

import pytest
import torch

from sparse_prefill import SparsePrefillConfig
from sparse_prefill.cli import build_parser
from sparse_prefill.eval import recall
from sparse_prefill.eval.options import RECALL_POLICIES
from sparse_prefill.eval.peer_policies import flexprefill_mask, xattention_mask
from sparse_prefill.layout import causal_block_limits


def qk(hq=4, hkv=2, n=512, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g)


def dense_probs(q, k):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = q.shape[2]
    return torch.softmax(s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf), -1)


def test_exact_block_mass_is_the_blockwise_mean_of_dense_attention(monkeypatch):
    monkeypatch.setattr(recall, "_ROWS_PER_CHUNK", 64)  # several chunks
    q, k = qk(n=300)
    got = recall.exact_block_mass(q, k, 64)
    p = torch.nn.functional.pad(dense_probs(q, k), (0, 20, 0, 20))  # 320 = 5 blocks
    expected = p.reshape(1, 4, 5, 64, 5, 64).sum(-1).sum(3) / torch.tensor([64, 64, 64, 64, 44.0])[:, None]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 4, 5))


def test_scores_of_dense_oracle_and_nothing():
    q, k = qk()
    mass = recall.exact_block_mass(q, k, 64)
    causal = torch.arange(8)[None] < causal_block_limits(8, 64, 512, 512)[:, None]
    captured, density = recall.score_mask(causal.expand(1, 4, 8, 8), mass, 512, 512, 64)
    torch.testing.assert_close(captured, torch.ones(1, 4))
    torch.testing.assert_close(density, torch.ones(1, 4))
    for g in (0.5, 0.9):
        oracle = recall.oracle_mask(mass, g)
        per_row = (mass * oracle).sum(-1)
        assert (per_row >= g - 1e-6).all()
        # one block fewer in any row drops that row below g: its smallest kept block is needed
        smallest = torch.where(oracle, mass, torch.full_like(mass, 2.0)).amin(-1)
        assert (per_row - smallest < g + 1e-6).all()
    captured, density = recall.score_mask(torch.zeros(1, 4, 8, 8, dtype=torch.bool), mass, 512, 512, 64)
    assert (captured == 0).all() and (density == 0).all()


def test_flexprefill_keeps_a_planted_column_and_diagonal():
    q, k = qk(hq=1, hkv=1, n=1024, d=16)
    topic = torch.randn(16)
    q[0, 0, -128:] += topic
    k[0, 0, 300] = 4 * topic  # every last query loves key 300
    mask = flexprefill_mask(q, k, SparsePrefillConfig(block_size=64, gamma=0.5))
    rows_after = torch.arange(16) >= 300 // 64
    assert mask[0, 0, rows_after, 300 // 64].all()
    assert mask[0, 0, torch.arange(16), torch.arange(16)].all()  # diagonal always


def test_xattention_finds_a_planted_block():
    q, k = qk(hq=1, hkv=1, n=1024, d=16)
    topic = torch.randn(16)
    q[0, 0, -64:] += topic  # the last queries all look for one topic, held by key block 10
    k[0, 0, 640:704] += 2 * topic
    mask = xattention_mask(q, k, SparsePrefillConfig(block_size=64, gamma=0.5))
    assert mask[0, 0, -1, 10]
    assert not mask[0, 0, -1, 3:9].any()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def test_capture_records_every_layer_and_leaves_the_model_unchanged():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 256))
    with torch.no_grad():
        before = model(ids).logits[:, -1]
    layers = recall.capture_queries_and_keys(model, ids, store_dtype=torch.float32)
    assert len(layers) == 2
    assert layers[0].q.shape == (1, 4, 256, 16) and layers[0].k.shape == (1, 2, 256, 16)
    assert layers[0].scale == pytest.approx(16 ** -0.5)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, -1], before)


def test_evaluate_layers_json_png_and_cli(tmp_path):
    model = tiny_llama()
    layers = recall.capture_queries_and_keys(model, torch.randint(0, 128, (1, 512)), store_dtype=torch.float32)
    cfg = SparsePrefillConfig(block_size=64, min_budget_tokens=0, stride=4)
    result = recall.evaluate_layers(layers, cfg, gammas=(0.5, 0.9), log=lambda _: None)
    assert list(result["policies"]) == list(RECALL_POLICIES) == list(recall.POLICIES)
    for policy, points in result["policies"].items():
        for point in points:
            assert 0 < point["density"] <= 1 and 0 < point["captured_mass"] <= 1 + 1e-6
            assert len(point["per_layer"]["density"]) == 2 and len(point["per_head"]["density"][0]) == 4
            if policy == "oracle":
                assert point["min_head_captured_mass"] >= point["gamma"] - 1e-6
    dense = [p["density"] for p in result["policies"]["oracle"]]
    assert dense[0] < dense[1]  # a higher g needs more blocks
    json.dumps(result)
    recall.plot_recall(result, tmp_path / "recall.png")
    assert (tmp_path / "recall.png").stat().st_size > 10_000
    table = recall.summary_table(result, target=0.9)
    assert "oracle" in table and "x the oracle's density at g=0.9" in table
    points = [{"density": 0.2, "captured_mass": 0.8}, {"density": 0.4, "captured_mass": 1.0}]
    assert recall.density_at_mass(points, 0.9) == pytest.approx(0.3)
    assert recall.density_at_mass(points[:1], 0.9) is None

    args = build_parser().parse_args(["recall", "--model", "m.gguf", "--tokens", "4096", "--policies", "ours,oracle"])
    assert args.func.target == "recall.run_cli" and args.tokens == 4096 and args.policies == ["ours", "oracle"]


def test_recall_cli_config_and_output_folder_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from sparse_prefill.cli import main
    from sparse_prefill.eval import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    gguf = tmp_path / "m.gguf"  # a path that exists: the model check comes first
    gguf.write_bytes(b"")
    (tmp_path / "recall.json").write_text("{}")
    assert main(["recall", "--model", str(gguf), "--out", str(tmp_path)]) == 2
    assert "already holds results of an earlier run (recall.json)" in capsys.readouterr().err
    assert main(["recall", "--model", str(gguf), "--proxy-heads", "qq", "--out", str(tmp_path / "new")]) == 2
    assert "proxy_heads='qq'" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_recall_cli_builds_its_config_with_the_shared_parser(tmp_path, monkeypatch, capsys):
    from sparse_prefill.cli import main

    seen = {}

    def stop(layers, config, gammas, policies, device=None):
        seen.update(config=config, gammas=gammas, policies=policies)
        raise KeyboardInterrupt  # enough: the config is what this test checks

    monkeypatch.setattr(recall, "evaluate_layers", stop)
    monkeypatch.setattr("sparse_prefill.eval.models.load_model", lambda *a, **k: (tiny_llama(), WordTokenizer()))
    monkeypatch.setattr(recall, "passkey_prompt", lambda tokenizer, n, depth: torch.randint(0, 128, (1, 256)))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(KeyboardInterrupt):
        main(["recall", "--model", str(gguf), "--proxy-heads", "q", "--stride", "16", "--block-size", "64",
              "--gammas", "0.5,0.9", "--policies", "ours", "--out", str(tmp_path / "out")])
    assert seen["config"] == SparsePrefillConfig(proxy_heads="q", stride=16, block_size=64, min_seq_len=0)
    assert seen["gammas"] == (0.5, 0.9) and seen["policies"] == ("ours",)


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    chat_template = None

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[int(i)] for i in ids)


def test_passkey_prompt_fits_and_holds_the_needle():
    tok = WordTokenizer()
    ids = recall.passkey_prompt(tok, 2000, depth=0.5, key=4242)
    assert 1900 <= ids.shape[1] <= 2000
    text = tok.decode(ids[0])
    assert "4242." in text and text.rstrip().endswith("only.")
    assert 0.3 < text.index("4242") / len(text) < 0.7
