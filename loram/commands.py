"""Pipeline steps as CLI sub-commands; the DVC stages in ``stages/`` call exactly these."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from loram.config import load_params, to_dict
from loram.errors import ArtifactError
from loram.fsio import check_output_dir, check_output_file

log = logging.getLogger("loram")

ART = Path("artifacts")
MET = Path("metrics")
PLOTS = Path("plots")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _write_metrics(path: Path, obj: dict) -> None:
    from loram.fsio import atomic_write_json

    atomic_write_json(check_output_file(path, (".json",), "--metrics"), obj)
    log.info("wrote %s", path)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the stage that produces it first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(
            f"{path} is not valid JSON ({exc}); re-run the stage that makes it"
        ) from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    return obj


def _preflight(a, command: str, inputs: tuple[str, ...] = (), **files) -> None:
    """Cheap checks before any heavy work: the output paths may be written, metrics/plots
    paths have the right type. ``files``: option name -> suffixes."""
    check_output_dir(a.out, command, [getattr(a, k, None) for k in inputs])
    for opt, suffixes in files.items():
        value = getattr(a, opt, None)
        if value:
            check_output_file(value, suffixes, f"--{opt}")


def _need_file(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(
            f"{what} {str(path)!r} does not exist; run the stage that makes it (or `dvc checkout`)"
        )
    return p


# ---------------------------------------------------------------------------------------------


def cmd_check(a) -> int:
    """Validate the whole params file (every section and variant) before any stage runs."""
    from loram.fsio import atomic_write_json

    load_params(a.params)
    if a.out:
        # Same bytes for every valid params file: stages that depend on it do not re-run.
        atomic_write_json(check_output_file(a.out, (".json",), "--out"), {"valid": True})
    print(f"{a.params}: ok")
    return 0


def cmd_base(a) -> int:
    """Convert the configured base model once into a plain safetensors HF directory."""
    from loram.models import count_params, load_model, save_model_dir

    p = load_params(a.params, ["base"])["base"]
    _preflight(a, "base", metrics=(".json",))
    t0 = time.time()
    model, tok = load_model(p.model, p.gguf_file, p.dtype, p.revision)
    save_model_dir(model, tok, a.out, command="base")
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
    from loram.data import load_rows, split_rows
    from loram.fsio import atomic_dir

    p = load_params(a.params, ["data"])["data"]
    _preflight(a, "data", metrics=(".json",))
    out = Path(a.out)
    train_all = load_rows(p.train)
    if "text" in train_all[0]:
        raise ValueError(
            f"data.train source {p.train.name!r} is plain text; LoRA needs instruction rows"
        )
    train, val = split_rows(train_all, p.val_fraction, p.max_val_rows, p.seed)
    stats = {"train": len(train), "val": len(val), "ood": {}}
    with atomic_dir(out, "data") as tmp:
        _write_data_dir(tmp, p, train, val, stats)
    _write_metrics(Path(a.metrics), stats)
    return 0


def _write_data_dir(tmp: Path, p, train: list, val: list, stats: dict) -> None:
    from loram.data import load_rows, split_rows, write_jsonl

    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "val.jsonl", val)
    for src in p.ood:
        rows = load_rows(src)[: p.max_ood_rows]
        name = Path(src.name).stem if src.kind == "file" else src.name.replace("/", "_")
        write_jsonl(tmp / f"ood_{name}.jsonl", rows)
        stats["ood"][name] = len(rows)
    text = load_rows(p.align)
    text_rows = [r if "text" in r else {"text": r["prompt"] + "\n" + r["response"]} for r in text]
    align_train, align_val = split_rows(
        text_rows, p.val_fraction, max(1, p.max_val_rows // 10), p.seed
    )
    write_jsonl(tmp / "align.jsonl", align_train)
    write_jsonl(tmp / "align_val.jsonl", align_val)
    stats["align_docs"] = len(align_train)
    stats["align_val_docs"] = len(align_val)


def calibration_batches(tokenizer, rows: list[dict], n: int, seq_len: int, seed: int) -> list[dict]:
    """``n`` calibration sequences (batch size 1) from instruction rows, labels on all tokens."""
    import random

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


def cmd_prune(a) -> int:
    """Prune the base model (structured / random / semi / unstructured) and save the pruned dir."""
    from loram.data import read_jsonl
    from loram.models import check_model_dir, count_params, load_model
    from loram.prune.common import pruned_layers

    p = load_params(a.params, ["prune"])["prune"]
    _preflight(a, "prune", ("base", "data"), metrics=(".json",))
    check_model_dir(a.base, "base model")
    train_file = _need_file(Path(a.data) / "train.jsonl", "training data")
    model, tok = load_model(a.base)
    layers = pruned_layers(model.config.num_hidden_layers, p.first_layer, p.last_dense)
    crit = p.resolved_criterion
    needs_calib = crit in ("taylor", "wanda", "sparsegpt")
    calib = (
        calibration_batches(tok, read_jsonl(train_file), p.calib_samples, p.calib_seq_len, p.seed)
        if needs_calib
        else None
    )
    original = count_params(model)
    from loram.models import default_device

    model.to(default_device())
    t0 = time.time()
    if p.method in ("structured", "random"):
        from loram.prune.artifact import save_pruned
        from loram.prune.structured import prune_structured

        manifest = prune_structured(
            model, p.ratio, layers, criterion=crit, calib_batches=calib, seed=p.seed
        )
        save_pruned(model, manifest, a.out, tokenizer=tok, inputs=[a.base, a.data])
        sparsity = None
    else:
        from loram.prune.artifact import save_pruned
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
            a.out,
            tokenizer=tok,
            inputs=[a.base, a.data],
            extra_files={manifest["masks_file"]: lambda path: save_masks(path, masks)},
        )
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
    from loram.data import read_jsonl
    from loram.models import load_tokenizer
    from loram.prune.artifact import read_manifest, save_pruned
    from loram.train import align_model, write_loss_csv

    p = load_params(a.params, ["align"])["align"]
    _preflight(a, "align", ("pruned", "data"), metrics=(".json",), plots=(".csv",))
    read_manifest(a.pruned)  # a pruned directory, or a clear error
    out = Path(a.out)
    if not p.enabled:
        from loram.fsio import atomic_dir

        with atomic_dir(out, "align", [a.pruned]) as tmp:
            shutil.copytree(a.pruned, tmp, dirs_exist_ok=True)
        _write_metrics(Path(a.metrics), {"enabled": False})
        write_loss_csv(a.plots, [], "align")
        return 0
    texts = [r["text"] for r in read_jsonl(_need_file(Path(a.data) / "align.jsonl", "data"))]
    val_texts = [
        r["text"] for r in read_jsonl(_need_file(Path(a.data) / "align_val.jsonl", "data"))
    ]
    model, manifest, masks = _load_pruned_with_masks(a.pruned)
    tok = load_tokenizer(a.pruned)
    res = align_model(model, tok, texts, p, a.checkpoints, masks=masks, val_texts=val_texts)
    manifest = dict(manifest, aligned={"steps": p.max_steps, "tokens": res["tokens"], "lr": p.lr})
    extra = {}
    if masks:
        from loram.prune.masks import save_masks

        extra[manifest["masks_file"]] = lambda path: save_masks(path, masks)
    save_pruned(
        model, manifest, out, tokenizer=tok, command="align", inputs=[a.pruned], extra_files=extra
    )
    write_loss_csv(a.plots, res.pop("history"), "align")
    _write_metrics(Path(a.metrics), {"enabled": True, **res})
    return 0


def _load_trainable_base(path: str):
    """A pruned directory (with manifest) or a plain HF model directory."""
    if (Path(path) / "loram_manifest.json").exists():
        model, manifest, _ = _load_pruned_with_masks(path)
        return model, manifest
    from loram.models import load_hf_model

    return load_hf_model(path, "float32"), None


def run_train(
    model_dir: str, data_dir: str, p, out: str, checkpoints: str, arm: str, plots: str
) -> dict:
    from loram.data import read_jsonl
    from loram.fsio import atomic_dir, dumps
    from loram.models import count_params, load_tokenizer
    from loram.train import train_lora, write_loss_csv

    check_output_dir(out, "train", [model_dir, data_dir])
    check_output_file(plots, (".csv",), "--plots")
    train_rows = read_jsonl(_need_file(Path(data_dir) / "train.jsonl", "training data"))
    val_rows = read_jsonl(_need_file(Path(data_dir) / "val.jsonl", "validation data"))
    if not Path(model_dir).is_dir():
        raise ArtifactError(f"model directory {model_dir!r} does not exist")
    trained_on: dict = {"model_dir": str(model_dir)}
    if (Path(model_dir) / "loram_manifest.json").exists():
        from loram.prune.artifact import structure_digest

        trained_on["structure"] = structure_digest(model_dir)
    model, manifest = _load_trainable_base(model_dir)
    original = (manifest or {}).get("params", {}).get("original") or count_params(model)
    tok = load_tokenizer(model_dir)
    with atomic_dir(out, "train", [model_dir, data_dir]) as tmp:
        res = train_lora(model, tok, train_rows, val_rows, p, tmp, checkpoints)
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
    return res


def cmd_train(a) -> int:
    """Train LoRA (QLoRA with train.quantize: nf4) on the (aligned) pruned model or a plain model."""
    p = load_params(a.params, ["train"])["train"]
    check_output_file(a.metrics, (".json",), "--metrics")
    res = run_train(a.model, a.data, p, a.out, a.checkpoints, a.arm, a.plots)
    _write_metrics(Path(a.metrics), res)
    return 0


def cmd_recover(a) -> int:
    """Scatter the pruned adapter back to the original shapes (a standard peft adapter)."""
    from loram.recover import recover_adapter

    p = load_params(a.params, ["recover"])["recover"]
    _preflight(a, "recover", ("adapter", "pruned", "base"))
    if a.base:
        from loram.models import check_model_dir

        check_model_dir(a.base, "base model")
    recover_adapter(
        a.adapter, a.pruned, a.out, base_model_path=a.base, norm_a=p.norm_a, seed=p.seed
    )
    return 0


def cmd_merge(a) -> int:
    """Merge the recovered adapter into the original model (or, for sparse variants with
    merge.target: pruned, into the sparse model); report the sparsity of the pruned layers."""
    from loram.merge import merge_to_dir
    from loram.models import check_adapter_dir
    from loram.prune.artifact import read_manifest
    from loram.recover import check_provenance, read_provenance

    params = load_params(a.params, ["recover", "merge"])
    mp = params["merge"]
    _preflight(a, "merge", ("base", "adapter", "pruned"), metrics=(".json",))
    check_adapter_dir(a.adapter)
    has_pruned = a.pruned not in ("", "none")
    manifest = read_manifest(a.pruned) if has_pruned else {}
    prov = read_provenance(a.adapter) or {}
    if prov.get("pruned") and not prov.get("recovered"):
        raise ArtifactError(
            f"adapter {a.adapter!r} has the shapes of the pruned model it was trained on "
            f"({(prov.get('trained_on') or {}).get('model_dir', '?')}); recover it first with "
            "`loram recover`"
        )
    if has_pruned:
        check_provenance(a.adapter, a.pruned, recovered=True)
    masks = None
    if manifest.get("masks_file"):
        from loram.prune.masks import load_masks

        masks = load_masks(Path(a.pruned) / manifest["masks_file"])
    if mp.target == "pruned" and masks is None:
        raise ValueError(
            f"merge.target = 'pruned' needs a semi / unstructured pruned model, not "
            f"{manifest.get('method') or 'none'!r}: structured pruning changes the shapes"
        )
    target_dir = a.pruned if mp.target == "pruned" else a.base
    use_masks = masks if (masks is not None and params["recover"].mask_update) else None
    merge_to_dir(target_dir, a.adapter, a.out, dtype=mp.dtype, masks=use_masks)
    info: dict = {
        "method": manifest.get("method"),
        "target": mp.target,
        "mask_update": params["recover"].mask_update,
    }
    if masks is not None:
        from transformers import AutoModelForCausalLM

        from loram.prune.sparse import mask_sparsity, sparsity_report

        merged = AutoModelForCausalLM.from_pretrained(a.out)
        after = sparsity_report(merged, masks)
        vs_mask = mask_sparsity(merged, masks)
        before = vs_mask["mask_sparsity"]
        val = vs_mask["sparsity"]
        info.update(
            sparsity_before_merge=manifest.get("sparsity"),
            sparsity_after_merge=after,
            sparsity_pruned_before=before,
            sparsity_pruned_after=val,
            pruned_positions_nonzero=vs_mask["pruned_nonzero"],
            densified=vs_mask["pruned_nonzero"] > 0,
        )
        if mp.target == "original":
            log.info(
                "merged into the dense original model (sparsity of the pruned layers %.4f); "
                "merge.target: pruned with recover.mask_update: true keeps a sparse model",
                val,
            )
        elif info["densified"]:
            log.warning(
                "merging densified the sparse model: %d pruned weights are non-zero (sparsity "
                "of the mask %.4f, of the merged model at the mask's positions %.4f); set "
                "recover.mask_update: true to keep the sparsity pattern",
                vs_mask["pruned_nonzero"],
                before,
                val,
            )
    _write_metrics(Path(a.metrics), info)
    return 0


def evaluate_arm(
    model_dir: str, adapter: str | None, data_dir: str, p, tokenizer_dir: str | None = None
) -> dict:
    """Perplexities and lm-eval benchmarks of one model (a merged dir, or pruned dir + adapter)."""
    import torch

    from loram.data import read_jsonl
    from loram.evaluate.perplexity import perplexity
    from loram.models import check_adapter_dir, load_hf_model, load_tokenizer

    data = Path(data_dir)
    for name in ("val.jsonl", "align_val.jsonl"):
        _need_file(data / name, "evaluation data")
    if adapter:
        check_adapter_dir(adapter)
    if (Path(model_dir) / "loram_manifest.json").exists():
        model, _, _ = _load_pruned_with_masks(model_dir)
    else:
        model = load_hf_model(model_dir, "float32")
    tok = load_tokenizer(tokenizer_dir or model_dir)
    if adapter:
        from peft import PeftModel

        from loram.merge import precheck_adapter

        precheck_adapter(model, adapter)
        model = PeftModel.from_pretrained(model, adapter)
    from loram.models import default_device

    model.to(default_device()).eval()
    sets = {"in_domain": read_jsonl(data / "val.jsonl")[: p.ppl_max_rows]}
    for f in sorted(data.glob("ood_*.jsonl")):
        sets[f.stem] = read_jsonl(f)[: p.ppl_max_rows]
    sets["general_text"] = read_jsonl(data / "align_val.jsonl")[: p.ppl_max_rows]
    t0 = time.time()
    with torch.no_grad():
        ppl = {
            k: perplexity(model, tok, rows, p.ppl_seq_len, p.batch_size)["ppl"]
            for k, rows in sets.items()
        }
    log.info("perplexity %s (%.0fs)", ppl, time.time() - t0)
    out: dict = {"ppl": ppl}
    if p.tasks:
        from loram.evaluate.harness import run_benchmarks

        if adapter:
            model = model.merge_and_unload()  # lm-eval wants a plain model; same function
        gen = {"max_gen_toks": p.max_gen_toks} if p.max_gen_toks else None
        out["bench"] = run_benchmarks(
            model,
            tok,
            tasks=p.tasks,
            source=p.source,
            limit=p.limit or None,
            num_fewshot=p.num_fewshot or None,
            batch_size=p.batch_size,
            gen_kwargs=gen,
            humaneval_n=p.humaneval_n,
            humaneval_temperature=p.humaneval_temperature,
            humaneval_top_p=p.humaneval_top_p,
            seed=p.seed,
        )
    out["eval_seconds"] = round(time.time() - t0, 1)
    return out


ARM_FIELDS = (
    "method",
    "ratio",
    "aligned",
    "quantize",
    "params_original",
    "params_held",
    "reduction",
    "base_param_bytes",
    "quantized_param_bytes",
    "peak_rss_mib",
    "train_seconds",
    "samples_per_second",
)


def cmd_evaluate(a) -> int:
    """Evaluate one arm: perplexities and benchmarks, joined with its training cost."""
    p = load_params(a.params, ["eval"])["eval"]
    check_output_file(a.out, (".json",), "--out")
    for opt in ("train_metrics", "merge_metrics"):
        if getattr(a, opt):
            check_output_file(getattr(a, opt), (".json",), f"--{opt.replace('_', '-')}")
    if a.train_metrics:
        _read_json(Path(a.train_metrics))
    res = evaluate_arm(a.model, a.adapter or None, a.data, p, tokenizer_dir=a.tokenizer or None)
    arm = {"arm": a.arm, "kind": a.kind, "description": a.description}
    if a.train_metrics:
        tm = _read_json(Path(a.train_metrics))
        arm.update({k: tm[k] for k in ARM_FIELDS if k in tm})
    if a.merge_metrics and Path(a.merge_metrics).exists():
        mm = _read_json(Path(a.merge_metrics))
        if "sparsity_pruned_after" in mm:
            # Real sparsity of the pruned layers while training, and of the merged model.
            arm["sparsity"] = mm["sparsity_pruned_before"]
            arm["sparsity_merged"] = mm["sparsity_pruned_after"]
            arm["merge_target"] = mm.get("target", "original")
    arm.update(res)
    _write_metrics(Path(a.out), arm)
    return 0


def cmd_variant(a) -> int:
    """Run one extra arm from ``variants.<name>`` end to end (prune .. evaluate) in one stage."""
    from types import SimpleNamespace as NS

    from loram.models import save_model_dir

    allp = load_params(a.params)
    if not a.name:
        raise ValueError(
            "loram variant needs --name NAME, one of params.yaml variants: "
            + (", ".join(sorted(allp["variants"])) or "(none defined)")
        )
    if a.name not in allp["variants"]:
        raise ValueError(
            f"variant {a.name!r} is not in params.yaml variants: {sorted(allp['variants'])}"
        )
    v = allp["variants"][a.name]
    spec = v["spec"]
    root = Path(a.out) / a.name
    check_output_dir(root, "variant", [a.base, a.data])
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    from loram.fsio import MARKER, dumps

    (root / MARKER).write_text(dumps({"command": "variant", "format": 1}), encoding="utf-8")
    mdir = MET / "variants" / a.name
    base_dir = a.base
    if spec.kind == "lora" or v["base"] != allp["base"]:
        from loram.models import load_model

        bp = v["base"]
        model, tok = load_model(bp.model, bp.gguf_file, bp.dtype, bp.revision)
        base_dir = str(work / "base")
        save_model_dir(model, tok, base_dir, command="base")
        del model
    if spec.kind == "lora":
        tm = run_train(
            base_dir,
            a.data,
            v["train"],
            str(work / "adapter"),
            str(work / "ckpt"),
            a.name,
            str(PLOTS / "loss" / f"{a.name}.csv"),
        )
        _write_metrics(mdir / "train.json", tm)
        merge_args = NS(
            params=a.params,
            base=base_dir,
            adapter=str(work / "adapter"),
            pruned="none",
            out=str(root / "merged"),
            metrics=str(mdir / "merge.json"),
        )
    else:
        from loram.config import to_dict

        overrides = {k: v[k] for k in ("prune", "align", "recover", "merge")}
        vparams = work / "params.yaml"
        import yaml

        raw = yaml.safe_load(Path(a.params).read_text()) or {}
        raw.pop("variants", None)
        for sec, obj in overrides.items():
            raw[sec] = to_dict(obj)
        vparams.write_text(yaml.safe_dump(raw, sort_keys=False))
        cmd_prune(
            NS(
                params=str(vparams),
                base=base_dir,
                data=a.data,
                out=str(work / "pruned"),
                metrics=str(mdir / "prune.json"),
            )
        )
        cmd_align(
            NS(
                params=str(vparams),
                pruned=str(work / "pruned"),
                data=a.data,
                out=str(work / "aligned"),
                checkpoints=str(work / "ckpt_align"),
                metrics=str(mdir / "align.json"),
                plots=str(PLOTS / "loss" / f"{a.name}_align.csv"),
            )
        )
        tm = run_train(
            str(work / "aligned"),
            a.data,
            v["train"],
            str(work / "adapter_pruned"),
            str(work / "ckpt"),
            a.name,
            str(PLOTS / "loss" / f"{a.name}.csv"),
        )
        _write_metrics(mdir / "train.json", tm)
        cmd_recover(
            NS(
                params=str(vparams),
                adapter=str(work / "adapter_pruned"),
                pruned=str(work / "aligned"),
                base=base_dir,
                out=str(work / "adapter"),
            )
        )
        merge_args = NS(
            params=str(vparams),
            base=base_dir,
            adapter=str(work / "adapter"),
            pruned=str(work / "aligned"),
            out=str(root / "merged"),
            metrics=str(mdir / "merge.json"),
        )
    cmd_merge(merge_args)
    cmd_evaluate(
        NS(
            params=a.params,
            model=str(root / "merged"),
            adapter="",
            tokenizer="",
            data=a.data,
            arm=a.name,
            kind=spec.kind if spec.kind == "lora" else "variant",
            description=spec.description or a.name,
            train_metrics=str(mdir / "train.json"),
            merge_metrics=str(mdir / "merge.json"),
            out=str(MET / "arms" / f"{a.name}.json"),
        )
    )
    shutil.rmtree(work, ignore_errors=True)  # keep only the merged model and the metrics
    return 0


# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    def stage(command, func, help_, **paths):
        sp = sub.add_parser(command, help=help_, description=help_)
        sp.add_argument(
            "--params", default="params.yaml", help="params file (default: params.yaml)"
        )
        for key, default in paths.items():
            sp.add_argument(
                f"--{key.replace('_', '-')}",
                dest=key,
                default=default,
                help=f"(default: {default})",
            )

        def run(args, _f=func):
            _setup_logging()
            return _f(args)

        sp.set_defaults(func=run)

    stage("check", cmd_check, cmd_check.__doc__, out="")
    stage("base", cmd_base, cmd_base.__doc__, out=f"{ART}/base", metrics=f"{MET}/base.json")
    stage("data", cmd_data, cmd_data.__doc__, out=f"{ART}/data", metrics=f"{MET}/data.json")
    stage(
        "prune",
        cmd_prune,
        cmd_prune.__doc__,
        base=f"{ART}/base",
        data=f"{ART}/data",
        out=f"{ART}/pruned",
        metrics=f"{MET}/prune.json",
    )
    stage(
        "align",
        cmd_align,
        cmd_align.__doc__,
        pruned=f"{ART}/pruned",
        data=f"{ART}/data",
        out=f"{ART}/aligned",
        checkpoints=f"{ART}/checkpoints/align",
        metrics=f"{MET}/align.json",
        plots=f"{PLOTS}/loss/align.csv",
    )
    stage(
        "train",
        cmd_train,
        cmd_train.__doc__,
        model=f"{ART}/aligned",
        data=f"{ART}/data",
        out=f"{ART}/adapter_pruned",
        arm="loram",
        checkpoints=f"{ART}/checkpoints/train",
        metrics=f"{MET}/train/loram.json",
        plots=f"{PLOTS}/loss/loram.csv",
    )
    stage(
        "recover",
        cmd_recover,
        cmd_recover.__doc__,
        adapter=f"{ART}/adapter_pruned",
        pruned=f"{ART}/aligned",
        base=f"{ART}/base",
        out=f"{ART}/adapter",
    )
    stage(
        "merge",
        cmd_merge,
        cmd_merge.__doc__,
        base=f"{ART}/base",
        adapter=f"{ART}/adapter",
        pruned=f"{ART}/aligned",
        out=f"{ART}/merged",
        metrics=f"{MET}/merge.json",
    )
    stage(
        "evaluate",
        cmd_evaluate,
        cmd_evaluate.__doc__,
        model=f"{ART}/merged",
        adapter="",
        tokenizer="",
        data=f"{ART}/data",
        arm="loram",
        kind="loram",
        description="",
        train_metrics="",
        merge_metrics="",
        out=f"{MET}/arms/loram.json",
    )
    stage(
        "variant",
        cmd_variant,
        cmd_variant.__doc__,
        name=None,
        base=f"{ART}/base",
        data=f"{ART}/data",
        out=f"{ART}/variants",
    )


def main_stage(name: str) -> None:
    """Entry point of ``stages/<name>.py``."""
    import sys

    from loram.cli import main

    sys.exit(main([name, *sys.argv[1:]]))


__all__ = ["add_parser", "main_stage", "argparse"]
