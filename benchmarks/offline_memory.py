#!/usr/bin/env python
"""Peak memory and time of the offline stages (prune, recover, merge), each in a FRESH process.

Every measured command is the project's own CLI stage (``loram prune`` / ``recover`` /
``merge``, which stream: ``loram.prune.stream``, ``loram.merge``) run as a child process; its
peak RSS is the kernel's ``ru_maxrss`` of that child (``os.wait4``), so nothing of this script
or of an earlier stage counts. With ``--in-memory`` the old whole-model paths (load, prune /
merge in memory, ``save_pretrained``) are measured the same way, for comparison.

    python benchmarks/offline_memory.py --base artifacts/base                 # a bf16/fp32 HF dir
    python benchmarks/offline_memory.py --base DIR --only prune:wanda,merge --in-memory
    python benchmarks/offline_memory.py --base DIR --out metrics/bench/offline_memory.json

Measured: prune with random / magnitude (structured), Taylor (structured), Wanda / SparseGPT /
magnitude (unstructured); recover and merge of a LoRA adapter (rank ``--rank`` on the seven
projections, random values: what it holds does not change the memory) on the ``--merge-on``
model. The adapter is written directly in the pruned shapes with the provenance ``train``
records, so ``recover`` and ``merge`` run their checks as in the pipeline.

The targets of issue 12 (for Qwen2.5-Coder-1.5B-Instruct in bf16, about 3.5 GB as loaded,
untied) are printed next to the figures: recover and merge <= 1.5 GB; Wanda / SparseGPT /
magnitude / random pruning <= 2.0 GB; Taylor <= 1.3 x the model's bytes + the calibration
activations (the hidden states at the layer boundaries: ``(L - first + 1) x samples x seq_len
x hidden x 4`` bytes). GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
PRUNES = {
    # name: (method, criterion)
    "random": ("random", "auto"),
    "magnitude-stru": ("structured", "magnitude"),
    "taylor": ("structured", "taylor"),
    "wanda": ("unstructured", "wanda"),
    "sparsegpt": ("unstructured", "sparsegpt"),
    "magnitude": ("unstructured", "magnitude"),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` as a child; its peak RSS (bytes), wall seconds and exit status."""
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "seconds": round(time.time() - t0, 1),
        "rc": proc.returncode,
        "log": str(log),
    }
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        print(f"  FAILED (rc {proc.returncode}): {' '.join(cmd)}\n    " + "\n    ".join(tail))
    return res


def loram(*args: str) -> list[str]:
    return [sys.executable, "-m", "loram.cli", *args]


def model_facts(base: Path, calib_samples: int, calib_seq_len: int) -> dict:
    from loram.models import load_config
    from loram.prune.common import pruned_layers
    from loram.shards import ShardReader

    r = ShardReader(base)
    import torch  # noqa: F401  (dtype sizes)

    size = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}
    nbytes = 0
    for k in r.keys():
        n = 1
        for s in r.shape(k):
            n *= s
        nbytes += n * size.get(r.dtype_name(k), 4)
    cfg = load_config(base)
    first = pruned_layers(cfg.num_hidden_layers)[0]
    acts = (cfg.num_hidden_layers - first + 1) * calib_samples * calib_seq_len * cfg.hidden_size * 4
    return {
        "model_bytes": nbytes,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "calib_activation_bytes": acts,
        "dtype": r.dtype_name(next(iter(r.keys()))),
    }


def write_adapter(pruned: Path, out: Path, rank: int, seed: int = 0) -> None:
    """A LoRA adapter in the pruned model's shapes, with the provenance ``train`` writes."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from loram.fsio import dumps
    from loram.prune.artifact import structure_digest
    from loram.shards import ShardReader

    reader = ShardReader(pruned)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in reader.keys():
        if not key.endswith("_proj.weight") or ".layers." not in key:
            continue
        path = key[: -len(".weight")]
        n_out, n_in = reader.shape(key)
        sd[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.01
        sd[f"base_model.model.{path}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "adapter_model.safetensors"), {"format": "pt"})
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJ), lora_dropout=0.0)
    cfg.base_model_name_or_path = str(pruned)
    cfg.save_pretrained(str(out))
    prov = {
        "pruned": True,
        "trained_on": {"structure": structure_digest(pruned), "model_dir": str(pruned)},
    }
    (out / "loram_train.json").write_text(dumps(prov), encoding="utf-8")


INMEM_PRUNE = r"""
import sys, torch
from loram.models import artifact_dtype, load_model
from loram.prune.common import pruned_layers
from loram.prune.artifact import save_pruned
from loram.pipeline.prune import calibration_batches
from loram.data import read_jsonl
base, data, out, method, crit, ratio, ns, sl = sys.argv[1:9]
model, tok = load_model(base, dtype=artifact_dtype(base))
layers = pruned_layers(model.config.num_hidden_layers)
calib = calibration_batches(tok, read_jsonl(data + "/train.jsonl"), int(ns), int(sl), 0) if crit in ("taylor", "wanda", "sparsegpt") else None
if method in ("structured", "random"):
    from loram.prune.structured import prune_structured
    man = prune_structured(model, float(ratio), layers, criterion=crit, calib_batches=calib)
    save_pruned(model, man, out, tokenizer=tok)
else:
    from loram.prune.masks import save_masks
    from loram.prune.sparse import prune_sparse, sparse_manifest, sparsity_report
    masks = prune_sparse(model, layers, pattern="unstructured", ratio=float(ratio), criterion=crit, calib_batches=calib)
    man = sparse_manifest(model, layers, pattern="unstructured", criterion=crit, ratio=float(ratio), sparsity=sparsity_report(model, masks))
    save_pruned(model, man, out, tokenizer=tok, extra_files={man["masks_file"]: lambda p: save_masks(p, masks)})
"""

INMEM_MERGE = r"""
import sys
from loram.merge import merge_to_dir
merge_to_dir(sys.argv[1], sys.argv[2], sys.argv[3], streaming=False)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the original model: a HF safetensors dir")
    ap.add_argument("--data", default=None, help="a data stage output (default: made under --work)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir, removed)")
    ap.add_argument("--only", default="", help="comma list of prune:NAME, recover, merge")
    ap.add_argument("--ratio", type=float, default=0.65)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--merge-on",
        default="taylor",
        choices=sorted(PRUNES),
        help="the pruned model the recovered / merged adapter was 'trained' on (default taylor)",
    )
    ap.add_argument("--in-memory", action="store_true", help="also measure the old paths")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    base = Path(args.base).resolve()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="loram-offline-")
        work = Path(tmp.name)
    else:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    def wanted(name: str) -> bool:
        return not only or name in only

    facts = model_facts(base, args.calib_samples, args.calib_seq_len)
    mb = facts["model_bytes"]
    print(
        f"model {base}: {mb / GB:.3f} GB of weights ({facts['dtype']}), {facts['layers']} layers; "
        f"Taylor calibration activations {facts['calib_activation_bytes'] / GB:.3f} GB "
        f"({args.calib_samples} x {args.calib_seq_len} tokens)"
    )
    data = Path(args.data).resolve() if args.data else work / "data"
    if not args.data and not (data / "train.jsonl").is_file():
        subprocess.run(
            loram("data", "--out", str(data), "--metrics", str(work / "data.json")),
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )

    rows = []
    targets = {
        "prune": 2.0 * GB,
        "recover": 1.5 * GB,
        "merge": 1.5 * GB,
        "taylor": 1.3 * mb + facts["calib_activation_bytes"],
    }

    def record(stage, variant, path, res):
        key = "taylor" if variant == "taylor" else stage
        res.update(stage=stage, variant=variant, path=path, target_bytes=targets[key])
        res["meets"] = res["rc"] == 0 and res["peak_rss_bytes"] <= targets[key]
        rows.append(res)
        print(
            f"  {stage:8s} {variant:15s} {path:9s} peak RSS {res['peak_rss_bytes'] / GB:6.3f} GB  "
            f"{res['seconds']:7.1f} s  target <= {targets[key] / GB:.2f} GB: "
            f"{'yes' if res['meets'] else 'NO'}",
            flush=True,
        )

    for name, (method, crit) in PRUNES.items():
        need = name == args.merge_on and (wanted("recover") or wanted("merge"))
        if not (wanted(f"prune:{name}") or need):
            continue
        params = work / f"prune-{name}.yaml"
        params.write_text(
            json.dumps(
                {
                    "prune": {
                        "method": method,
                        "criterion": crit,
                        "ratio": args.ratio,
                        "calib_samples": args.calib_samples,
                        "calib_seq_len": args.calib_seq_len,
                    }
                }
            )
        )
        out = work / f"pruned-{name}"
        res = run_measured(
            loram(
                "prune",
                "--params",
                str(params),
                "--base",
                str(base),
                "--data",
                str(data),
                "--out",
                str(out),
                "--metrics",
                str(work / f"prune-{name}.json"),
            ),
            work / f"prune-{name}.log",
            env,
        )
        record("prune", name, "stream", res)
        if args.in_memory and wanted(f"prune:{name}"):
            res = run_measured(
                [
                    sys.executable,
                    "-c",
                    INMEM_PRUNE,
                    str(base),
                    str(data),
                    str(work / f"mem-{name}"),
                    method,
                    "random" if method == "random" else crit,
                    str(args.ratio),
                    str(args.calib_samples),
                    str(args.calib_seq_len),
                ],
                work / f"prune-{name}-mem.log",
                env,
            )
            record("prune", name, "in-memory", res)

    pruned = work / f"pruned-{args.merge_on}"
    if wanted("recover") or wanted("merge"):
        adapter = work / "adapter-pruned"
        write_adapter(pruned, adapter, args.rank)
        rec = work / "adapter"
        params = work / "rm.yaml"
        params.write_text(json.dumps({"recover": {}, "merge": {}}))
        res = run_measured(
            loram(
                "recover",
                "--params",
                str(params),
                "--adapter",
                str(adapter),
                "--pruned",
                str(pruned),
                "--base",
                str(base),
                "--out",
                str(rec),
            ),
            work / "recover.log",
            env,
        )
        record("recover", f"rank {args.rank}", "stream", res)
        if wanted("merge"):
            res = run_measured(
                loram(
                    "merge",
                    "--params",
                    str(params),
                    "--base",
                    str(base),
                    "--adapter",
                    str(rec),
                    "--pruned",
                    str(pruned),
                    "--out",
                    str(work / "merged"),
                    "--metrics",
                    str(work / "merge.json"),
                ),
                work / "merge.log",
                env,
            )
            record("merge", f"rank {args.rank}", "stream", res)
            if args.in_memory:
                res = run_measured(
                    [
                        sys.executable,
                        "-c",
                        INMEM_MERGE,
                        str(base),
                        str(rec),
                        str(work / "mem-merged"),
                    ],
                    work / "merge-mem.log",
                    env,
                )
                record("merge", f"rank {args.rank}", "in-memory", res)

    print("\n| stage | variant | path | peak RSS (GB) | seconds | target (GB) | meets |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['variant']} | {r['path']} | {r['peak_rss_bytes'] / GB:.3f} | "
            f"{r['seconds']} | {r['target_bytes'] / GB:.2f} | {'yes' if r['meets'] else 'no'} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"model": str(base), **facts, "rows": rows}, indent=2) + "\n"
        )
    if tmp is not None:
        tmp.cleanup()
    return 1 if any(r["rc"] != 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
