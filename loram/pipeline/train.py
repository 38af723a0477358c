"""Stage ``train`` (online): LoRA (QLoRA with ``train.quantize: nf4``) on the aligned pruned
model, or on a plain model (the LoRA-on-the-full-model baseline)."""

from __future__ import annotations

from pathlib import Path

from loram.config import TrainParams, to_dict
from loram.pipeline.common import (
    check_outputs,
    need_dir,
    need_file,
    read_json,
    write_metrics,
    write_skipped,
)

NAME = "train"
SECTIONS = ("train",)
OVERRIDES = "arms"
"""``--name NAME``: the stage of ``arms.NAME`` (its overrides on the shared sections)."""
OPTIONS = {
    "name": "",
    "model": "artifacts/aligned",
    "data": "artifacts/data",
    "out": "artifacts/adapter_pruned",
    "arm": "loram",
    "checkpoints": "artifacts/checkpoints/train",
    "metrics": "metrics/train/loram.json",
    "plots": "plots/loss/loram.csv",
}


def load_trainable_base(path: str):
    """``(model, manifest)``: a pruned directory (with manifest) or a plain HF model dir, in
    the dtype it was saved in (the frozen base is held in it; LoRA weights are fp32)."""
    if (Path(path) / "loram_manifest.json").exists():
        from loram.prune.artifact import load_pruned_with_masks

        model, manifest, _ = load_pruned_with_masks(path)
        return model, manifest
    from loram.models import load_hf_model

    return load_hf_model(path), None


def full_baseline_skipped(params_file: str, model: str) -> str | None:
    """Why LoRA on the full model is not trained (``baselines.lora_full``), or None to train it."""
    import torch

    from loram.config import load_params
    from loram.models import artifact_dtype, default_device

    if not Path(params_file).is_file():
        return None  # a library call without a params file: the default, true
    setting = load_params(params_file, ["baselines"])["baselines"].lora_full
    if setting is True:
        return None
    if setting is False:
        return "baselines.lora_full is false"
    need_dir(model, "model")
    dtype = artifact_dtype(model)
    if default_device() != "cpu" or dtype != torch.float32:
        return None
    return (
        "baselines.lora_full is auto and the base is float32 on the CPU, where LoRA on the "
        "full model costs as much again as the rest of the run; set it to true to train it"
    )


def run(
    p: TrainParams,
    *,
    model: str,
    data: str,
    out: str,
    arm: str,
    checkpoints: str,
    metrics: str,
    plots: str,
    name: str = "",
    params_file: str = "params.yaml",
) -> dict:
    from loram import distributed as dist
    from loram.data import read_jsonl
    from loram.fsio import atomic_dir, dumps
    from loram.models import count_params, load_tokenizer
    from loram.pipeline.common import setup_logging
    from loram.train import bound_training_heap, train_lora, write_loss_csv

    check_outputs("train", out, [model, data], metrics=metrics, plots=plots)
    if arm == "lora_full" and not dist.in_worker():
        why = full_baseline_skipped(params_file, model)
        if why:
            write_skipped(out, "train", why, [model, data])
            Path(checkpoints).mkdir(parents=True, exist_ok=True)  # a declared (persistent) out
            write_loss_csv(plots, [], arm)
            res = {"arm": arm, "skipped": why}
            write_metrics(metrics, res)
            return res
    bound_training_heap(p)
    train_rows = read_jsonl(need_file(Path(data) / "train.jsonl", "training data"))
    val_rows = read_jsonl(need_file(Path(data) / "val.jsonl", "validation data"))
    need_dir(model, "model")
    if p.processes > 1 and not dist.in_worker():
        # This stage again, in p.processes data-parallel workers (rank 0 writes the outputs).
        dist.check_split("train", p)
        opts = dict(model=model, data=data, out=out, arm=arm, checkpoints=checkpoints)
        opts.update(metrics=metrics, plots=plots, name=name, params_file=params_file)
        dist.launch("train", p.processes, run, (p,), opts, init=setup_logging)
        return read_json(metrics)
    trained_on: dict = {"model_dir": str(model)}
    if (Path(model) / "loram_manifest.json").exists():
        from loram.prune.artifact import structure_digest

        trained_on["structure"] = structure_digest(model)
    net, manifest = load_trainable_base(model)
    original = (manifest or {}).get("params", {}).get("original") or count_params(net)
    tok = load_tokenizer(model)
    if not dist.is_main():  # a data-parallel worker of rank > 0: trains, writes nothing
        train_lora(net, tok, train_rows, val_rows, p, None, checkpoints)
        return {}
    with atomic_dir(out, "train", [model, data]) as tmp:
        res = train_lora(net, tok, train_rows, val_rows, p, tmp, checkpoints)
        provenance = {
            "arm": arm,
            "train": to_dict(p),
            "pruned": manifest is not None,
            "trained_on": trained_on,
        }
        (tmp / "loram_train.json").write_text(dumps(provenance), encoding="utf-8")
    write_loss_csv(plots, res.pop("history"), arm)
    res.update(arm=arm, params_original=original, reduction=round(original / res["params_held"], 4))
    if manifest is not None:
        res.update(
            method=manifest.get("method"),
            ratio=manifest.get("ratio"),
            aligned="aligned" in manifest,
        )
    write_metrics(metrics, res)
    return res
