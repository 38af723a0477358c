"""Perplexity of a model on instruction rows (response tokens only) or plain text."""

from __future__ import annotations

import math

from loram.data import encode_rows
from loram.loss import evaluate_loss


def perplexity(model, tokenizer, rows: list[dict], seq_len: int = 512, batch_size: int = 4) -> dict:
    """exp(mean cross-entropy) over the response tokens (instruction rows) or all tokens (text)."""
    examples = encode_rows(tokenizer, rows, seq_len)
    if not examples:
        raise ValueError("no row yields a scorable token (check seq_len and the data)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = evaluate_loss(model, examples, batch_size, pad)
    tokens = sum(sum(1 for v in e["labels"][1:] if v != -100) for e in examples)
    return {
        "ppl": round(math.exp(min(loss, 50.0)), 4),
        "loss": round(loss, 6),
        "rows": len(examples),
        "tokens": tokens,
    }
