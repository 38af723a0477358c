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
    from loram.data import read_jsonl
    from loram.models import (
        artifact_dtype,
        check_model_dir,
        count_params,
        default_device,
        load_model,
    )
    from loram.prune.artifact import save_pruned
    from loram.prune.common import pruned_layers

    check_outputs("prune", out, [base, data], metrics=metrics)
    check_model_dir(base, "base model")
    train_file = need_file(Path(data) / "train.jsonl", "training data")
    # The base artifact's dtype: the calibration forwards run in it and the pruned model is
    # saved in it. Taylor gradients and Wanda / SparseGPT statistics are fp32 regardless (see
    # loram.prune.structured._taylor and loram.prune.sparse._InputStats).
    model, tok = load_model(base, dtype=artifact_dtype(base))
    layers = pruned_layers(model.config.num_hidden_layers, p.first_layer, p.last_dense)
    crit = p.resolved_criterion
    calib = (
        calibration_batches(tok, read_jsonl(train_file), p.calib_samples, p.calib_seq_len, p.seed)
        if crit in ("taylor", "wanda", "sparsegpt")
        else None
    )
    original = count_params(model)
    model.to(default_device())
    t0 = time.time()
    sparsity = None
    if p.method in ("structured", "random"):
        from loram.prune.structured import prune_structured

        manifest = prune_structured(
            model, p.ratio, layers, criterion=crit, calib_batches=calib, seed=p.seed
        )
        save_pruned(model, manifest, out, tokenizer=tok, inputs=[base, data])
    else:
        from loram.prune.masks import save_masks
        from loram.prune.sparse import prune_sparse, sparse_manifest, sparsity_report

        pattern = "nm" if p.method == "semi" else "unstructured"
        masks = prune_sparse(
            model,
            layers,
            pattern=pattern,
            ratio=p.ratio,
            n=p.n,
            m=p.m,
            criterion=crit,
            calib_batches=calib,
        )
        sparsity = sparsity_report(model, masks)
        manifest = sparse_manifest(
            model,
            layers,
            pattern=pattern,
            criterion=crit,
            ratio=p.ratio,
            n=p.n,
            m=p.m,
            sparsity=sparsity,
        )
        save_pruned(
            model,
            manifest,
            out,
            tokenizer=tok,
            inputs=[base, data],
            extra_files={manifest["masks_file"]: lambda path: save_masks(path, masks)},
        )
    pruned = count_params(model)
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
