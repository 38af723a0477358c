"""Compact storage of sparsity masks: 8 weights per byte in a safetensors file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

MASKS_FORMAT = "loram-masks/1"
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _packed_len(numel: int) -> int:
    return (numel + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape) into a flat uint8 tensor, 8 entries per byte (LSB first)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    flat = mask.detach().reshape(-1).to("cpu")
    pad = _packed_len(flat.numel()) * 8 - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) * _BITS
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed mask must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.numel() != _packed_len(numel):
        raise ValueError(
            f"packed mask has {packed.numel()} bytes but shape {shape} needs {_packed_len(numel)}"
        )
    bits = (packed.to("cpu").unsqueeze(1) & _BITS) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def save_masks(path: str | os.PathLike, masks: Mapping[str, torch.Tensor]) -> None:
    """Write ``{module path: bool mask}`` to a safetensors file (packed bytes, shapes in metadata)."""
    tensors = {name: pack_mask(m) for name, m in masks.items()}
    shapes = {name: list(m.shape) for name, m in masks.items()}
    save_packed_masks(path, tensors, shapes)


def save_packed_masks(
    path: str | os.PathLike,
    packed: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Sequence[int]],
) -> None:
    """:func:`save_masks` from masks already packed with :func:`pack_mask` (the streaming
    pruner packs each layer's masks as soon as it is pruned: one bit per weight in memory).

    The file has the same bytes for the same masks in every run (the pruned model's structure
    digest hashes it)."""
    from loram.shards import save_file_deterministic

    if set(packed) != set(shapes):
        raise ValueError("packed masks and shapes name different modules")
    metadata = {
        "format": MASKS_FORMAT,
        "shapes": json.dumps({name: [int(s) for s in shapes[name]] for name in packed}),
    }
    save_file_deterministic(dict(packed), os.fspath(path), metadata)


def load_masks(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks`; with ``model``, check each against its weight."""
    out = dict(open_masks(path).items())
    if model is not None:
        check_masks(model, out)
    return out


class PackedMasks(Mapping):
    """The masks of a file written by :func:`save_masks`, kept packed (one bit per weight) and
    unpacked to a bool tensor only when one is looked up: a read-only mapping that the
    streaming merge walks mask by mask, where :func:`load_masks` would hold a byte per weight
    of every pruned matrix at once."""

    def __init__(self, path: str, packed: dict[str, torch.Tensor], shapes: dict) -> None:
        self.path, self._packed, self._shapes = path, packed, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        packed, shape = self._packed[name], self._shapes[name]
        try:
            mask = unpack_mask(packed, shape)
        except ValueError as exc:
            raise ValueError(f"mask file {self.path}: {name}: {exc}") from exc
        numel = mask.numel()
        if _packed_len(numel) * 8 > numel and not torch.equal(pack_mask(mask), packed):
            raise ValueError(f"mask file {self.path}: {name}: padding bits are set (corrupt file)")
        return mask

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])


def open_masks(path: str | os.PathLike) -> PackedMasks:
    """The masks file ``path`` as a :class:`PackedMasks` (header and shapes checked now, each
    mask when it is unpacked)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ValueError(f"mask file {path} is not a valid safetensors file: {exc}") from exc
    if metadata.get("format") != MASKS_FORMAT:
        raise ValueError(
            f"mask file {path}: format {metadata.get('format')!r}, expected {MASKS_FORMAT!r}"
        )
    try:
        shapes = json.loads(metadata["shapes"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"mask file {path}: missing or unreadable 'shapes' metadata") from exc
    if not isinstance(shapes, dict) or set(shapes) != set(tensors):
        raise ValueError(f"mask file {path}: 'shapes' metadata does not list the stored masks")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"mask file {path}: bad shape {shape!r} for {name}")
    return PackedMasks(path, tensors, shapes)


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every mask names a module whose weight has the mask's shape."""
    for name, mask in masks.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError as exc:
            raise ValueError(f"mask {name} names no module with a weight in the model") from exc
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(
                f"mask {name} has shape {tuple(mask.shape)} but the model's weight has shape "
                f"{tuple(weight.shape)}"
            )
