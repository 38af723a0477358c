"""Stage ``base``: the configured base model once as a plain safetensors HF directory."""

from __future__ import annotations

import time

from loram.config import BaseParams
from loram.pipeline.common import check_outputs, write_metrics

NAME = "base"
SECTIONS = ("base",)
OPTIONS = {"out": "artifacts/base", "metrics": "metrics/base.json"}


def run(p: BaseParams, *, out: str, metrics: str) -> dict:
    from loram.models import count_params, dtype_name, load_model, resolve_dtype, save_model_dir

    check_outputs("base", out, metrics=metrics)
    t0 = time.time()
    # The dtype of every later artifact: each stage reads it back from its input directory's
    # config.json (transformers writes ``dtype`` there), not from params.
    dtype = resolve_dtype(p.dtype)
    model, tok = load_model(p.model, p.gguf_file, dtype, p.revision)
    save_model_dir(model, tok, out, command="base")
    res = {
        "model": p.model,
        "dtype": dtype_name(dtype),
        "model_type": model.config.model_type,
        "params": count_params(model),
        "layers": model.config.num_hidden_layers,
        "seconds": round(time.time() - t0, 1),
    }
    write_metrics(metrics, res)
    return res
