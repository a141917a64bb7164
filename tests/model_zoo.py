"""Tiny random-weight decoder models of the families we patch, built from configs (nothing downloaded)."""

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
