"""The merge stage's sparsity report measures the pruned layers against their masks."""

from __future__ import annotations

import torch
from torch import nn

from loram.prune.sparse import mask_sparsity


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2, bias=False)
        self.b = nn.Linear(4, 2, bias=False)


def test_incidental_zeros_at_kept_positions_do_not_count():
    m = _Two()
    masks = {"a": torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)}
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([[0.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]))
    r = mask_sparsity(m, masks)
    # The mask removes 4 of 8; a kept weight that happens to be 0 is not "sparsity".
    assert r == {"mask_sparsity": 0.5, "sparsity": 0.5, "pruned_nonzero": 0, "numel": 8}
    with torch.no_grad():
        m.a.weight[1, 3] = 1e-8  # one pruned position filled by a merge
    r = mask_sparsity(m, masks)
    assert r["pruned_nonzero"] == 1 and r["sparsity"] == 3 / 8 and r["mask_sparsity"] == 0.5


def test_several_modules_are_pooled():
    m = _Two()
    masks = {
        "a": torch.ones(2, 4, dtype=torch.bool),
        "b": torch.zeros(2, 4, dtype=torch.bool),
    }
    with torch.no_grad():
        m.b.weight.zero_()
    assert mask_sparsity(m, masks) == {
        "mask_sparsity": 0.5,
        "sparsity": 0.5,
        "pruned_nonzero": 0,
        "numel": 16,
    }
