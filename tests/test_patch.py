"""patch_model / unpatch_model on tiny random-weight models of each family we support."""

import copy

import pytest
import torch
from model_zoo import FAMILIES, cache_kwargs, cache_of, tiny_model

from sparse_prefill import SparsePrefillConfig, patch_model, unpatch_model
from sparse_prefill.patches import is_patched
from sparse_prefill.patches.transformers_attention import _CONFIGS

EXACT = SparsePrefillConfig(block_size=64, gamma=1.0, min_budget_tokens=0, min_seq_len=0)
TIGHT = SparsePrefillConfig(block_size=64, gamma=0.3, min_budget_tokens=0, min_seq_len=0, local_blocks=0,
                            exact_tail_tokens=0, question_blocks=0)  # short test prompts: keep rows sparse
PROMPT = torch.randint(3, 128, (1, 520), generator=torch.Generator().manual_seed(0))


def logits(model, ids=PROMPT, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_dense_and_unpatch_restores(family):
    model = tiny_model(family)
    dense = logits(model)
    assert patch_model(model, EXACT) is model and is_patched(model)
    exact = logits(model)
    assert torch.allclose(exact, dense, atol=2e-5, rtol=1e-5), (exact - dense).abs().max()
    patch_model(model, TIGHT)  # patching again only swaps the config
    tight = logits(model)
    assert torch.isfinite(tight).all()
    assert (tight - dense).abs().max() > 1e-3, "a tight budget should change the output"
    unpatch_model(model)
    assert not is_patched(model)
    assert torch.equal(logits(model), dense)


def test_a_patched_model_switched_to_eager_by_its_user_is_patched_afresh_when_patched_again():
    model = patch_model(tiny_model("llama"), TIGHT)
    sparse = logits(model)
    model.set_attn_implementation("eager")  # the user's choice after patching: plain eager, not sparse
    patch_model(model, TIGHT)
    assert model.config._attn_implementation == "sparse_prefill:eager"
    assert torch.allclose(logits(model), sparse, atol=1e-5)
    unpatch_model(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_and_decode_are_dense(family):
    model = tiny_model(family)
    with torch.no_grad():
        prefill = model(PROMPT, use_cache=True)
    next_token = prefill.logits[:, -1:].argmax(-1)
    want = logits(model, next_token, **cache_kwargs(model, copy.deepcopy(cache_of(prefill))))
    patch_model(model, TIGHT)
    got = logits(model, next_token, **cache_kwargs(model, copy.deepcopy(cache_of(prefill))))
    assert torch.equal(got, want), "a decode step must run the previous implementation unchanged"
    out = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, PROMPT.shape[1] + 4)
    unpatch_model(model)


def test_short_prompts_stay_dense_below_min_seq_len():
    model = tiny_model("llama")
    dense = logits(model)
    patch_model(model, TIGHT.replace(min_seq_len=4096))
    assert torch.equal(logits(model), dense)


def test_models_outside_the_attention_interface_are_refused():
    with pytest.raises(NotImplementedError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="SparsePrefillConfig"):
        patch_model(tiny_model("llama"), "gamma=0.9")


def test_a_config_may_be_a_dict_of_its_fields_and_bad_fields_are_named():
    model = patch_model(tiny_model("llama"), {"gamma": 0.9, "block_size": 64})
    assert _CONFIGS[model.model.layers[0].self_attn] == SparsePrefillConfig(gamma=0.9, block_size=64)
    with pytest.raises(ValueError, match="(?i)unknown SparsePrefillConfig field.*gama"):
        patch_model(tiny_model("llama"), {"gama": 0.9})


@pytest.mark.parametrize("proxy_heads", [3, 8])
def test_proxy_heads_that_fit_no_layer_are_refused_at_patch_time(proxy_heads):
    model = tiny_model("llama")  # 4 query heads over 2 KV heads: 3 and 8 proxies fit neither
    with pytest.raises(ValueError, match=f"proxy_heads.*LlamaAttention.*proxy_heads={proxy_heads}"):
        patch_model(model, SparsePrefillConfig(proxy_heads=proxy_heads))
    assert not is_patched(model)
    patch_model(model, SparsePrefillConfig(proxy_heads=4))  # 4 proxies: one per query head, fits
