"""Stage ``align`` (offline): continual pre-training of W0^P on general text (or a copy)."""

from __future__ import annotations

import shutil
from pathlib import Path

from loram.config import AlignParams
from loram.pipeline.common import check_outputs, need_file, read_json, write_metrics

NAME = "align"
SECTIONS = ("align",)
OVERRIDES = "bases"
"""``--name NAME``: the stage of ``bases.NAME`` (its overrides on the shared sections)."""
OPTIONS = {
    "name": "",
    "pruned": "artifacts/pruned",
    "data": "artifacts/data",
    "out": "artifacts/aligned",
    "checkpoints": "artifacts/checkpoints/align",
    "metrics": "metrics/align.json",
    "plots": "plots/loss/align.csv",
}


def run(
    p: AlignParams,
    *,
    pruned: str,
    data: str,
    out: str,
    checkpoints: str,
    metrics: str,
    plots: str,
    name: str = "",
) -> dict:
    from loram import distributed as dist
    from loram.data import read_jsonl
    from loram.fsio import atomic_dir
    from loram.models import load_tokenizer
    from loram.pipeline.common import setup_logging
    from loram.prune.artifact import load_pruned_with_masks, read_manifest, save_pruned
    from loram.train import align_model, bound_training_heap, write_loss_csv

    check_outputs("align", out, [pruned, data], metrics=metrics, plots=plots)
    bound_training_heap(p)
    read_manifest(pruned)  # a pruned directory, or a clear error
    if not p.enabled:
        with atomic_dir(out, "align", [pruned]) as tmp:
            shutil.copytree(pruned, tmp, dirs_exist_ok=True)
        Path(checkpoints).mkdir(parents=True, exist_ok=True)  # a declared output of the stage
        write_metrics(metrics, {"enabled": False})
        write_loss_csv(plots, [], "align")
        return {"enabled": False}
    texts = [r["text"] for r in read_jsonl(need_file(Path(data) / "align.jsonl", "data"))]
    val_texts = [r["text"] for r in read_jsonl(need_file(Path(data) / "align_val.jsonl", "data"))]
    if p.max_steps > 0 and p.processes > 1 and not dist.in_worker():
        # This stage again, in p.processes data-parallel workers (rank 0 writes the outputs).
        dist.check_split("align", p)
        opts = dict(pruned=pruned, data=data, out=out, checkpoints=checkpoints)
        opts.update(metrics=metrics, plots=plots, name=name)
        dist.launch("align", p.processes, run, (p,), opts, init=setup_logging)
        return read_json(metrics)
    # In the pruned artifact's dtype, and saved back in it: align_model trains on fp32 master
    # weights for a bf16 / fp16 model and rounds once at the end (loram.train.fp32_master_weights).
    model, manifest, masks = load_pruned_with_masks(pruned)
    tok = load_tokenizer(pruned)
    res = align_model(model, tok, texts, p, checkpoints, masks=masks, val_texts=val_texts)
    if not dist.is_main():  # a data-parallel worker of rank > 0: trains, writes nothing
        return {}
    manifest = dict(manifest, aligned={"steps": p.max_steps, "tokens": res["tokens"], "lr": p.lr})
    extra = {}
    if masks:
        from loram.prune.masks import save_masks

        extra[manifest["masks_file"]] = lambda path: save_masks(path, masks)
    save_pruned(
        model, manifest, out, tokenizer=tok, command="align", inputs=[pruned], extra_files=extra
    )
    write_loss_csv(plots, res.pop("history"), "align")
    res = {"enabled": True, **res}
    write_metrics(metrics, res)
    return res
