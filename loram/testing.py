"""Tiny random models of several architectures, built in-process (tests, CI profile)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_llama(seed: int = 0, layers: int = 6, vocab: int = 128, tie: bool = False):
    """Llama with GQA: 8 query heads share 2 KV heads (head_dim 8), MLP 96, no biases."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        attention_bias=False,
    )
    return _build(LlamaForCausalLM, cfg, seed)


def tiny_qwen2(seed: int = 0, layers: int = 6, vocab: int = 128, tie: bool = True):
    """Qwen2 with q/k/v biases: 4 query heads over 2 KV heads (head_dim 16), MLP 80."""
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return _build(Qwen2ForCausalLM, cfg, seed)


def tiny_llama_mha(seed: int = 0, layers: int = 4, vocab: int = 128):
    """Llama without GQA (as many KV heads as query heads)."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return _build(LlamaForCausalLM, cfg, seed)


def _build(cls, cfg, seed: int):
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg)
    # Random init gives tiny weights; widen them so pruning differences are visible, and give
    # biases and norms non-trivial values so that every index matters in the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


TINY_BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "llama_mha": tiny_llama_mha}
