"""Stage ``base``: the configured base model once as a plain safetensors HF directory.

The model is converted tensor by tensor (:mod:`loram.convert`): a GGUF file (the embedded
SmolLM2, an installed Qwen2.5-Coder, a path) or a directory of safetensors (local or a hub
snapshot) is written into shards of at most 512 MiB with an index, so the peak memory is about
one shard plus one tensor, not the model. Other sources load whole through transformers.
"""

from __future__ import annotations

import time

from loram.config import BaseParams
from loram.pipeline.common import check_outputs, write_metrics

NAME = "base"
SECTIONS = ("base",)
OPTIONS = {"out": "artifacts/base", "metrics": "metrics/base.json"}


def run(p: BaseParams, *, out: str, metrics: str) -> dict:
    from loram.convert import convert_model
    from loram.models import dtype_name, resolve_dtype

    check_outputs("base", out, metrics=metrics)
    t0 = time.time()
    # The dtype of every later artifact: each stage reads it back from its input directory's
    # config.json (transformers writes ``dtype`` there), not from params.
    dtype = resolve_dtype(p.dtype)
    res = convert_model(
        p.model, out, gguf_file=p.gguf_file, dtype=dtype, revision=p.revision, command="base"
    )
    out_metrics = {
        "model": p.model,
        "dtype": dtype_name(dtype),
        "model_type": res.model_type,
        "params": res.params,
        "layers": res.layers,
        "streamed": res.streamed,
        "shards": len(res.files),
        "peak_rss_mb": res.peak_rss_mb,
        "seconds": round(time.time() - t0, 1),
    }
    write_metrics(metrics, out_metrics)
    return out_metrics
