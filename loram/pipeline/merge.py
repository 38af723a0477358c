"""Stage ``merge``: the recovered adapter merged into the original, unpruned model (or, for
sparse arms with ``merge.target: pruned``, into the sparse model); the sparsity of the pruned
layers is reported against their masks."""

from __future__ import annotations

from pathlib import Path

from loram.config import MergeParams, RecoverParams
from loram.errors import ArtifactError
from loram.pipeline.common import (
    check_outputs,
    log,
    skipped_reason,
    write_metrics,
    write_skipped,
)

NAME = "merge"
SECTIONS = ("recover", "merge")
OVERRIDES = "arms"
"""``--name NAME``: the stage of ``arms.NAME`` (its overrides on the shared sections)."""
OPTIONS = {
    "name": "",
    "base": "artifacts/base",
    "adapter": "artifacts/adapter",
    "pruned": "artifacts/aligned",
    "out": "artifacts/merged",
    "metrics": "metrics/merge.json",
}


def run(
    rp: RecoverParams,
    mp: MergeParams,
    *,
    base: str,
    adapter: str,
    pruned: str,
    out: str,
    metrics: str,
    name: str = "",
) -> dict:
    """``pruned``: the pruned directory the adapter was trained on, or ``none`` (plain LoRA)."""
    from loram.merge import merge_to_dir
    from loram.models import artifact_dtype, check_adapter_dir, dtype_name
    from loram.prune.artifact import read_manifest
    from loram.recover import check_provenance, read_provenance

    check_outputs("merge", out, [base, adapter, pruned], metrics=metrics)
    why = skipped_reason(adapter)
    if why:  # the adapter's stage was switched off (baselines.lora_full): pass that on
        write_skipped(out, "merge", why, [base, adapter])
        write_metrics(metrics, {"skipped": why})
        return {"skipped": why}
    check_adapter_dir(adapter)
    has_pruned = pruned not in ("", "none")
    manifest = read_manifest(pruned) if has_pruned else {}
    prov = read_provenance(adapter) or {}
    if prov.get("pruned") and not prov.get("recovered"):
        raise ArtifactError(
            f"adapter {adapter!r} has the shapes of the pruned model it was trained on "
            f"({(prov.get('trained_on') or {}).get('model_dir', '?')}); recover it first with "
            "`loram recover`"
        )
    if has_pruned:
        check_provenance(adapter, pruned, recovered=True)
    masks = None
    if manifest.get("masks_file"):
        from loram.prune.masks import open_masks

        masks = open_masks(Path(pruned) / manifest["masks_file"])  # unpacked one at a time
    if mp.target == "pruned" and masks is None:
        raise ValueError(
            f"merge.target = 'pruned' needs a semi / unstructured pruned model, not "
            f"{manifest.get('method') or 'none'!r}: structured pruning changes the shapes"
        )
    target_dir = pruned if mp.target == "pruned" else base
    use_masks = masks if (masks is not None and rp.mask_update) else None
    # merge.dtype auto: the target's own dtype (from its config.json), so the merged model is
    # in the base stage's dtype; the sum W + scale·B·A itself is fp32 (see loram.merge).
    merge_to_dir(target_dir, adapter, out, dtype=mp.dtype, masks=use_masks)
    info: dict = {
        "method": manifest.get("method"),
        "dtype": dtype_name(artifact_dtype(out)),
        "target": mp.target,
        "mask_update": rp.mask_update,
    }
    if masks is not None:
        info.update(_sparsity(out, manifest, masks, mp.target))
    write_metrics(metrics, info)
    return info


def _sparsity(out: str, manifest: dict, masks: dict, target: str) -> dict:
    from loram.prune.sparse import streamed_sparsity

    # Read tensor by tensor from the merged shards, in their own dtype (zeros are exact in any).
    after, vs_mask = streamed_sparsity(out, masks)
    before, val = vs_mask["mask_sparsity"], vs_mask["sparsity"]
    if target == "original":
        log.info(
            "merged into the dense original model (sparsity of the pruned layers %.4f); "
            "merge.target: pruned with recover.mask_update: true keeps a sparse model",
            val,
        )
    elif vs_mask["pruned_nonzero"]:
        log.warning(
            "merging densified the sparse model: %d pruned weights are non-zero (sparsity "
            "of the mask %.4f, of the merged model at the mask's positions %.4f); set "
            "recover.mask_update: true to keep the sparsity pattern",
            vs_mask["pruned_nonzero"],
            before,
            val,
        )
    return {
        "sparsity_before_merge": manifest.get("sparsity"),
        "sparsity_after_merge": after,
        "sparsity_pruned_before": before,
        "sparsity_pruned_after": val,
        "pruned_positions_nonzero": vs_mask["pruned_nonzero"],
        "densified": vs_mask["pruned_nonzero"] > 0,
    }
