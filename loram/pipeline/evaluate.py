"""Stage ``evaluate@ARM``: perplexities and lm-eval benchmarks of one arm, joined with its
training cost.

Three outputs: ``--out`` (the arm's metrics: numbers only, what ``dvc metrics diff`` compares:
scores with standard errors and 95% intervals, perplexities with bootstrap intervals, costs)
and, in ``--details`` (default ``metrics/details/<arm>``, next to the metrics),
``samples.jsonl`` (one record per document: lm-eval's per-document scores and responses, the
per-document perplexity losses) and ``provenance.json`` (task versions, splits, data digests,
seeds, sandbox mode; no machine paths)."""

from __future__ import annotations

import time
from pathlib import Path

from loram.config import EvalParams
from loram.fsio import check_output_file
from loram.pipeline.common import log, need_file, read_json, skipped_reason, write_metrics

NAME = "evaluate"
SECTIONS = ("eval",)
OVERRIDES = "arms"
"""``--name NAME``: the stage of ``arms.NAME`` (its overrides on the shared sections)."""
OPTIONS = {
    "name": "",
    "model": "artifacts/merged",
    "adapter": "",
    "tokenizer": "",
    "data": "artifacts/data",
    "arm": "loram",
    "kind": "loram",
    "description": "",
    "train_metrics": "",
    "merge_metrics": "",
    "out": "metrics/arms/loram.json",
    "details": "",
    "tasks": "",
}
"""``--tasks``: ``none`` (perplexity only) or comma-separated benchmarks in place of
``eval.tasks``; the ablation stages use ``none``, as the paper's ablations report perplexity."""

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
    "train_peak_rss_mib",
    "train_seconds",
    "samples_per_second",
)


def _with_tasks(p: EvalParams, tasks: str) -> EvalParams:
    """``p`` with ``tasks`` (``none`` or ``a,b``) in place of ``eval.tasks``, validated."""
    from loram.config import parse_section, to_dict

    chosen = [] if tasks == "none" else [t.strip() for t in tasks.split(",") if t.strip()]
    return parse_section(EvalParams, {**to_dict(p), "tasks": chosen}, "--tasks")


def _needs_sandbox(p: EvalParams) -> bool:
    from loram.evaluate.harness import expand_tasks

    return p.source == "local" and "humaneval" in expand_tasks(p.tasks)


def evaluate_model(
    model_dir: str,
    adapter: str | None,
    data_dir: str,
    p: EvalParams,
    tokenizer_dir: str | None = None,
) -> dict:
    """Perplexities and lm-eval benchmarks of one model (a merged dir, or pruned dir + adapter).

    Returns ``{"ppl", "ppl_ci95", "bench", "eval_seconds"}`` (numbers) plus ``"provenance"``
    and ``"samples"`` (per-document records), which ``run`` writes to the details folder."""
    import torch

    from loram.data import read_jsonl
    from loram.evaluate.perplexity import perplexity
    from loram.models import check_adapter_dir, default_device, load_hf_model, load_tokenizer

    data = Path(data_dir)
    for name in ("val.jsonl", "align_val.jsonl"):
        need_file(data / name, "evaluation data")
    if adapter:
        check_adapter_dir(adapter)
    if p.tasks and _needs_sandbox(p):
        from loram.evaluate.sandbox import require

        require(p.sandbox)  # fail closed before any model work
    # Both load in the dtype the directory was saved in (the base stage's); an adapter on top
    # stays fp32 (peft upcasts bf16 / fp16 adapters) and the loss upcasts the logits.
    if (Path(model_dir) / "loram_manifest.json").exists():
        from loram.prune.artifact import load_pruned_with_masks

        model, _, _ = load_pruned_with_masks(model_dir)
    else:
        model = load_hf_model(model_dir)
    tok = load_tokenizer(tokenizer_dir or model_dir)
    if adapter:
        from peft import PeftModel

        from loram.merge import precheck_adapter

        precheck_adapter(model, adapter)
        model = PeftModel.from_pretrained(model, adapter)
    model.to(default_device()).eval()
    sets = {"in_domain": read_jsonl(data / "val.jsonl")[: p.ppl_max_rows]}
    for f in sorted(data.glob("ood_*.jsonl")):
        sets[f.stem] = read_jsonl(f)[: p.ppl_max_rows]
    sets["general_text"] = read_jsonl(data / "align_val.jsonl")[: p.ppl_max_rows]
    t0 = time.time()
    samples: list[dict] = []
    ppl, ppl_ci, ppl_prov = {}, {}, {}
    with torch.no_grad():
        for k, rows in sets.items():
            r = perplexity(model, tok, rows, p.ppl_seq_len, p.batch_size)
            ppl[k] = r["ppl"]
            ppl_ci[k] = {"low": r["ppl_ci95_low"], "high": r["ppl_ci95_high"]}
            ppl_prov[k] = {"rows": r["rows"], "tokens": r["tokens"]}
            samples += [
                {"task": f"ppl/{k}", "doc_id": i, "nll": nll, "tokens": n}
                for i, (nll, n) in enumerate(r["documents"])
            ]
    log.info("perplexity %s (%.0fs)", ppl, time.time() - t0)
    out: dict = {"ppl": ppl, "ppl_ci95": ppl_ci}
    provenance: dict = {"ppl": {"seq_len": p.ppl_seq_len, "sets": ppl_prov}}
    if p.tasks:
        from loram.evaluate.harness import run_benchmarks

        if adapter:
            model = model.merge_and_unload()  # lm-eval wants a plain model; same function
        gen = {"max_gen_toks": p.max_gen_toks} if p.max_gen_toks else None
        bench = run_benchmarks(
            model,
            tok,
            tasks=p.tasks,
            source=p.source,
            limit=p.limit or None,
            num_fewshot=p.num_fewshot or None,
            batch_size=p.batch_size,
            gen_batch_size=p.gen_batch_size,
            gen_kwargs=gen,
            humaneval_n=p.humaneval_n,
            humaneval_temperature=p.humaneval_temperature,
            humaneval_top_p=p.humaneval_top_p,
            seed=p.seed,
            log_samples=True,
            sandbox=p.sandbox,
            mathqa_path=p.mathqa.path,
        )
        provenance["bench"] = bench.pop("metadata")
        samples += bench.pop("samples")
        out["bench"] = {k: v for k, v in bench.items() if v is not None}
    out["eval_seconds"] = round(time.time() - t0, 1)
    out["provenance"] = provenance
    out["samples"] = samples
    return out


def details_dir(out: str) -> Path:
    """Default details folder of an arm's metrics file: metrics/arms/X.json -> metrics/details/X."""
    path = Path(out)
    return path.parent.parent / "details" / path.stem


def write_details(folder: str | Path, provenance: dict, samples: list[dict]) -> None:
    """``provenance.json`` and ``samples.jsonl`` of one arm, atomically (one folder)."""
    import json

    from loram.fsio import atomic_dir, dumps

    with atomic_dir(Path(folder), NAME) as tmp:
        (tmp / "provenance.json").write_text(dumps(provenance), encoding="utf-8")
        (tmp / "samples.jsonl").write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in samples), encoding="utf-8"
        )


def run(
    p: EvalParams,
    *,
    model: str,
    adapter: str = "",
    tokenizer: str = "",
    data: str,
    arm: str,
    kind: str,
    description: str = "",
    train_metrics: str = "",
    merge_metrics: str = "",
    out: str,
    details: str = "",
    name: str = "",
    spec=None,
    tasks: str = "",
) -> dict:
    check_output_file(out, (".json",), "--out")
    if tasks:
        p = _with_tasks(p, tasks)
    details_path = Path(details) if details else details_dir(out)
    if not description and spec is not None:
        description = spec.description
    for opt, value in (("--train-metrics", train_metrics), ("--merge-metrics", merge_metrics)):
        if value:
            check_output_file(value, (".json",), opt)
    why = skipped_reason(model)
    if why:  # the arm's training was switched off (baselines.lora_full): record that, no model
        rec = {"arm": arm, "kind": kind, "description": description, "skipped": why}
        write_details(details_path, {"arm": arm, "skipped": why}, [])
        write_metrics(out, rec, "--out")
        return rec
    tm = read_json(train_metrics) if train_metrics else {}
    res = evaluate_model(model, adapter or None, data, p, tokenizer_dir=tokenizer or None)
    rec = {"arm": arm, "kind": kind, "description": description}
    rec.update({k: tm[k] for k in ARM_FIELDS if k in tm})
    if merge_metrics and Path(merge_metrics).exists():
        mm = read_json(merge_metrics)
        if "sparsity_pruned_after" in mm:
            # Real sparsity of the pruned layers while training, and of the merged model.
            rec["sparsity"] = mm["sparsity_pruned_before"]
            rec["sparsity_merged"] = mm["sparsity_pruned_after"]
            rec["merge_target"] = mm.get("target", "original")
    provenance = {"arm": arm, **res.pop("provenance")}
    samples = res.pop("samples")
    rec.update(res)
    write_details(details_path, provenance, samples)
    write_metrics(out, rec, "--out")
    return rec
