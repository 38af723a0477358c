"""Tiny seeded random models (Llama GQA, Llama MHA, Qwen2) with a byte-level tokenizer: the
base models of the CI profile and smoke runs (``base.model: tiny-llama``), and the test fixtures."""

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


# --------------------------------------------------------------------------------------------
# Tiny "pretrained" models: a tiny random model plus a real byte-level tokenizer (CI profile)

TINY_SPECIALS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
"""Special tokens after the 256 byte tokens: BOS, padding and the ChatML turn markers (EOS)."""

TINY_VOCAB = 320
"""Embedding rows of the tiny pretrained models: 256 bytes + specials, rounded up."""

TINY_MAX_POSITIONS = 1024
"""Context length of the tiny pretrained models (lm-eval few-shot prompts are long in bytes)."""

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(max_length: int = TINY_MAX_POSITIONS):
    """A lossless byte-level tokenizer: one token per UTF-8 byte, ChatML specials, chat template.

    A BPE model without merges over the 256 byte-level symbols (GPT-2's byte-to-unicode map),
    so any text encodes and decodes back exactly; ids 0-255 are bytes, then ``TINY_SPECIALS``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in TINY_SPECIALS])
    bos, pad, _, eos = TINY_SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _byte_of_symbol(symbol: str) -> int:
    """The byte that GPT-2's byte-level alphabet maps to ``symbol`` (orders ids as bytes)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    ]
    code = ord(symbol)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_pretrained(name: str, seed: int = 0):
    """``(model, tokenizer)`` for ``tiny-llama`` / ``tiny-qwen2``: seeded random weights, byte tokenizer.

    The model's vocabulary (``TINY_VOCAB``) covers the tokenizer's 260 ids; its context is
    ``TINY_MAX_POSITIONS`` tokens; BOS / EOS / PAD ids are set on the config and the generation
    config so generation stops at ``<|im_end|>``.
    """
    builders = {"tiny-llama": tiny_llama, "tiny-qwen2": tiny_qwen2}
    if name not in builders:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {', '.join(builders)}")
    tok = tiny_tokenizer()
    if len(tok) > TINY_VOCAB:
        raise AssertionError(f"tokenizer has {len(tok)} ids, more than the {TINY_VOCAB} embeddings")
    model = builders[name](seed=seed, vocab=TINY_VOCAB)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    for cfg in (model.config, model.generation_config):
        for key, value in ids.items():
            setattr(cfg, key, value)
    model.config.max_position_embeddings = TINY_MAX_POSITIONS
    model.config._name_or_path = name
    return model, tok
