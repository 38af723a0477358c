"""Stage ``variant@NAME``: a baseline on another model from ``variants.NAME`` in one stage: the
model converted, plain LoRA trained on it, merged and evaluated (``kind: lora``), or the model
converted and evaluated untuned (``kind: original``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from loram.fsio import MARKER, check_output_dir, dumps
from loram.pipeline import evaluate, merge, train

NAME = "variant"
SECTIONS = None
OPTIONS = {
    "name": "",
    "base": "artifacts/base",
    "data": "artifacts/data",
    "out": "artifacts/variants",
}


REPORT_KIND = {"lora": "lora_small", "original": "original"}
"""The report's kind of each variant kind (a LoRA baseline on another model is ``lora_small``)."""


def run(params: dict, *, name: str, base: str, data: str, out: str) -> dict:
    if not name:
        raise ValueError(
            "loram variant needs --name NAME, one of params.yaml variants: "
            + (", ".join(sorted(params["variants"])) or "(none defined)")
        )
    if name not in params["variants"]:
        raise ValueError(
            f"variant {name!r} is not in params.yaml variants: {sorted(params['variants'])}"
        )
    v = params["variants"][name]
    spec = v["spec"]
    root = Path(out) / name
    check_output_dir(root, "variant", [base, data])
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(dumps({"command": "variant", "format": 1}), encoding="utf-8")
    mdir = Path("metrics") / "variants" / name
    from loram.convert import convert_model
    from loram.models import resolve_dtype

    bp = v["base"]
    dtype = resolve_dtype(bp.dtype)
    if spec.kind == "original":
        # The other model untuned: converted (kept as the variant's output) and evaluated.
        model_dir = str(root / "model")
        convert_model(
            bp.model, model_dir, gguf_file=bp.gguf_file, dtype=dtype, revision=bp.revision
        )
        mdir.mkdir(parents=True, exist_ok=True)
        # Every output the DVC stage declares exists: no training, so an empty loss curve.
        from loram.train import write_loss_csv

        write_loss_csv(Path("plots") / "loss" / f"{name}.csv", [], name)
        rec = evaluate.run(
            params["eval"],
            model=model_dir,
            data=data,
            arm=name,
            kind="original",
            description=spec.description or f"{bp.model}, no fine-tuning",
            out=str(Path("metrics") / "arms" / f"{name}.json"),
        )
        shutil.rmtree(work, ignore_errors=True)
        return rec
    base_dir = str(work / "base")
    convert_model(bp.model, base_dir, gguf_file=bp.gguf_file, dtype=dtype, revision=bp.revision)
    train.run(
        v["train"],
        model=base_dir,
        data=data,
        out=str(work / "adapter"),
        arm=name,
        checkpoints=str(work / "ckpt"),
        metrics=str(mdir / "train.json"),
        plots=str(Path("plots") / "loss" / f"{name}.csv"),
    )
    pruned_dir = "none"
    merge.run(
        v["recover"],
        v["merge"],
        base=base_dir,
        adapter=str(work / "adapter"),
        pruned=pruned_dir,
        out=str(root / "merged"),
        metrics=str(mdir / "merge.json"),
    )
    rec = evaluate.run(
        params["eval"],
        model=str(root / "merged"),
        data=data,
        arm=name,
        kind=REPORT_KIND[spec.kind],
        description=spec.description or name,
        train_metrics=str(mdir / "train.json"),
        merge_metrics=str(mdir / "merge.json"),
        out=str(Path("metrics") / "arms" / f"{name}.json"),
    )
    shutil.rmtree(work, ignore_errors=True)  # keep only the merged model and the metrics
    return rec
