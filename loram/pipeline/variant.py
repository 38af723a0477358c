"""Stage ``variant@NAME``: a baseline on another model from ``variants.NAME`` in one stage: the
model converted, plain LoRA trained on it, merged and evaluated."""

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
    from loram.models import load_model, save_model_dir

    bp = v["base"]
    model, tok = load_model(bp.model, bp.gguf_file, bp.dtype, bp.revision)
    base_dir = str(work / "base")
    save_model_dir(model, tok, base_dir, command="base")
    del model
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
        kind=spec.kind,
        description=spec.description or name,
        train_metrics=str(mdir / "train.json"),
        merge_metrics=str(mdir / "merge.json"),
        out=str(Path("metrics") / "arms" / f"{name}.json"),
    )
    shutil.rmtree(work, ignore_errors=True)  # keep only the merged model and the metrics
    return rec
