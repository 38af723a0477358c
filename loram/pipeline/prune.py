"""Stage ``prune`` (offline): W0 -> W0^P, with a manifest of what was removed."""

from __future__ import annotations

import random
import time
from pathlib import Path

from loram.config import PruneParams, to_dict
from loram.pipeline.common import check_outputs, need_file, write_metrics

NAME = "prune"
SECTIONS = ("prune",)
OVERRIDES = "bases"
"""``--name NAME``: the stage of ``bases.NAME`` (its overrides on the shared sections)."""
OPTIONS = {
    "name": "",
    "base": "artifacts/base",
    "data": "artifacts/data",
    "out": "artifacts/pruned",
    "metrics": "metrics/prune.json",
}


def calibration_batches(tokenizer, rows: list[dict], n: int, seq_len: int, seed: int) -> list[dict]:
    """``n`` calibration sequences (batch size 1) from instruction rows, labels on all tokens."""
    from loram.data import collate, encode_rows, pack_examples

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    examples = encode_rows(tokenizer, rows[: n * 4], seq_len)
    examples = [{"input_ids": e["input_ids"], "labels": list(e["input_ids"])} for e in examples]
    blocks = pack_examples(examples, seq_len) or examples
    if len(blocks) < n:
        # Prompts longer than seq_len leave no trainable example; calibration needs none: pack
        # whole untruncated examples instead.
        whole = encode_rows(tokenizer, rows[: n * 4], 1 << 30)
        blocks = pack_examples(
            [{"input_ids": e["input_ids"], "labels": list(e["input_ids"])} for e in whole], seq_len
        )
    if not blocks:
        raise ValueError(
            f"no calibration sequence of {seq_len} tokens could be built from the training rows"
        )
    return [collate([b], tokenizer.pad_token_id or 0) for b in blocks[:n]]


def run(
    p: PruneParams,
    *,
    base: str,
    data: str,
    out: str,
    metrics: str,
    name: str = "",
) -> dict:
    """Prune ``base`` into ``out`` layer by layer (``loram.prune.stream``): the model is never
    loaded whole; the result equals pruning it in memory."""
    from loram.data import read_jsonl
    from loram.models import check_model_dir, default_device, load_config, load_tokenizer
    from loram.prune.common import pruned_layers
    from loram.prune.stream import prune_to_dir

    check_outputs("prune", out, [base, data], metrics=metrics)
    check_model_dir(base, "base model")
    train_file = need_file(Path(data) / "train.jsonl", "training data")
    config = load_config(base)
    layers = pruned_layers(config.num_hidden_layers, p.first_layer, p.last_dense)
    crit = p.resolved_criterion
    tok = load_tokenizer(base)
    calib = (
        calibration_batches(tok, read_jsonl(train_file), p.calib_samples, p.calib_seq_len, p.seed)
        if crit in ("taylor", "wanda", "sparsegpt")
        else None
    )
    t0 = time.time()
    # The base artifact's dtype: the calibration forwards run in it and the pruned model is
    # saved in it. Taylor gradients and Wanda / SparseGPT statistics are fp32 regardless (see
    # loram.prune.stream.taylor_scores and loram.prune.sparse._InputStats).
    got = prune_to_dir(
        base,
        out,
        method=p.method,
        ratio=p.ratio,
        round_to=p.round_to,
        layers=layers,
        criterion=crit,
        n=p.n,
        m=p.m,
        calib_batches=calib,
        seed=p.seed,
        tokenizer=tok,
        inputs=[base, data],
        device=default_device(),
    )
    sparsity = got["sparsity"]
    original, pruned = got["params_original"], got["params_pruned"]
    nonzero = pruned - int(sparsity["pruned"]["zeros"]) if sparsity is not None else None
    res = {
        **to_dict(p),
        "layers": layers,
        "params_original": original,
        "params_pruned": pruned,
        "reduction": round(original / pruned, 4),
        "params_nonzero": nonzero,
        "sparsity": sparsity,
        "seconds": round(time.time() - t0, 1),
    }
    write_metrics(metrics, res)
    return res
