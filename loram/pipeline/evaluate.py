"""Stage ``evaluate@ARM``: perplexities and lm-eval benchmarks of one arm, joined with its
training cost."""

from __future__ import annotations

import time
from pathlib import Path

from loram.config import EvalParams
from loram.fsio import check_output_file
from loram.pipeline.common import log, need_file, read_json, write_metrics

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
}

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


def evaluate_model(
    model_dir: str,
    adapter: str | None,
    data_dir: str,
    p: EvalParams,
    tokenizer_dir: str | None = None,
) -> dict:
    """Perplexities and lm-eval benchmarks of one model (a merged dir, or pruned dir + adapter)."""
    import torch

    from loram.data import read_jsonl
    from loram.evaluate.perplexity import perplexity
    from loram.models import check_adapter_dir, default_device, load_hf_model, load_tokenizer

    data = Path(data_dir)
    for name in ("val.jsonl", "align_val.jsonl"):
        need_file(data / name, "evaluation data")
    if adapter:
        check_adapter_dir(adapter)
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
    name: str = "",
    spec=None,
) -> dict:
    check_output_file(out, (".json",), "--out")
    if not description and spec is not None:
        description = spec.description
    for opt, value in (("--train-metrics", train_metrics), ("--merge-metrics", merge_metrics)):
        if value:
            check_output_file(value, (".json",), opt)
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
    rec.update(res)
    write_metrics(out, rec, "--out")
    return rec
