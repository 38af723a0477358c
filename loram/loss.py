"""The training and evaluation loss: summed next-token cross-entropy over labelled tokens."""

from __future__ import annotations

import torch

from loram.data import collate


def batch_loss(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a collated batch and its number of scored tokens."""
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((labels != -100).sum())


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_size: int, pad_id: int) -> float:
    """Mean token-level cross-entropy over ``examples`` (labels != -100)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        lp, n = batch_loss(model, collate(examples[i : i + batch_size], pad_id), device)
        total += lp.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)
