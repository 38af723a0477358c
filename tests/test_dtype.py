"""``base.dtype`` flows end to end: a tiny pipeline run in bfloat16 saves every model artifact in
bfloat16 (each stage reads the dtype from its input directory), keeps the LoRA adapters in
float32, and merges W + scale·B·A in fp32 with a single rounding to bfloat16; a float32 run
stays float32 everywhere.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tinyproject import SOURCES, WORDS, write_sources

from loram.cli import main
from loram.models import artifact_dtype, resolve_dtype

PARAMS = {
    "base": {"model": "tiny-llama", "dtype": "bfloat16"},
    "data": SOURCES,
    "prune": {"ratio": 0.5, "calib_samples": 2, "calib_seq_len": 64},
    # A large alignment lr so that the 2 steps move weights by more than a bf16 ulp.
    "align": {
        "max_steps": 2,
        "lr": 1e-2,
        "warmup_steps": 0,
        "micro_batch": 2,
        "seq_len": 64,
        "save_every": 2,
        "max_val_blocks": 2,
    },
    "train": {
        "lr": 1e-2,
        "max_steps": 3,
        "warmup_steps": 0,
        "micro_batch": 2,
        "seq_len": 96,
        "save_every": 3,
        "eval_every": 3,
        "max_val_rows": 2,
    },
    "eval": {"ppl_max_rows": 2, "ppl_seq_len": 64, "batch_size": 2, "tasks": []},
}

SEMI = {"method": "semi", "criterion": "wanda", "n": 2, "m": 4}


def _write_project(root: Path, dtype: str) -> None:
    write_sources(root, n_train=16, n_ood=4, n_align=24)
    params = {**PARAMS, "base": {**PARAMS["base"], "dtype": dtype}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    semi = {**params, "prune": {**params["prune"], **SEMI}}
    (root / "params_semi.yaml").write_text(yaml.safe_dump(semi, sort_keys=False))


def _stages(semi: bool) -> list[list[str]]:
    a = "artifacts"
    out = [
        ["base", "--out", f"{a}/base", "--metrics", "metrics/base.json"],
        ["data", "--out", f"{a}/data", "--metrics", "metrics/data.json"],
        ["prune", "--base", f"{a}/base", "--data", f"{a}/data", "--out", f"{a}/pruned",
         "--metrics", "metrics/prune.json"],
        ["align", "--pruned", f"{a}/pruned", "--data", f"{a}/data", "--out", f"{a}/aligned",
         "--checkpoints", f"{a}/checkpoints/align", "--metrics", "metrics/align.json",
         "--plots", "plots/align.csv"],
        ["train", "--model", f"{a}/aligned", "--data", f"{a}/data", "--out",
         f"{a}/adapter_pruned", "--checkpoints", f"{a}/checkpoints/train", "--metrics",
         "metrics/train.json", "--plots", "plots/train.csv"],
        ["recover", "--adapter", f"{a}/adapter_pruned", "--pruned", f"{a}/aligned", "--base",
         f"{a}/base", "--out", f"{a}/adapter"],
        ["merge", "--base", f"{a}/base", "--adapter", f"{a}/adapter", "--pruned",
         f"{a}/aligned", "--out", f"{a}/merged", "--metrics", "metrics/merge.json"],
    ]  # fmt: skip
    if semi:
        out += [
            ["evaluate", "--model", f"{a}/merged", "--data", f"{a}/data", "--out",
             "metrics/arms/loram.json"],
            ["prune", "--params", "params_semi.yaml", "--base", f"{a}/base", "--data",
             f"{a}/data", "--out", f"{a}/pruned_semi", "--metrics", "metrics/prune_semi.json"],
            ["align", "--params", "params_semi.yaml", "--pruned", f"{a}/pruned_semi", "--data",
             f"{a}/data", "--out", f"{a}/aligned_semi", "--checkpoints",
             f"{a}/checkpoints/align_semi", "--metrics", "metrics/align_semi.json", "--plots",
             "plots/align_semi.csv"],
        ]  # fmt: skip
    return out


def _build(root: Path, dtype: str, semi: bool) -> Path:
    _write_project(root, dtype)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv in _stages(semi):
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    return root / "artifacts"


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("bf16"), "bfloat16", semi=True)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("fp32"), "float32", semi=False)


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _float_dtypes(d: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype of every floating tensor in the directory's files."""
    out = {}
    files = sorted(d.glob("*.safetensors"))
    assert files, f"no safetensors in {d}"
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                dt = fh.get_slice(k).get_dtype()
                if dt in FLOAT_DTYPES or dt.startswith("F8"):
                    out[f"{f.name}:{k}"] = dt
    assert out, f"no floating tensor in {d}"
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


MODELS = ("base", "pruned", "aligned", "merged", "pruned_semi", "aligned_semi")


@pytest.mark.parametrize("name", MODELS)
def test_bf16_run_saves_every_model_in_bf16(bf16, name):
    d = bf16 / name
    bad = {k: v for k, v in _float_dtypes(d).items() if v != "BF16"}
    assert not bad, f"{name}: not bfloat16: {sorted(bad.items())[:5]}"
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    assert artifact_dtype(d) == torch.bfloat16


@pytest.mark.parametrize("name", ["adapter_pruned", "adapter"])
def test_bf16_run_keeps_adapters_in_fp32(bf16, name):
    bad = {k: v for k, v in _float_dtypes(bf16 / name).items() if v != "F32"}
    assert not bad, f"{name}: LoRA weights not fp32: {sorted(bad.items())[:5]}"


def _reference_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """W + (alpha / r)·B·A in fp32 for every adapted weight, from the files alone (no peft)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not cfg.get("use_rslora") and not cfg.get("use_dora")
    scale = cfg["lora_alpha"] / cfg["r"]
    w = {k: t.float() for k, t in _tensors(base / "model.safetensors").items()}
    lora = _tensors(adapter / "adapter_model.safetensors")
    out = dict(w)
    for k, a in lora.items():
        if ".lora_A." not in k:
            continue
        module = k.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = lora[k.replace(".lora_A.", ".lora_B.")]
        assert a.dtype == b.dtype == torch.float32
        out[f"{module}.weight"] = w[f"{module}.weight"] + (b @ a) * scale
    assert len(out) == len(w) and any(".lora_A." in k for k in lora)
    return out


def test_bf16_merge_is_the_fp32_merge_rounded_once(bf16, tmp_path):
    ref = _reference_merge(bf16 / "base", bf16 / "adapter")
    base = _tensors(bf16 / "base" / "model.safetensors")
    merged = _tensors(bf16 / "merged" / "model.safetensors")
    assert set(merged) == set(ref)
    changed = 0
    for k, want in ref.items():
        got = merged[k]
        assert got.dtype == torch.bfloat16, k
        # Half an ulp of bf16 (8 significant bits) at the exact value's magnitude.
        bound = want.abs() * 2.0**-8
        err = (got.float() - want).abs()
        assert torch.all(err <= bound), f"{k}: max error {err.max()} > {bound.max()}"
        if torch.equal(got, base[k]):
            continue
        changed += 1
        assert not torch.equal(want, base[k].float()), f"{k} changed without an update"
    assert changed > 0, "the merge changed nothing"

    # An explicit merge.dtype override: float32 output of a bf16 base is the exact fp32 merge.
    from loram.merge import merge_to_dir

    out = merge_to_dir(bf16 / "base", bf16 / "adapter", tmp_path / "m32", dtype="float32")
    got32 = _tensors(out / "model.safetensors")
    assert artifact_dtype(out) == torch.float32
    for k, want in ref.items():
        assert got32[k].dtype == torch.float32
        torch.testing.assert_close(got32[k], want, rtol=1e-6, atol=1e-7)


def test_bf16_alignment_moves_weights_and_keeps_sparsity(bf16):
    from loram.prune.artifact import read_manifest
    from loram.prune.masks import load_masks

    for pruned, aligned in (("pruned", "aligned"), ("pruned_semi", "aligned_semi")):
        before = _tensors(bf16 / pruned / "model.safetensors")
        after = _tensors(bf16 / aligned / "model.safetensors")
        moved = sum(not torch.equal(before[k], after[k]) for k in before)
        assert moved > 0, f"{aligned}: alignment updates were lost in the bf16 rounding"
    manifest = read_manifest(bf16 / "aligned_semi")
    masks = load_masks(bf16 / "aligned_semi" / manifest["masks_file"])
    after = _tensors(bf16 / "aligned_semi" / "model.safetensors")
    assert masks
    for path, keep in masks.items():
        assert torch.all(after[f"{path}.weight"][~keep] == 0), path


def test_bf16_evaluate_runs_in_bf16(bf16):
    rec = json.loads((bf16.parent / "metrics" / "arms" / "loram.json").read_text())
    assert rec["ppl"] and all(math.isfinite(v) for v in rec["ppl"].values())
    assert json.loads((bf16.parent / "metrics" / "base.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((bf16.parent / "metrics" / "train.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((bf16.parent / "metrics" / "merge.json").read_text())["dtype"] == "bfloat16"


def test_fp32_run_stays_fp32(fp32):
    for name in ("base", "pruned", "aligned", "adapter_pruned", "adapter", "merged"):
        bad = {k: v for k, v in _float_dtypes(fp32 / name).items() if v != "F32"}
        assert not bad, f"{name}: not float32: {sorted(bad.items())[:5]}"


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_dtype("auto") == torch.float32  # AVX2 CPU: bf16 is emulated, slow
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_dtype("auto") == torch.bfloat16  # native bf16 on the CPU
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto") == torch.float32
    with pytest.raises(ValueError, match="float8"):
        resolve_dtype("float8")


def test_artifact_dtype_falls_back_to_the_weights(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.zeros(2, dtype=torch.float16)}, str(d / "model.safetensors"))
    assert artifact_dtype(d) == torch.float16
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    assert artifact_dtype(d) == torch.bfloat16


def test_qloram_on_a_bf16_base_computes_in_bf16_with_fp32_lora(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from loram.config import TrainParams
    from loram.prune.structured import prune_structured
    from loram.tiny import TINY_VOCAB, tiny_llama, tiny_tokenizer
    from loram.train import train_lora

    model = tiny_llama(vocab=TINY_VOCAB)
    prune_structured(model, 0.5, [1, 2, 3, 4], "random", progress=False)
    model = model.to(torch.bfloat16)
    rows = [{"prompt": f"say {w}", "response": f"{w} " * 4} for w in WORDS]
    p = TrainParams(
        r=4, max_steps=2, warmup_steps=0, micro_batch=2, seq_len=48, save_every=2,
        eval_every=2, max_val_rows=2, quantize="nf4",
    )  # fmt: skip
    res = train_lora(model, tiny_tokenizer(), rows, rows[:2], p, tmp_path / "a", tmp_path / "c")
    assert res["dtype"] == "bfloat16" and math.isfinite(res["final_val_loss"])
    q = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert q and all(m.compute_dtype == torch.bfloat16 for m in q)
    lora = [(n, t) for n, t in model.named_parameters() if "lora_" in n]
    assert lora and all(t.dtype == torch.float32 for _, t in lora)
    assert set(_float_dtypes(tmp_path / "a").values()) == {"F32"}
