"""Perplexity of a model on instruction rows (response tokens only) or plain text, with
per-document losses for a bootstrap interval over documents."""

from __future__ import annotations

import math

import torch

from loram.data import collate, encode_rows


@torch.no_grad()
def document_losses(model, examples: list[dict], batch_size: int, pad_id: int) -> list[tuple]:
    """(summed next-token cross-entropy, scored tokens) of each example (labels != -100)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        for row_nll, row_labels in zip(nll, labels):
            out.append((float(row_nll.sum()), int((row_labels != -100).sum())))
    model.train(was_training)
    return out


def perplexity(model, tokenizer, rows: list[dict], seq_len: int = 512, batch_size: int = 4) -> dict:
    """exp(mean cross-entropy) over the response tokens (instruction rows) or all tokens (text),
    a 95% bootstrap interval over documents, and the per-document (nll, tokens)."""
    from loram.evaluate.stats import bootstrap_ppl

    examples = encode_rows(tokenizer, rows, seq_len)
    if not examples:
        raise ValueError("no row yields a scorable token (check seq_len and the data)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    docs = [d for d in document_losses(model, examples, batch_size, pad) if d[1] > 0]
    nll = sum(d[0] for d in docs)
    tokens = sum(d[1] for d in docs)
    loss = nll / max(tokens, 1)
    ci = bootstrap_ppl([d[0] for d in docs], [d[1] for d in docs])
    return {
        "ppl": round(math.exp(min(loss, 50.0)), 4),
        "ppl_ci95_low": round(ci.ci_low, 4),
        "ppl_ci95_high": round(ci.ci_high, 4),
        "loss": round(loss, 6),
        "rows": len(examples),
        "tokens": tokens,
        "documents": [[round(a, 6), b] for a, b in docs],
    }
