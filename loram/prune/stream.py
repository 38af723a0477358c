"""Pruning in bounded memory: one decoder layer at a time, from and to sharded safetensors.

:func:`prune_to_dir` gives the same pruned directory as loading the model, pruning it in
memory (:func:`loram.prune.sparse.prune_sparse` / :func:`loram.prune.structured.prune_structured`)
and saving it with :func:`loram.prune.artifact.save_pruned` — bit for bit the same tensors,
config, manifest and masks (tested on the tiny models) — but never holds the model:

* The model is built on the meta device from its config. The embeddings are loaded only while
  the calibration batches' first-layer inputs are captured (the decoder layers are stubbed, see
  ``loram.prune.sparse._capture``), then dropped.
* Then every decoder layer in turn is loaded from the base's safetensors, pruned (Wanda /
  SparseGPT statistics from the calibration activations, which it then carries to the next
  layer; magnitude; or the kept rows / columns of a structured pruning), written to the output
  shards and released. Embeddings, final norm and lm_head are copied tensor by tensor.
* Sparse masks are packed to one bit per weight as soon as a layer is pruned.

Peak memory: one decoder layer (plus, for SparseGPT, its Hessians), the calibration
activations of one layer boundary, and the embeddings during capture.

Structured Taylor pruning needs the gradient of the LM loss at every pruned weight, summed over
the calibration batches. :func:`taylor_scores` gets exactly the scores of the in-memory pass
(``loram.prune.structured._taylor``, which upcasts the whole model to fp32 and keeps fp32
gradients of every pruned layer: about 2 + 2·(pruned share) times the bf16 model's bytes)
layer-major with recomputation: a forward pass keeps only the hidden states at the layer
boundaries (the calibration activations), then the backward pass walks the layers from the top,
re-running each layer in fp32 on its stored input for every batch, back-propagating the
gradient that arrived at its output, and turning the fp32 gradients of that one layer into the
head / channel scores before the next layer is loaded. Peak: the boundary activations
(``(L - first + 1) · samples · seq_len · hidden · 4`` bytes) + one layer in fp32 with its
gradients + the fp32 lm_head and one batch's logits during the loss step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loram.errors import ArtifactError
from loram.fsio import atomic_dir
from loram.prune.artifact import MANIFEST_NAME
from loram.prune.common import LINEAR_PROJ, kept_kv_heads, kept_mlp_channels, module_path
from loram.shards import DEFAULT_SHARD_BYTES, ShardReader, ShardWriter

log = logging.getLogger(__name__)

__all__ = ["prune_to_dir", "taylor_scores"]

_LAYER = "model.layers."


class _Streamed:
    """A meta-device model of ``base_dir`` whose tensors are loaded on demand."""

    def __init__(self, base_dir: Path, dtype: torch.dtype, device: str | torch.device) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from loram.models import _quiet_transformers, check_shapes_against_config, load_config

        self.reader = ShardReader(base_dir)
        self.config = load_config(base_dir)
        check_shapes_against_config(base_dir, self.config)
        self.dtype, self.device = dtype, torch.device(device)
        with init_empty_weights(include_buffers=False), _quiet_transformers():
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.tie_weights()  # meta init does not tie by identity; parameter counts need it
        self.model.eval()
        self.n_layers = int(self.config.num_hidden_layers)
        names = set(self.model.state_dict())
        extra = sorted(set(self.reader.keys()) - names)
        if extra:
            raise ArtifactError(
                f"{base_dir}: tensors {extra[:3]} are not in the {type(self.model).__name__} "
                "its config describes"
            )

    def layer_keys(self, i: int) -> list[str]:
        p = f"{_LAYER}{i}."
        return [k for k in self.reader.keys() if k.startswith(p)]

    def other_keys(self) -> list[str]:
        return [k for k in self.reader.keys() if not k.startswith(_LAYER)]

    def read_layer(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors (names relative to the layer), cast to ``dtype`` (the model's)."""
        dtype = dtype or self.dtype
        p = f"{_LAYER}{i}."
        got = self.reader.get_many(self.layer_keys(i))
        return {k[len(p) :]: _cast(t, dtype) for k, t in got.items()}

    def load_layer(self, i: int, dtype: torch.dtype | None = None) -> nn.Module:
        layer = self.model.model.layers[i]
        tensors = self.read_layer(i, dtype)
        missing = sorted(set(layer.state_dict()) - set(tensors))
        if missing:
            raise ArtifactError(f"{self.reader.path}: layer {i} lacks {missing[:3]}")
        layer.load_state_dict(tensors, strict=True, assign=True)
        return layer.to(self.device)

    def release(self, module: nn.Module) -> None:
        """Free ``module``'s tensors (back to the meta device; tied weights tied again)."""
        module.to("meta")
        if not isinstance(module, type(self.model.model.layers[0])):
            self.model.tie_weights()

    def load_module(self, path: str, dtype: torch.dtype | None = None) -> nn.Module:
        """Load a non-layer module's parameters (``model.embed_tokens``, ``lm_head``, ...); a
        tied lm_head reads the embeddings."""
        mod = self.model.get_submodule(path)
        for name, _p in list(mod.named_parameters(recurse=False)):
            key = f"{path}.{name}"
            if key not in self.reader and path == "lm_head":
                key = "model.embed_tokens.weight"
            t = _cast(self.reader.get(key), dtype or self.dtype).to(self.device)
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        return mod

    def count_params(self) -> int:
        from loram.models import count_params

        return count_params(self.model)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


# --------------------------------------------------------------------------------------------
# Taylor importance, layer-major


def taylor_scores(
    st: _Streamed, layers: Sequence[int], calib_batches, progress: bool = True
) -> dict[int, dict[str, torch.Tensor]]:
    """The Taylor importance of :func:`loram.prune.structured.structured_importance`, equal to
    it bit for bit, with one decoder layer in memory at a time (see the module docstring)."""
    from loram.prune.sparse import _capture, _run_layer
    from loram.prune.structured import _group_scores, _layer_linears, geometry

    layers = sorted(set(int(x) for x in layers))
    first, n_layers = layers[0], st.n_layers
    geom = geometry(st.config)
    model = st.model
    f32 = torch.float32
    model.float()  # meta tensors: only the dtype the real ones get
    all_layers = model.model.layers
    st.load_module("model.embed_tokens", f32)
    calib = list(calib_batches)
    for batch in calib:
        if "labels" not in batch:
            raise ValueError("calibration batches need 'labels' (-100 = ignored)")
    with torch.no_grad():
        captured = _capture(model, all_layers, n_layers - 1, calib)
    if not captured:
        raise ValueError("calib_batches is empty")
    st.release(model.model.embed_tokens)
    hidden = [rec.hidden for rec in captured]
    for rec in captured:
        rec.hidden = None
    # boundary[i][b]: input of layer i (i >= first), boundary[n_layers]: the last layer's output
    boundary: dict[int, list[torch.Tensor]] = {}
    bar = tqdm(total=2 * n_layers - first + 1, desc="taylor importance", disable=not progress)
    for i in range(n_layers):
        layer = st.load_layer(i, f32)
        _track(layer, i in layers)
        if i >= first:
            boundary[i] = hidden
        nxt = []
        for b, rec in enumerate(captured):
            with torch.enable_grad():
                x = hidden[b].detach().requires_grad_(i > first)
                nxt.append(_run_layer(layer, x, rec.calls[i]).detach())
        hidden = nxt
        st.release(layer)
        bar.update()
    boundary[n_layers] = hidden

    # The loss step: the model's own forward with every decoder layer stubbed to return the
    # stored last hidden state (a leaf), so norm, lm_head and loss are exactly the model's.
    st.load_module("model.norm", f32)
    st.load_module("lm_head", f32)
    grads: list[torch.Tensor] = []
    saved = {j: all_layers[j].__dict__.get("forward") for j in range(n_layers)}
    try:
        for b, batch in enumerate(calib):
            leaf = boundary[n_layers][b].detach().requires_grad_(True)
            for j in range(n_layers):
                all_layers[j].forward = lambda *a, _h=leaf, **k: _h
            kw = {k: batch[k].to(st.device) for k in ("attention_mask", "labels") if k in batch}
            ids = torch.as_tensor(batch["input_ids"])
            ids = ids[None, :] if ids.dim() == 1 else ids
            embeds = torch.zeros(*ids.shape, leaf.shape[-1], dtype=f32, device=st.device)
            loss = model(inputs_embeds=embeds, **kw, use_cache=False).loss
            if not torch.isfinite(loss):
                raise ValueError(f"calibration batch {b} gives a non-finite loss ({loss.item()})")
            loss.backward()
            grads.append(leaf.grad)
            del loss, leaf
    finally:
        for j, fwd in saved.items():
            if fwd is None:
                all_layers[j].__dict__.pop("forward", None)
            else:
                all_layers[j].forward = fwd
    st.release(model.lm_head)
    st.release(model.model.norm)
    bar.update()
    del boundary[n_layers]

    def elem(t: torch.Tensor) -> torch.Tensor:
        if t.grad is None:
            return torch.zeros_like(t, dtype=torch.float64)
        return (t.detach() * t.grad).abs().to(torch.float64)

    out: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(n_layers - 1, first - 1, -1):
        layer = st.load_layer(i, f32)
        _track(layer, i in layers)
        inputs = boundary.pop(i)
        for b, rec in enumerate(captured):
            x = inputs[b].detach().requires_grad_(i > first)
            with torch.enable_grad():
                y = _run_layer(layer, x, rec.calls[i])
            y.backward(grads[b])
            grads[b] = x.grad if i > first else None
            del x, y
        inputs = None
        if i in layers:
            with torch.no_grad():
                heads, mlp = _group_scores(_layer_linears(model, i), elem, geom)
            out[i] = {"kv_heads": heads.cpu(), "mlp_channels": mlp.cpu()}
        for p in layer.parameters():
            p.grad = None
        st.release(layer)
        bar.update()
    bar.close()
    model.to(st.dtype)
    return {i: out[i] for i in layers}


def _track(layer: nn.Module, pruned: bool) -> None:
    """``requires_grad`` as the in-memory Taylor pass sets it: the seven projections' weights
    and biases of a pruned layer, nothing else."""
    for p in layer.parameters():
        p.requires_grad_(False)
    if pruned:
        for proj in LINEAR_PROJ:
            block = module_path(0, proj).split(".", 3)[3]
            lin = layer.get_submodule(block)
            for p in (lin.weight, lin.bias):
                if p is not None:
                    p.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# The driver


def prune_to_dir(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    method: str,
    ratio: float,
    layers: Sequence[int],
    criterion: str,
    n: int = 2,
    m: int = 4,
    calib_batches=None,
    seed: int = 0,
    tokenizer: Any = None,
    inputs=(),
    device: str | torch.device = "cpu",
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    round_to: int = 1,
) -> dict:
    """Prune the model in ``base_dir`` layer by layer into ``out_dir`` (atomically).

    ``method``: structured / random / semi / unstructured; ``criterion``: taylor / magnitude /
    random (structured), wanda / sparsegpt / magnitude (sparse); ``round_to``: the multiple the
    kept MLP channels are rounded to (structured / random). The model is pruned in the
    dtype it is saved in. Returns ``{"manifest", "sparsity", "params_original",
    "params_pruned"}`` (``sparsity`` as :func:`loram.prune.sparse.sparsity_report`, None for
    structured methods).
    """
    from loram.models import artifact_dtype
    from loram.shards import bound_heap

    bound_heap()
    base_dir = Path(base_dir)
    dtype = artifact_dtype(base_dir)
    st = _Streamed(base_dir, dtype, device)
    layers = sorted({int(x) for x in layers})
    if method in ("structured", "random"):
        return _structured(
            st,
            out_dir,
            ratio,
            layers,
            criterion,
            calib_batches,
            seed,
            tokenizer,
            inputs,
            max_shard_bytes,
            progress,
            round_to,
        )
    if method in ("semi", "unstructured"):
        return _sparse(
            st,
            out_dir,
            method,
            ratio,
            layers,
            criterion,
            n,
            m,
            calib_batches,
            tokenizer,
            inputs,
            max_shard_bytes,
            progress,
        )
    raise ValueError(f"method = {method!r}; expected structured, random, semi or unstructured")


def _write_rest(st: _Streamed, writer: ShardWriter) -> None:
    """Embeddings, final norm, lm_head (whatever is not in a decoder layer), one by one."""
    for key in st.other_keys():
        writer.add(key, _cast(st.reader.get(key), st.dtype))


def _finish(st: _Streamed, tmp: Path, manifest: dict, tokenizer: Any) -> None:
    """config.json, generation_config.json, tokenizer and manifest as ``save_pruned`` writes."""
    import copy
    import json

    from transformers import GenerationConfig

    config = copy.deepcopy(st.config)
    config.dtype = st.dtype
    config.save_pretrained(tmp)
    base = st.reader.path
    if (base / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base)
    else:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _structured(
    st,
    out_dir,
    ratio,
    layers,
    criterion,
    calib,
    seed,
    tokenizer,
    inputs,
    max_shard_bytes,
    progress,
    round_to=1,
) -> dict:
    from loram.prune.structured import (
        CRITERIA,
        apply_structure,
        check_manifest,
        geometry,
        kept_structure,
        layer_scores,
        random_structure,
        shrink_layer_tensors,
        structured_manifest,
    )

    if criterion not in CRITERIA:
        raise ValueError(f"criterion = {criterion!r}; expected one of {', '.join(CRITERIA)}")
    geom = geometry(st.config)
    bad = [x for x in layers if not 0 <= x < geom["num_hidden_layers"]]
    if bad or not layers:
        raise ValueError(
            f"layers {layers} must be a non-empty subset of 0..{geom['num_hidden_layers'] - 1}"
        )
    n_kv = kept_kv_heads(geom["num_key_value_heads"], ratio)
    n_mlp = kept_mlp_channels(geom["intermediate_size"], ratio, round_to)
    original = sum(p.numel() for p in st.model.parameters())
    structure: dict[str, dict] = {}
    if criterion == "random":
        structure = random_structure(geom, ratio, layers, seed, round_to)
    elif criterion == "taylor":
        if calib is None:
            raise ValueError(
                "criterion 'taylor' needs calib_batches (dicts with input_ids, labels)"
            )
        scores = taylor_scores(st, layers, calib, progress)
        structure = {str(i): kept_structure(scores[i], n_kv, n_mlp) for i in layers}

    def magnitude(t: torch.Tensor) -> torch.Tensor:
        return t.detach().abs().to(torch.float64)

    with atomic_dir(out_dir, "prune", inputs) as tmp:
        with ShardWriter(tmp, max_shard_bytes) as writer:
            for i in tqdm(range(st.n_layers), desc="prune (write)", disable=not progress):
                tensors = st.read_layer(i)
                if i in layers:
                    if criterion == "magnitude":
                        with torch.no_grad():
                            sc = layer_scores(tensors, geom, magnitude)
                        structure[str(i)] = kept_structure(sc, n_kv, n_mlp)
                    tensors = shrink_layer_tensors(tensors, structure[str(i)], geom)
                for name, t in tensors.items():
                    writer.add(f"{_LAYER}{i}.{name}", t)
                del tensors
            _write_rest(st, writer)
        ordered = {str(i): structure[str(i)] for i in layers}
        manifest = structured_manifest(
            st.config, criterion, ratio, layers, ordered, original, round_to
        )
        apply_structure(st.model, manifest)  # meta: the pruned shapes, to count them
        manifest["params"]["pruned"] = sum(p.numel() for p in st.model.parameters())
        check_manifest(manifest, st.config)
        _finish(st, tmp, manifest, tokenizer)
    return {
        "manifest": manifest,
        "sparsity": None,
        "params_original": original,
        "params_pruned": manifest["params"]["pruned"],
    }


def _sparse(
    st,
    out_dir,
    method,
    ratio,
    layers,
    criterion,
    n,
    m,
    calib,
    tokenizer,
    inputs,
    max_shard_bytes,
    progress,
) -> dict:
    from loram.prune.masks import pack_mask, save_packed_masks
    from loram.prune.sparse import SparseWalk, sparse_manifest, sparsity_from_counts

    pattern = "nm" if method == "semi" else "unstructured"
    calibrated = criterion in ("wanda", "sparsegpt")
    if calibrated:
        st.load_module("model.embed_tokens")
    walk = SparseWalk(
        st.model,
        layers,
        pattern=pattern,
        ratio=ratio,
        n=n,
        m=m,
        criterion=criterion,
        calib_batches=calib,
    )
    if calibrated:
        st.release(st.model.model.embed_tokens)
    original = st.count_params()
    packed: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    counts: dict[str, tuple[int, int]] = {}
    all_zeros = all_numel = 0
    try:
        with atomic_dir(out_dir, "prune", inputs) as tmp:
            with ShardWriter(tmp, max_shard_bytes) as writer:
                bar = tqdm(range(st.n_layers), desc=f"prune ({criterion})", disable=not progress)
                for i in bar:
                    layer = st.load_layer(i)
                    masks = walk.step(i)
                    for path, keep in masks.items():
                        packed[path] = pack_mask(keep)
                        shapes[path] = list(keep.shape)
                        w = st.model.get_submodule(path).weight
                        counts[path] = (int((w == 0).sum().item()), w.numel())
                    for proj in LINEAR_PROJ:
                        w = st.model.get_submodule(module_path(i, proj)).weight
                        all_zeros += int((w == 0).sum().item())
                        all_numel += w.numel()
                    for name, t in layer.state_dict().items():
                        writer.add(f"{_LAYER}{i}.{name}", t)
                    del masks
                    st.release(layer)
                _write_rest(st, writer)
            sparsity = sparsity_from_counts(counts, all_zeros, all_numel)
            manifest = sparse_manifest(
                st.model,
                layers,
                pattern=pattern,
                criterion=criterion,
                ratio=ratio,
                n=n,
                m=m,
                sparsity=sparsity,
            )
            _finish(st, tmp, manifest, tokenizer)
            save_packed_masks(tmp / manifest["masks_file"], packed, shapes)
    finally:
        walk.close()
    return {
        "manifest": manifest,
        "sparsity": sparsity,
        "params_original": original,
        "params_pruned": original,
    }
