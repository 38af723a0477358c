"""Pipeline steps as CLI sub-commands; the DVC stages in ``stages/`` call exactly these."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from loram.config import load_params, to_dict

log = logging.getLogger("loram")

ART = Path("artifacts")
MET = Path("metrics")
PLOTS = Path("plots")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _write_metrics(path: Path, obj: dict) -> None:
    from loram.models import atomic_write_json

    atomic_write_json(path, obj)
    log.info("wrote %s", path)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the stage that produces it first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------


def cmd_base(a) -> int:
    """Convert the configured base model once into a plain safetensors HF directory."""
    from loram.models import count_params, load_model, save_model_dir

    p = load_params(a.params, ["base"])["base"]
    t0 = time.time()
    model, tok = load_model(p.model, p.gguf_file, p.dtype, p.revision)
    save_model_dir(model, tok, a.out)
    _write_metrics(
        Path(a.metrics),
        {
            "model": p.model,
            "model_type": model.config.model_type,
            "params": count_params(model),
            "layers": model.config.num_hidden_layers,
            "seconds": round(time.time() - t0, 1),
        },
    )
    return 0


def cmd_data(a) -> int:
    """Materialize the training / validation / out-of-domain / alignment rows as jsonl."""
    from loram.data import load_rows, split_rows, write_jsonl

    p = load_params(a.params, ["data"])["data"]
    out = Path(a.out)
    train_all = load_rows(p.train)
    if "text" in train_all[0]:
        raise ValueError(f"data.train source {p.train.name!r} is plain text; LoRA needs instruction rows")
    train, val = split_rows(train_all, p.val_fraction, p.max_val_rows, p.seed)
    stats = {"train": len(train), "val": len(val), "ood": {}}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "val.jsonl", val)
    for src in p.ood:
        rows = load_rows(src)[: p.max_ood_rows]
        name = Path(src.name).stem if src.kind == "file" else src.name.replace("/", "_")
        write_jsonl(tmp / f"ood_{name}.jsonl", rows)
        stats["ood"][name] = len(rows)
    text = load_rows(p.align)
    text_rows = [r if "text" in r else {"text": r["prompt"] + "\n" + r["response"]} for r in text]
    align_train, align_val = split_rows(text_rows, p.val_fraction, max(1, p.max_val_rows // 10), p.seed)
    write_jsonl(tmp / "align.jsonl", align_train)
    write_jsonl(tmp / "align_val.jsonl", align_val)
    stats["align_docs"] = len(align_train)
    stats["align_val_docs"] = len(align_val)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _write_metrics(Path(a.metrics), stats)
    return 0


def calibration_batches(tokenizer, rows: list[dict], n: int, seq_len: int, seed: int) -> list[dict]:
    """``n`` calibration sequences (batch size 1) from instruction rows, labels on all tokens."""
    import random

    from loram.data import collate, encode_rows, pack_examples

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    examples = encode_rows(tokenizer, rows[: n * 4], seq_len)
    examples = [{"input_ids": e["input_ids"], "labels": list(e["input_ids"])} for e in examples]
    blocks = pack_examples(examples, seq_len) or examples
    return [collate([b], tokenizer.pad_token_id or 0) for b in blocks[:n]]


def cmd_prune(a) -> int:
    """Prune the base model (structured / random / semi / unstructured) and save the pruned dir."""
    from loram.data import read_jsonl
    from loram.models import count_params, load_model
    from loram.prune.common import pruned_layers

    p = load_params(a.params, ["prune"])["prune"]
    model, tok = load_model(a.base)
    layers = pruned_layers(model.config.num_hidden_layers, p.first_layer, p.last_dense)
    needs_calib = p.criterion in ("taylor", "wanda", "sparsegpt") and p.method != "random"
    calib = (
        calibration_batches(tok, read_jsonl(Path(a.data) / "train.jsonl"), p.calib_samples, p.calib_seq_len, p.seed)
        if needs_calib
        else None
    )
    original = count_params(model)
    t0 = time.time()
    if p.method in ("structured", "random"):
        from loram.prune.artifact import save_pruned
        from loram.prune.structured import prune_structured

        crit = "random" if p.method == "random" else p.criterion
        manifest = prune_structured(model, p.ratio, layers, criterion=crit, calib_batches=calib, seed=p.seed)
        save_pruned(model, manifest, a.out, tokenizer=tok)
        sparsity = None
    else:
        from loram.prune.artifact import save_pruned
        from loram.prune.masks import save_masks
        from loram.prune.sparse import prune_sparse, sparse_manifest, sparsity_report

        pattern = "nm" if p.method == "semi" else "unstructured"
        masks = prune_sparse(
            model, layers, pattern=pattern, ratio=p.ratio, n=p.n, m=p.m, criterion=p.criterion, calib_batches=calib
        )
        sparsity = sparsity_report(model, masks)
        manifest = sparse_manifest(
            model, layers, pattern=pattern, criterion=p.criterion, ratio=p.ratio, n=p.n, m=p.m, sparsity=sparsity
        )
        save_pruned(model, manifest, a.out, tokenizer=tok)
        save_masks(Path(a.out) / manifest["masks_file"], masks)
    pruned = count_params(model)
    nonzero = pruned - int(sparsity["pruned"]["zeros"]) if sparsity is not None else None
    _write_metrics(
        Path(a.metrics),
        {
            **to_dict(p),
            "layers": layers,
            "params_original": original,
            "params_pruned": pruned,
            "reduction": round(original / pruned, 4),
            "params_nonzero": nonzero,
            "sparsity": sparsity,
            "seconds": round(time.time() - t0, 1),
        },
    )
    return 0


def _load_pruned_with_masks(pruned_dir: str):
    from loram.prune.artifact import load_pruned

    model, manifest = load_pruned(pruned_dir)
    masks = None
    if manifest.get("masks_file"):
        from loram.prune.masks import load_masks

        masks = load_masks(Path(pruned_dir) / manifest["masks_file"])
    return model, manifest, masks


def cmd_align(a) -> int:
    """Offline continual pre-training of the pruned model (or a pass-through when disabled)."""
    from transformers import AutoTokenizer

    from loram.data import read_jsonl
    from loram.prune.artifact import save_pruned
    from loram.train import align_model, write_loss_csv

    p = load_params(a.params, ["align"])["align"]
    out = Path(a.out)
    if not p.enabled:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(a.pruned, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        _write_metrics(Path(a.metrics), {"enabled": False})
        write_loss_csv(a.plots, [], "align")
        return 0
    model, manifest, masks = _load_pruned_with_masks(a.pruned)
    tok = AutoTokenizer.from_pretrained(a.pruned)
    texts = [r["text"] for r in read_jsonl(Path(a.data) / "align.jsonl")]
    val_texts = [r["text"] for r in read_jsonl(Path(a.data) / "align_val.jsonl")]
    res = align_model(model, tok, texts, p, a.checkpoints, masks=masks, val_texts=val_texts)
    manifest = dict(manifest, aligned={"steps": p.max_steps, "tokens": res["tokens"], "lr": p.lr})
    save_pruned(model, manifest, out, tokenizer=tok)
    if masks:
        from loram.prune.masks import save_masks

        save_masks(out / manifest["masks_file"], masks)
    write_loss_csv(a.plots, res.pop("history"), "align")
    _write_metrics(Path(a.metrics), {"enabled": True, **res})
    return 0


def cmd_train(a) -> int:
    """Train LoRA (QLoRA with train.quantize: nf4) on the (aligned) pruned model."""
    from transformers import AutoTokenizer

    from loram.data import read_jsonl
    from loram.models import atomic_dir
    from loram.train import train_lora, write_loss_csv

    p = load_params(a.params, ["train"])["train"]
    model, manifest, _ = _load_pruned_with_masks(a.model)
    tok = AutoTokenizer.from_pretrained(a.model)
    train_rows = read_jsonl(Path(a.data) / "train.jsonl")
    val_rows = read_jsonl(Path(a.data) / "val.jsonl")
    with atomic_dir(a.out) as tmp:
        res = train_lora(model, tok, train_rows, val_rows, p, tmp, a.checkpoints)
        (tmp / "loram_train.json").write_text(json.dumps({"train": to_dict(p), "pruned_from": manifest.get("method")}))
    write_loss_csv(a.plots, res.pop("history"), "loram")
    _write_metrics(Path(a.metrics), res)
    return 0


def cmd_recover(a) -> int:
    """Scatter the pruned adapter back to the original shapes (a standard peft adapter)."""
    from loram.recover import recover_adapter

    p = load_params(a.params, ["recover"])["recover"]
    recover_adapter(a.adapter, a.pruned, a.out, base_model_path=a.base, norm_a=p.norm_a, seed=p.seed)
    return 0


def cmd_merge(a) -> int:
    """Merge the recovered adapter into the original model; report sparsity for sparse variants."""
    from loram.merge import merge_to_dir
    from loram.prune.artifact import read_manifest

    params = load_params(a.params, ["recover", "merge"])
    manifest = read_manifest(a.pruned)
    masks = None
    if manifest.get("masks_file"):
        from loram.prune.masks import load_masks

        masks = load_masks(Path(a.pruned) / manifest["masks_file"])
    use_masks = masks if (masks is not None and params["recover"].mask_update) else None
    merge_to_dir(a.base, a.adapter, a.out, dtype=params["merge"].dtype, masks=use_masks)
    info: dict = {"method": manifest.get("method"), "mask_update": params["recover"].mask_update}
    if masks is not None:
        from transformers import AutoModelForCausalLM

        from loram.prune.sparse import sparsity_report

        merged = AutoModelForCausalLM.from_pretrained(a.out)
        after = sparsity_report(merged, masks)
        info["sparsity_before_merge"] = manifest.get("sparsity")
        info["sparsity_after_merge"] = after
        val = after["pruned"]["sparsity"]
        info["sparsity_pruned_before"] = manifest["sparsity"]["pruned"]["sparsity"]
        info["sparsity_pruned_after"] = val
        info["densified"] = bool(val < 0.5 * info["sparsity_pruned_before"])
        if info["densified"]:
            log.warning(
                "the merged model is dense again (sparsity %.4f): B·A fills pruned weights; set "
                "recover.mask_update: true to keep the sparsity pattern",
                val,
            )
    _write_metrics(Path(a.metrics), info)
    return 0


def cmd_evaluate(a) -> int:
    """Perplexity of the original, merged LoRAM and unrecovered (pruned + adapter) models."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loram.data import read_jsonl
    from loram.evaluate.perplexity import perplexity

    p = load_params(a.params, ["eval"])["eval"]
    tok = AutoTokenizer.from_pretrained(a.base)
    data = Path(a.data)
    sets = {"in_domain": read_jsonl(data / "val.jsonl")[: p.ppl_max_rows]}
    for f in sorted(data.glob("ood_*.jsonl")):
        sets[f.stem] = read_jsonl(f)[: p.ppl_max_rows]
    sets["general_text"] = read_jsonl(data / "align_val.jsonl")[: p.ppl_max_rows]

    def score(model) -> dict:
        with torch.no_grad():
            return {k: perplexity(model, tok, rows, p.ppl_seq_len, p.batch_size)["ppl"] for k, rows in sets.items()}

    results: dict = {}
    for arm, path in (("original", a.base), ("loram", a.merged)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[arm] = score(model)
        log.info("%s: %s", arm, results[arm])
        del model
    pruned, _, _ = _load_pruned_with_masks(a.pruned)
    results["pruned"] = score(pruned)
    nr = PeftModel.from_pretrained(pruned, a.adapter).eval()
    results["no_recovery"] = score(nr)
    log.info("pruned: %s / no_recovery: %s", results["pruned"], results["no_recovery"])
    _write_metrics(Path(a.metrics), {"ppl": results})
    return 0


# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    def stage(name, func, help_, **paths):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        for key, default in paths.items():
            sp.add_argument(f"--{key.replace('_', '-')}", dest=key, default=default, help=f"(default: {default})")

        def run(args, _f=func):
            _setup_logging()
            return _f(args)

        sp.set_defaults(func=run)

    stage("base", cmd_base, cmd_base.__doc__, out=f"{ART}/base", metrics=f"{MET}/base.json")
    stage("data", cmd_data, cmd_data.__doc__, out=f"{ART}/data", metrics=f"{MET}/data.json")
    stage(
        "prune", cmd_prune, cmd_prune.__doc__,
        base=f"{ART}/base", data=f"{ART}/data", out=f"{ART}/pruned", metrics=f"{MET}/prune.json",
    )
    stage(
        "align", cmd_align, cmd_align.__doc__,
        pruned=f"{ART}/pruned", data=f"{ART}/data", out=f"{ART}/aligned",
        checkpoints=f"{ART}/checkpoints/align", metrics=f"{MET}/align.json", plots=f"{PLOTS}/align_loss.csv",
    )
    stage(
        "train", cmd_train, cmd_train.__doc__,
        model=f"{ART}/aligned", data=f"{ART}/data", out=f"{ART}/adapter_pruned",
        checkpoints=f"{ART}/checkpoints/train", metrics=f"{MET}/train.json", plots=f"{PLOTS}/train_loss.csv",
    )
    stage(
        "recover", cmd_recover, cmd_recover.__doc__,
        adapter=f"{ART}/adapter_pruned", pruned=f"{ART}/aligned", base=f"{ART}/base", out=f"{ART}/adapter",
    )
    stage(
        "merge", cmd_merge, cmd_merge.__doc__,
        base=f"{ART}/base", adapter=f"{ART}/adapter", pruned=f"{ART}/aligned", out=f"{ART}/merged",
        metrics=f"{MET}/merge.json",
    )
    stage(
        "evaluate", cmd_evaluate, cmd_evaluate.__doc__,
        base=f"{ART}/base", merged=f"{ART}/merged", pruned=f"{ART}/aligned", adapter=f"{ART}/adapter_pruned",
        data=f"{ART}/data", metrics=f"{MET}/eval.json",
    )


def main_stage(name: str) -> None:
    """Entry point of ``stages/<name>.py``."""
    import sys

    from loram.cli import main

    sys.exit(main([name, *sys.argv[1:]]))


__all__ = ["add_parser", "main_stage", "argparse"]
