"""Tiny random-weight decoder models of the families we patch, built from configs (nothing downloaded)."""

import inspect
from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=8192)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4096}),
}


# Gemma 2 caps its attention logits (softcap), which sdpa cannot do: transformers runs it eagerly.
DEFAULT_ATTENTION = {"gemma2": "eager"}


def tiny_model(family: str, seed: int = 0, attn_implementation: str | None = None, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    attn_implementation = attn_implementation or DEFAULT_ATTENTION.get(family, "sdpa")
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # larger q/k weights: sharper, less uniform attention than the init gives
        for name, p in model.named_parameters():
            if any(t in name for t in ("q_proj", "k_proj", "qkv_proj")):
                p.mul_(4.0)
    return model


def char_tokenizer():
    """A character-level tokenizer over printable ASCII (98 ids: <unk>, <s>, </s>, then the characters), so a
    tiny model can be served and prompted with text. Built in memory: nothing downloaded."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return fast


def save_tiny_checkpoint(path, family: str = "llama", **overrides) -> str:
    """A tiny random-weight model and the character tokenizer saved as a Hugging Face folder (for servers)."""
    model = tiny_model(family, **{"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, **overrides})
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def cache_kwargs(model, cache) -> dict:
    """A forward's KV-cache argument: transformers 5.2x renamed `past_key_values` to `cache`; accept both."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def cache_of(outputs):
    """The KV cache a forward returned, under either name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


def load_script(path):
    """A script of bench/ imported as a module (bench/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
