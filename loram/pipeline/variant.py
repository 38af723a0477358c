"""Stage ``variant@NAME``: one extra arm from ``variants.NAME`` end to end in one stage
(prune -> align -> train -> recover -> merge -> evaluate, or plain LoRA on another model)."""

from __future__ import annotations

import shutil
from pathlib import Path

from loram.fsio import MARKER, check_output_dir, dumps
from loram.pipeline import align, evaluate, merge, prune, recover, train

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
    loss = Path("plots") / "loss"
    base_dir = base
    if spec.kind == "lora" or v["base"] != params["base"]:
        from loram.models import load_model, save_model_dir

        bp = v["base"]
        model, tok = load_model(bp.model, bp.gguf_file, bp.dtype, bp.revision)
        base_dir = str(work / "base")
        save_model_dir(model, tok, base_dir, command="base")
        del model
    if spec.kind == "lora":
        train.run(
            v["train"],
            model=base_dir,
            data=data,
            out=str(work / "adapter"),
            arm=name,
            checkpoints=str(work / "ckpt"),
            metrics=str(mdir / "train.json"),
            plots=str(loss / f"{name}.csv"),
        )
        pruned_dir = "none"
    else:
        pruned_dir = str(work / "aligned")
        prune.run(
            v["prune"],
            base=base_dir,
            data=data,
            out=str(work / "pruned"),
            metrics=str(mdir / "prune.json"),
        )
        align.run(
            v["align"],
            pruned=str(work / "pruned"),
            data=data,
            out=pruned_dir,
            checkpoints=str(work / "ckpt_align"),
            metrics=str(mdir / "align.json"),
            plots=str(loss / f"{name}_align.csv"),
        )
        train.run(
            v["train"],
            model=pruned_dir,
            data=data,
            out=str(work / "adapter_pruned"),
            arm=name,
            checkpoints=str(work / "ckpt"),
            metrics=str(mdir / "train.json"),
            plots=str(loss / f"{name}.csv"),
        )
        recover.run(
            v["recover"],
            adapter=str(work / "adapter_pruned"),
            pruned=pruned_dir,
            base=base_dir,
            out=str(work / "adapter"),
        )
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
        kind=spec.kind if spec.kind == "lora" else "variant",
        description=spec.description or name,
        train_metrics=str(mdir / "train.json"),
        merge_metrics=str(mdir / "merge.json"),
        out=str(Path("metrics") / "arms" / f"{name}.json"),
    )
    shutil.rmtree(work, ignore_errors=True)  # keep only the merged model and the metrics
    return rec
