"""Stage ``recover``: scatter the pruned LoRA matrices back to the original shapes."""

from __future__ import annotations

from loram.config import RecoverParams
from loram.pipeline.common import check_outputs

NAME = "recover"
SECTIONS = ("recover",)
OVERRIDES = "arms"
"""``--name NAME``: the stage of ``arms.NAME`` (its overrides on the shared sections)."""
OPTIONS = {
    "name": "",
    "adapter": "artifacts/adapter_pruned",
    "pruned": "artifacts/aligned",
    "base": "artifacts/base",
    "out": "artifacts/adapter",
}


def run(
    p: RecoverParams,
    *,
    adapter: str,
    pruned: str,
    base: str,
    out: str,
    name: str = "",
) -> dict:
    from loram.models import check_model_dir
    from loram.recover import recover_adapter

    check_outputs("recover", out, [adapter, pruned, base])
    if base:
        check_model_dir(base, "base model")
    recover_adapter(
        adapter, pruned, out, base_model_path=base or None, norm_a=p.norm_a, seed=p.seed
    )
    return {"out": out}
