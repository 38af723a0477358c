"""Sparse variants: merging keeps or loses the sparsity pattern, and the metrics say which."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from loram.cli import main
from loram.prune.artifact import save_pruned
from loram.prune.masks import save_masks
from loram.prune.sparse import prune_sparse, sparse_manifest, sparsity_report
from loram.tiny import tiny_llama


@pytest.fixture(scope="module")
def sparse_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    base = tiny_llama()
    base.save_pretrained(tmp / "base")
    model = tiny_llama()
    layers = [1, 2, 3, 4]
    masks = prune_sparse(
        model, layers, pattern="nm", n=2, m=4, criterion="magnitude", progress=False
    )
    manifest = sparse_manifest(
        model,
        layers,
        pattern="nm",
        criterion="magnitude",
        n=2,
        m=4,
        sparsity=sparsity_report(model, masks),
    )
    save_pruned(model, manifest, tmp / "pruned")
    save_masks(tmp / "pruned" / manifest["masks_file"], masks)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "down_proj"])
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(tmp / "adapter")
    return tmp, masks


def _merge(tmp, target, mask_update, name):
    params = tmp / f"{name}.yaml"
    params.write_text(
        json.dumps({"merge": {"target": target}, "recover": {"mask_update": mask_update}})
    )
    out, metrics = tmp / name, tmp / f"{name}.json"
    rc = main(
        [
            "merge",
            "--params",
            str(params),
            "--base",
            str(tmp / "base"),
            "--adapter",
            str(tmp / "adapter"),
            "--pruned",
            str(tmp / "pruned"),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
        ]
    )
    assert rc == 0
    return load_file(str(out / "model.safetensors")), json.loads(metrics.read_text())


def test_masked_merge_into_sparse_model_keeps_pruned_weights_zero(sparse_setup):
    tmp, masks = sparse_setup
    weights, info = _merge(tmp, "pruned", True, "masked")
    for path, keep in masks.items():
        assert torch.all(weights[path + ".weight"][~keep] == 0), path
    assert info["densified"] is False
    # ratios of exact zero counts (2:4 keeps exactly half): equal, not close
    assert info["sparsity_pruned_after"] == info["sparsity_pruned_before"] == 0.5
    # the update really landed on the kept weights of an adapted module
    pruned = load_file(str(tmp / "pruned" / "model.safetensors"))
    w = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(weights[w], pruned[w])


def test_unmasked_merge_into_sparse_model_is_reported_densified(sparse_setup):
    tmp, masks = sparse_setup
    weights, info = _merge(tmp, "pruned", False, "unmasked")
    assert info["densified"] is True
    assert info["sparsity_pruned_after"] < 0.5
    up = "model.layers.1.mlp.up_proj"
    assert torch.any(weights[up + ".weight"][~masks[up]] != 0)


def test_merge_into_dense_original_and_structured_target_error(sparse_setup, tmp_path, capsys):
    tmp, _ = sparse_setup
    _, info = _merge(tmp, "original", False, "orig")
    assert info["target"] == "original" and info["sparsity_pruned_after"] == 0.0
    p = tmp_path / "p.yaml"
    p.write_text('{"merge": {"target": "pruned"}}')
    rc = main(
        [
            "merge",
            "--params",
            str(p),
            "--base",
            str(tmp / "base"),
            "--adapter",
            str(tmp / "adapter"),
            "--pruned",
            "none",
            "--out",
            str(tmp_path / "x"),
            "--metrics",
            str(tmp_path / "m.json"),
        ]
    )
    assert (
        rc == 2 and "merge.target = 'pruned' needs a semi / unstructured" in capsys.readouterr().err
    )
