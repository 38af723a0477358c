"""LoRAM-Stru / LoRAM-Rand: remove whole MLP channels and whole KV-head groups, per layer.

A pruned model is an ordinary ``*ForCausalLM`` whose q/k/v/o and gate/up/down ``nn.Linear``
modules in the pruned layers are replaced by smaller ones; its config stays the original one.
What was kept is recorded in a JSON manifest (format ``loram-pruned/1``)::

    {"format": "loram-pruned/1", "method": "structured" | "random",
     "criterion": "taylor" | "magnitude" | "random", "ratio": r, "round_to": m,
     "layers": [4, 5, ...],
     "model_type": "llama",
     "geometry": {"hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "num_hidden_layers"},
     "structure": {"4": {"kv_heads": [kept KV heads], "mlp_channels": [kept channels]}, ...},
     "params": {"original": N, "pruned": M}}

KV head ``h`` owns query heads ``h*g .. h*g+g-1`` (``g = heads // kv_heads``); keeping it keeps
those q rows, its k and v rows (and biases) and the matching o columns. Indices are the
original ones, sorted ascending. Sparse methods ("semi", "unstructured") share the format but
have no ``structure``: their shapes equal the original ones. ``round_to`` (absent in older
manifests: 1) is the multiple the kept MLP channel count was rounded to
(:func:`loram.prune.common.kept_mlp_channels`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loram.prune.common import (
    LINEAR_PROJ,
    check_round_to,
    kept_kv_heads,
    kept_mlp_channels,
    module_path,
)

FORMAT = "loram-pruned/1"
STRUCTURED_METHODS = ("structured", "random")
SPARSE_METHODS = ("semi", "unstructured")
METHODS = STRUCTURED_METHODS + SPARSE_METHODS
CRITERIA = ("taylor", "magnitude", "random")
GEOMETRY_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_hidden_layers",
)

__all__ = [
    "FORMAT",
    "ManifestError",
    "apply_structure",
    "check_manifest",
    "geometry",
    "module_indices",
    "original_shapes",
    "prune_structured",
    "structured_importance",
]


class ManifestError(ValueError):
    """A pruning manifest is malformed or does not fit the model it is used with."""


# --------------------------------------------------------------------------- geometry


def geometry(config: Any) -> dict[str, int]:
    """The attention/MLP geometry of a Llama-family config, as recorded in a manifest."""
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": int(head_dim),
        "intermediate_size": int(config.intermediate_size),
        "num_hidden_layers": int(config.num_hidden_layers),
    }


def original_shapes(geom: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """``proj -> (out_features, in_features)`` of each projection in the unpruned model."""
    h, hd = geom["hidden_size"], geom["head_dim"]
    q, kv, d = (
        geom["num_attention_heads"] * hd,
        geom["num_key_value_heads"] * hd,
        geom["intermediate_size"],
    )
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (d, h),
        "up_proj": (d, h),
        "down_proj": (h, d),
    }


# Which axis of each projection is pruned, and by which index family.
_AXIS = {
    "q_proj": ("out", "q"),
    "k_proj": ("out", "kv"),
    "v_proj": ("out", "kv"),
    "o_proj": ("in", "q"),
    "gate_proj": ("out", "mlp"),
    "up_proj": ("out", "mlp"),
    "down_proj": ("in", "mlp"),
}


# --------------------------------------------------------------------------- manifest checks


def _fail(msg: str) -> None:
    raise ManifestError(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_index_list(where: str, values: Any, size: int, expected_count: int) -> None:
    if not isinstance(values, list) or not all(_is_int(v) for v in values):
        _fail(f"manifest {where} must be a list of integers, got {values!r:.80}")
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        _fail(f"manifest {where} has indices out of range [0, {size}): {bad[:10]}")
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        _fail(f"manifest {where} has duplicate indices: {dup[:10]}")
    if values != sorted(values):
        _fail(f"manifest {where} must be sorted ascending")
    if len(values) != expected_count:
        _fail(
            f"manifest {where} keeps {len(values)} of {size}, but the ratio (and round_to) in "
            f"the manifest imply {expected_count}"
        )


def _check_geometry(geom: Mapping, config: Any) -> None:
    missing = [k for k in GEOMETRY_KEYS if not _is_int(geom.get(k)) or geom.get(k) < 1]
    if missing:
        _fail(f"manifest geometry lacks positive integers for: {', '.join(missing)}")
    if geom["num_attention_heads"] % geom["num_key_value_heads"]:
        _fail(
            f"manifest geometry: num_attention_heads = {geom['num_attention_heads']} is not a "
            f"multiple of num_key_value_heads = {geom['num_key_value_heads']}"
        )
    if config is not None:
        actual = geometry(config)
        for k in GEOMETRY_KEYS:
            if geom[k] != actual[k]:
                _fail(
                    f"the pruning manifest does not fit this model: {k} is {geom[k]} in the "
                    f"manifest but {actual[k]} in the model config"
                )


def check_manifest(manifest: Any, config: Any = None) -> dict:
    """Validate a manifest (and, if ``config`` is given, that it fits that model); return it.

    Raises :class:`ManifestError` naming the offending field and both values on a mismatch.
    """
    if not isinstance(manifest, Mapping):
        _fail(f"a pruning manifest must be a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        _fail(f"not a LoRAM pruning manifest: format = {fmt!r}, expected {FORMAT!r}")
    method = manifest.get("method")
    if method not in METHODS:
        _fail(f"manifest method = {method!r} is unknown; expected one of {', '.join(METHODS)}")
    ratio = manifest.get("ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        _fail(f"manifest ratio = {ratio!r} must be a number in [0, 1)")

    geom = manifest.get("geometry")
    if geom is None and method in SPARSE_METHODS:
        # Sparse manifests keep the original shapes; geometry is optional for them.
        geom = geometry(config) if config is not None else None
    elif not isinstance(geom, Mapping):
        _fail("manifest has no 'geometry' object")
    if geom is not None:
        _check_geometry(geom, config)
        mt, ct = manifest.get("model_type"), getattr(config, "model_type", None)
        if mt is not None and ct is not None and mt != ct:
            _fail(
                f"the pruning manifest does not fit this model: model_type is {mt!r} in the "
                f"manifest but {ct!r} in the model config"
            )

    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(_is_int(x) for x in layers):
        _fail(f"manifest layers must be a list of integers, got {layers!r:.80}")
    n_layers = geom["num_hidden_layers"] if geom is not None else None
    bad = [x for x in layers if x < 0 or (n_layers is not None and x >= n_layers)]
    if bad:
        _fail(f"manifest layers {bad} are out of range for a model with {n_layers} layers")
    if len(set(layers)) != len(layers):
        _fail(f"manifest layers has duplicates: {layers}")

    if method in STRUCTURED_METHODS:
        structure = manifest.get("structure")
        if not isinstance(structure, Mapping):
            _fail("manifest of a structured method has no 'structure' object")
        if set(structure) != {str(x) for x in layers}:
            _fail(
                f"manifest structure keys {sorted(structure, key=str)} do not match its layers {layers}"
            )
        round_to = manifest.get("round_to", 1)
        try:
            check_round_to(round_to)
        except ValueError:
            _fail(f"manifest round_to = {round_to!r} must be an integer >= 1")
        kv, d = geom["num_key_value_heads"], geom["intermediate_size"]
        n_kv, n_mlp = kept_kv_heads(kv, ratio), kept_mlp_channels(d, ratio, round_to)
        for layer in layers:
            entry = structure[str(layer)]
            if not isinstance(entry, Mapping):
                _fail(f"manifest structure[{layer}] must be an object")
            _check_index_list(f"structure[{layer}].kv_heads", entry.get("kv_heads"), kv, n_kv)
            _check_index_list(
                f"structure[{layer}].mlp_channels", entry.get("mlp_channels"), d, n_mlp
            )
    return dict(manifest)


# --------------------------------------------------------------------------- indices


def _kept_channels(
    kv_heads: torch.Tensor, geom: Mapping[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Original q-channel and kv-channel indices owned by the kept KV heads (ascending)."""
    hd = geom["head_dim"]
    g = geom["num_attention_heads"] // geom["num_key_value_heads"]
    q_heads = (kv_heads[:, None] * g + torch.arange(g)).reshape(-1)
    q_ch = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    kv_ch = (kv_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    return q_ch, kv_ch


def module_indices(
    manifest: Mapping, config: Any = None
) -> dict[str, tuple[str, torch.LongTensor]]:
    """For every pruned module, the pruned axis ("out" or "in") and the kept original indices.

    Keys are module paths such as ``model.layers.4.self_attn.q_proj``. Empty for sparse
    methods (nothing is resized). Without ``config`` the manifest's own geometry is used.
    """
    check_manifest(manifest, config)
    if manifest["method"] not in STRUCTURED_METHODS:
        return {}
    geom = geometry(config) if config is not None else manifest["geometry"]
    out: dict[str, tuple[str, torch.LongTensor]] = {}
    for layer in sorted(manifest["layers"]):
        entry = manifest["structure"][str(layer)]
        q_ch, kv_ch = _kept_channels(torch.tensor(entry["kv_heads"], dtype=torch.long), geom)
        fam = {"q": q_ch, "kv": kv_ch, "mlp": torch.tensor(entry["mlp_channels"], dtype=torch.long)}
        for proj in LINEAR_PROJ:
            axis, family = _AXIS[proj]
            out[module_path(layer, proj)] = (axis, fam[family].clone())
    return out


# --------------------------------------------------------------------------- resizing


def _shrink_linear(lin: nn.Module, axis: str, idx: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` holding ``lin``'s kept rows (axis "out") or columns (axis "in")."""
    with torch.no_grad():
        w = lin.weight
        idx = idx.to(w.device)
        new_w = w.index_select(0 if axis == "out" else 1, idx)
        bias = lin.bias
        if bias is not None:
            bias = bias.index_select(0, idx) if axis == "out" else bias.detach().clone()
        new = nn.Linear(new_w.shape[1], new_w.shape[0], bias=bias is not None, device="meta")
        new.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=lin.bias.requires_grad)
    return new


def apply_structure(model: nn.Module, manifest: Mapping) -> nn.Module:
    """Resize ``model``'s projections (original shapes) to the manifest's shapes, in place.

    Kept rows/columns are sliced out of the current weights, so this prunes a real model and
    gives correctly shaped (empty) modules on a meta-device model. Sparse manifests: no-op.
    """
    check_manifest(manifest, model.config)
    shapes = original_shapes(geometry(model.config))
    for path, (axis, idx) in module_indices(manifest, model.config).items():
        proj = path.rsplit(".", 1)[1]
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        lin = getattr(parent, name)
        if type(lin) is not nn.Linear:
            raise TypeError(f"{path} is a {type(lin).__name__}; pruning needs a plain nn.Linear")
        have = tuple(lin.weight.shape)
        if have != shapes[proj]:
            raise ValueError(
                f"{path} has shape {have} but the original geometry says {shapes[proj]}: "
                "is the model already pruned?"
            )
        setattr(parent, name, _shrink_linear(lin, axis, idx))
    return model


# --------------------------------------------------------------------------- importance


def _layer_linears(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    return {p: model.get_submodule(module_path(layer, p)) for p in LINEAR_PROJ}


def _group_scores(
    lins: Mapping[str, nn.Module], elem: Any, geom: Mapping[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-KV-head and per-MLP-channel sums of ``elem(param)`` over the coupled weights."""
    kv, hd = geom["num_key_value_heads"], geom["head_dim"]
    group = geom["num_attention_heads"] // kv * hd  # q channels per KV head

    def rows(proj: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        lin = lins[proj]
        r = elem(lin.weight).sum(dim=1)
        b = elem(lin.bias) if lin.bias is not None else None
        return r, b

    def add_bias(r: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return r if b is None else r + b

    q = add_bias(*rows("q_proj")).view(kv, group).sum(dim=1)
    k = add_bias(*rows("k_proj")).view(kv, hd).sum(dim=1)
    v = add_bias(*rows("v_proj")).view(kv, hd).sum(dim=1)
    o = elem(lins["o_proj"].weight).sum(dim=0).view(kv, group).sum(dim=1)
    heads = q + k + v + o
    gate = add_bias(*rows("gate_proj"))
    up = add_bias(*rows("up_proj"))
    down = elem(lins["down_proj"].weight).sum(dim=0)
    return heads, gate + up + down


def structured_importance(
    model: nn.Module,
    layers: Iterable[int],
    criterion: str = "taylor",
    calib_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """Importance of every KV head and MLP channel of ``layers`` (float64 scores).

    "taylor": Σ|W ⊙ G| over the weights and biases coupled to a head/channel, G the gradient of
    the LM loss summed over ``calib_batches`` (computed in fp32); "magnitude": Σ|W|.
    Returns ``{layer: {"kv_heads": (kv,), "mlp_channels": (intermediate,)}}``.
    """
    layers = sorted(set(int(x) for x in layers))
    geom = geometry(model.config)
    if criterion == "magnitude":

        def elem(t: torch.Tensor) -> torch.Tensor:
            return t.detach().abs().to(torch.float64)

        with torch.no_grad():
            return _scores_for(model, layers, elem, geom)
    if criterion != "taylor":
        raise ValueError(f"criterion = {criterion!r}: importance needs 'taylor' or 'magnitude'")
    if calib_batches is None:
        raise ValueError("criterion 'taylor' needs calib_batches (dicts with input_ids, labels)")
    return _taylor(model, layers, calib_batches, geom, progress)


def _scores_for(model, layers, elem, geom) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for layer in layers:
        heads, mlp = _group_scores(_layer_linears(model, layer), elem, geom)
        out[layer] = {"kv_heads": heads.cpu(), "mlp_channels": mlp.cpu()}
    return out


def _taylor(model, layers, calib_batches, geom, progress) -> dict[int, dict[str, torch.Tensor]]:
    tracked = {
        id(p)
        for layer in layers
        for lin in _layer_linears(model, layer).values()
        for p in (lin.weight, lin.bias)
        if p is not None
    }
    params = list(model.named_parameters())
    requires = {name: p.requires_grad for name, p in params}
    dtypes = {name: p.dtype for name, p in params}
    buffers = {name: b.dtype for name, b in model.named_buffers()}
    was_training = model.training
    device = next(model.parameters()).device
    try:
        # fp32 on purpose, whatever the model's dtype: the gradients are summed over the
        # calibration batches and |W ⊙ G| ranks channels whose scores differ by less than a
        # bf16 ulp, so a bf16 / fp16 model is upcast (exactly) for this pass, then cast back
        # below; the scores themselves are float64.
        model.float()
        model.eval()
        for _, p in params:
            p.requires_grad_(id(p) in tracked)
            p.grad = None
        n = 0
        for batch in tqdm(calib_batches, desc="taylor importance", disable=not progress):
            kw = {
                k: batch[k].to(device)
                for k in ("input_ids", "attention_mask", "labels")
                if k in batch
            }
            if "labels" not in kw:
                raise ValueError("calibration batches need 'labels' (-100 = ignored)")
            loss = model(**kw, use_cache=False).loss
            if not torch.isfinite(loss):
                raise ValueError(f"calibration batch {n} gives a non-finite loss ({loss.item()})")
            loss.backward()
            n += 1
        if n == 0:
            raise ValueError("calib_batches is empty")

        def elem(t: torch.Tensor) -> torch.Tensor:
            if t.grad is None:
                return torch.zeros_like(t, dtype=torch.float64)
            return (t.detach() * t.grad).abs().to(torch.float64)

        with torch.no_grad():
            return _scores_for(model, layers, elem, geom)
    finally:
        for name, p in params:
            p.grad = None
            p.requires_grad_(requires[name])
            if p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])
        for name, b in model.named_buffers():
            if b.dtype != buffers[name]:
                parent, _, attr = name.rpartition(".")
                mod = model.get_submodule(parent) if parent else model
                mod._buffers[attr] = b.to(buffers[name])
        model.train(was_training)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores (ties: lower index wins), sorted ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


# --------------------------------------------------------------------------- driver


def prune_structured(
    model: nn.Module,
    ratio: float,
    layers: Iterable[int],
    criterion: str = "taylor",
    calib_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
    progress: bool = True,
    round_to: int = 1,
) -> dict:
    """Prune ``layers`` of ``model`` in place (LoRAM-Stru, or LoRAM-Rand with "random").

    Keeps ``kv - floor(kv*ratio)`` KV heads (with their query groups) and
    ``d - ceil(d*ratio)`` MLP channels (rounded to a multiple of ``round_to``, see
    :func:`~loram.prune.common.kept_mlp_channels`) in each listed layer; the config is left
    unchanged. Returns the JSON-serializable manifest describing what was kept.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion = {criterion!r}; expected one of {', '.join(CRITERIA)}")
    layers = sorted(set(int(x) for x in layers))
    geom = geometry(model.config)
    kv, d = geom["num_key_value_heads"], geom["intermediate_size"]
    n_kv, n_mlp = kept_kv_heads(kv, ratio), kept_mlp_channels(d, ratio, round_to)
    bad = [x for x in layers if not 0 <= x < geom["num_hidden_layers"]]
    if bad or not layers:
        raise ValueError(
            f"layers {layers} must be a non-empty subset of 0..{geom['num_hidden_layers'] - 1}"
        )

    original = sum(p.numel() for p in model.parameters())
    structure: dict[str, dict[str, list[int]]] = {}
    if criterion == "random":
        structure = random_structure(geom, ratio, layers, seed, round_to)
    else:
        scores = structured_importance(model, layers, criterion, calib_batches, progress)
        for layer in layers:
            structure[str(layer)] = kept_structure(scores[layer], n_kv, n_mlp)

    manifest = structured_manifest(
        model.config, criterion, ratio, layers, structure, original, round_to
    )
    apply_structure(model, manifest)
    manifest["params"]["pruned"] = sum(p.numel() for p in model.parameters())
    return manifest


def random_structure(
    geom: Mapping[str, int], ratio: float, layers: Iterable[int], seed: int, round_to: int = 1
) -> dict[str, dict[str, list[int]]]:
    """LoRAM-Rand's kept KV heads and MLP channels per layer (one generator, layers in order)."""
    kv, d = geom["num_key_value_heads"], geom["intermediate_size"]
    n_kv, n_mlp = kept_kv_heads(kv, ratio), kept_mlp_channels(d, ratio, round_to)
    gen = torch.Generator().manual_seed(seed)
    structure = {}
    for layer in sorted(set(int(x) for x in layers)):
        heads = sorted(torch.randperm(kv, generator=gen)[:n_kv].tolist())
        chans = sorted(torch.randperm(d, generator=gen)[:n_mlp].tolist())
        structure[str(layer)] = {"kv_heads": heads, "mlp_channels": chans}
    return structure


def kept_structure(scores: Mapping[str, torch.Tensor], n_kv: int, n_mlp: int) -> dict:
    """The ``n_kv`` best KV heads and ``n_mlp`` best MLP channels of one layer's scores."""
    return {
        "kv_heads": _top(scores["kv_heads"], n_kv),
        "mlp_channels": _top(scores["mlp_channels"], n_mlp),
    }


def structured_manifest(
    config: Any,
    criterion: str,
    ratio: float,
    layers: list[int],
    structure: dict,
    original: int,
    round_to: int = 1,
) -> dict:
    """The manifest of a structured / random pruning (``params.pruned`` still None)."""
    return {
        "format": FORMAT,
        "method": "random" if criterion == "random" else "structured",
        "criterion": criterion,
        "ratio": float(ratio),
        "round_to": int(round_to),
        "layers": layers,
        "model_type": getattr(config, "model_type", None),
        "geometry": geometry(config),
        "structure": structure,
        "params": {"original": original, "pruned": None},
    }


def layer_scores(
    tensors: Mapping[str, torch.Tensor], geom: Mapping[str, int], elem: Any
) -> dict[str, torch.Tensor]:
    """Importance of one layer's KV heads and MLP channels from its tensors
    (``self_attn.q_proj.weight`` ... as in the layer's state dict), as :func:`_group_scores`."""
    from types import SimpleNamespace

    lins = {}
    for proj in LINEAR_PROJ:
        block = module_path(0, proj).split(".", 3)[3]  # self_attn.q_proj / mlp.up_proj
        lins[proj] = SimpleNamespace(
            weight=tensors[f"{block}.weight"], bias=tensors.get(f"{block}.bias")
        )
    heads, mlp = _group_scores(lins, elem, geom)
    return {"kv_heads": heads.cpu(), "mlp_channels": mlp.cpu()}


def shrink_layer_tensors(
    tensors: Mapping[str, torch.Tensor], entry: Mapping[str, list[int]], geom: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (names relative to the layer) with the kept rows / columns
    of ``entry`` (a manifest ``structure`` entry) sliced out exactly as :func:`apply_structure`
    slices them; other tensors are returned as they are."""
    q_ch, kv_ch = _kept_channels(torch.tensor(entry["kv_heads"], dtype=torch.long), geom)
    fam = {"q": q_ch, "kv": kv_ch, "mlp": torch.tensor(entry["mlp_channels"], dtype=torch.long)}
    out = dict(tensors)
    for proj in LINEAR_PROJ:
        axis, family = _AXIS[proj]
        block = module_path(0, proj).split(".", 3)[3]
        idx = fam[family].to(tensors[f"{block}.weight"].device)
        out[f"{block}.weight"] = tensors[f"{block}.weight"].index_select(
            0 if axis == "out" else 1, idx
        )
        bias = tensors.get(f"{block}.bias")
        if bias is not None:
            out[f"{block}.bias"] = bias.index_select(0, idx) if axis == "out" else bias.clone()
    return out
