"""LoRAM-Semi / LoRAM-Unst: N:M and unstructured pruning with Wanda, SparseGPT and magnitude."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tolerance import max_ratio, reduction_tol

from loram.prune.common import LINEAR_PROJ, module_path, pruned_layers
from loram.prune.masks import load_masks, pack_mask, save_masks, unpack_mask
from loram.prune.sparse import (
    MASKS_FILE,
    enforce_masks,
    mask_hooks,
    prune_matrix,
    prune_sparse,
    sparse_manifest,
    sparsegpt_prune,
    sparsity_report,
    target_zeros,
)
from loram.tiny import tiny_llama

CRITERIA = ("wanda", "sparsegpt", "magnitude")


def _calib(seed: int = 0, batches: int = 2, bsz: int = 2, seq: int = 16, pad: int = 0):
    """Random calibration batches; the last ``pad`` positions of row 0 are right padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, 128, (bsz, seq), generator=g)
        att = torch.ones(bsz, seq, dtype=torch.long)
        if pad:
            att[0, -pad:] = 0
        out.append({"input_ids": ids, "attention_mask": att})
    return out


def _layers(model) -> list[int]:
    return pruned_layers(model.config.num_hidden_layers)


def _outlier_norms(model, seed: int = 1):
    """Give the RMSNorm weights feeding the projections strongly non-uniform channel scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=g)))
    return model


# ---------------------------------------------------------------------------------------------
# Patterns and ratios
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_every_group(tiny_model, criterion, nm):
    n, m = nm
    layers = _layers(tiny_model)
    masks = prune_sparse(
        tiny_model, layers, pattern="nm", n=n, m=m, criterion=criterion,
        calib_batches=_calib(), progress=False,
    )  # fmt: skip
    assert sorted(masks) == sorted(module_path(i, p) for i in layers for p in LINEAR_PROJ)
    for path, keep in masks.items():
        w = tiny_model.get_submodule(path).weight
        groups = (w == 0).reshape(w.shape[0], -1, m).sum(dim=2)
        assert bool((groups >= m - n).all()), path
        assert bool((keep.reshape(w.shape[0], -1, m).sum(dim=2) == n).all()), path
    report = sparsity_report(tiny_model, masks)
    assert report["pruned"]["zeros"] * m == report["pruned"]["numel"] * (m - n)  # counts: exact


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("ratio", [0.3, 0.55, 0.9])
def test_unstructured_ratio_exact(tiny_model, criterion, ratio):
    masks = prune_sparse(
        tiny_model, _layers(tiny_model), pattern="unstructured", ratio=ratio,
        criterion=criterion, calib_batches=_calib(), progress=False,
    )  # fmt: skip
    for path, keep in masks.items():
        w = tiny_model.get_submodule(path).weight
        zeros = int((w == 0).sum())
        assert abs(zeros - w.numel() * ratio) <= 1, (path, zeros, w.numel() * ratio)
        assert zeros == target_zeros(w.numel(), ratio) == int((~keep).sum())
        if criterion != "sparsegpt":  # per-row criteria spread the zeros evenly over the rows
            per_row = (w == 0).sum(dim=1)
            assert int(per_row.max() - per_row.min()) <= 1


def test_nm_indivisible_in_features_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"divisible by m = 6.*in_features = 64"):
        prune_sparse(model, [1], pattern="nm", n=2, m=6, criterion="magnitude", progress=False)


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calib_batches"):
        prune_sparse(model, [1], criterion="wanda", progress=False)
    with pytest.raises(ValueError, match="criterion"):
        prune_sparse(model, [1], criterion="taylor", progress=False)
    with pytest.raises(ValueError, match="ratio"):
        prune_sparse(model, [1], ratio=1.0, criterion="magnitude", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        prune_sparse(model, [6], criterion="magnitude", progress=False)


# ---------------------------------------------------------------------------------------------
# Quality: Wanda / SparseGPT against magnitude
# ---------------------------------------------------------------------------------------------


def test_matrix_reconstruction_error_order():
    """On one matrix with outlier input channels: sparsegpt < wanda < magnitude in ‖WX − ŴX‖."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    scales = torch.exp(torch.randn(64, generator=g))
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g)  # correlated channels
    x = (torch.randn(512, 64, generator=g) @ mix) * scales
    stats = {"act_sq": (x * x).sum(0), "hessian": 2 * x.T @ x / x.shape[0]}
    for pattern in ("unstructured", "nm"):
        err = {}
        for criterion in CRITERIA:
            new, keep = prune_matrix(w, criterion=criterion, pattern=pattern, ratio=0.5, **stats)
            assert bool((new[~keep] == 0).all())
            assert int((~keep).sum()) == w.numel() // 2
            err[criterion] = float(((x @ w.T - x @ new.T) ** 2).sum())
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], (pattern, err)


def test_sparsegpt_lazy_blocks_equal_one_block():
    """Column blocks with deferred updates give the same result as one block (N:M: same mask)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 40, generator=g)
    x = torch.randn(200, 40, generator=g) @ (torch.eye(40) + 0.3 * torch.randn(40, 40, generator=g))
    h = 2 * x.T @ x / x.shape[0]
    one, keep_one = sparsegpt_prune(w, h, pattern="nm", n=2, m=4, blocksize=128)
    many, keep_many = sparsegpt_prune(w, h, pattern="nm", n=2, m=4, blocksize=8)
    assert torch.equal(keep_one, keep_many)
    # Both compute W[:, k] - Σ_{j<k} err_j·H⁻¹[j, k], a reduction over the 40 columns, in float32,
    # in a different order (rank-1 updates vs deferred block products).
    tol = reduction_tol(w.shape[1], one.abs().max().item(), paths=2)
    assert max_ratio(many, one, tol) <= 1
    assert max_ratio(one[keep_one], w[keep_one], tol) > 1  # kept weights were updated (OBS)
    un, keep = sparsegpt_prune(w, h, pattern="unstructured", ratio=0.55, blocksize=8)
    assert int((un == 0).sum()) == int((~keep).sum()) == target_zeros(w.numel(), 0.55)


@pytest.mark.parametrize("pattern", ["unstructured", "nm"])
def test_criteria_beat_magnitude_on_calibration_outputs(tiny_model, pattern):
    """Final hidden states vs the dense model on the calibration data, outlier channel scales."""
    base = _outlier_norms(tiny_model)
    calib = _calib(seed=3, bsz=4, seq=32)
    with torch.no_grad():
        ref = [base.model(**c).last_hidden_state for c in calib]
    err = {}
    for criterion in CRITERIA:
        model = copy.deepcopy(base)
        prune_sparse(
            model, _layers(model), pattern=pattern, ratio=0.55, criterion=criterion,
            calib_batches=calib, progress=False,
        )  # fmt: skip
        with torch.no_grad():
            out = [model.model(**c).last_hidden_state for c in calib]
        num = sum(float(((o - r) ** 2).sum()) for o, r in zip(out, ref))
        err[criterion] = num / sum(float((r**2).sum()) for r in ref)
    assert err["wanda"] < 0.8 * err["magnitude"], err
    assert err["sparsegpt"] < 0.8 * err["magnitude"], err


# ---------------------------------------------------------------------------------------------
# The sequential walk: statistics come from the right activations, padding excluded
# ---------------------------------------------------------------------------------------------


def _independent_wanda_masks(model, layer: int, calib, ratio: float):
    """Wanda masks of one layer from hooks on an ordinary full forward (padding dropped)."""
    sq, handles = {}, []
    for proj in LINEAR_PROJ:
        path = module_path(layer, proj)
        mod = model.get_submodule(path)
        sq[path] = torch.zeros(mod.weight.shape[1])

        def hook(_m, inp, _o, path=path):
            x = inp[0][state["att"]]
            sq[path] += (x.float() ** 2).sum(0)

        handles.append(mod.register_forward_hook(hook))
    state = {}
    with torch.no_grad():
        for c in calib:
            state["att"] = c["attention_mask"].bool()
            model(**c)
    for h in handles:
        h.remove()
    out = {}
    for path, s in sq.items():
        w = model.get_submodule(path).weight
        _, keep = prune_matrix(w, criterion="wanda", pattern="unstructured", ratio=ratio, act_sq=s)
        out[path] = keep
    return out


def test_sequential_statistics_match_independent_forward(tiny_model):
    """Layer k's Wanda masks equal those computed from a model whose earlier layers are pruned."""
    calib = _calib(seed=5, pad=5)
    first, second = _layers(tiny_model)[:2]
    dense = copy.deepcopy(tiny_model)
    masks = prune_sparse(
        tiny_model, [first, second], criterion="wanda", ratio=0.5, calib_batches=calib,
        progress=False,
    )  # fmt: skip
    expect_first = _independent_wanda_masks(dense, first, calib, 0.5)
    for path, keep in expect_first.items():
        assert torch.equal(masks[path], keep), path
    enforce_masks(dense, expect_first)  # now only `first` is pruned
    expect_second = _independent_wanda_masks(dense, second, calib, 0.5)
    for path, keep in expect_second.items():
        assert torch.equal(masks[path], keep), path


def test_padding_tokens_do_not_count():
    """Changing the ids under padding (right padding) leaves the masks unchanged."""
    base = tiny_llama()
    calib = _calib(seed=7, pad=6)
    other = copy.deepcopy(calib)
    for c in other:
        c["input_ids"][0, -6:] = (c["input_ids"][0, -6:] + 17) % 128
    a = prune_sparse(
        copy.deepcopy(base), [1, 2], criterion="wanda", calib_batches=calib, progress=False
    )
    b = prune_sparse(
        copy.deepcopy(base), [1, 2], criterion="wanda", calib_batches=other, progress=False
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    unpadded = [{k: v.clone() for k, v in c.items()} for c in calib]
    for c in unpadded:
        c["attention_mask"][:] = 1
    d = prune_sparse(
        copy.deepcopy(base), [1, 2], criterion="wanda", calib_batches=unpadded, progress=False
    )
    assert any(not torch.equal(a[k], d[k]) for k in a)  # the padding positions do matter if used


# ---------------------------------------------------------------------------------------------
# What is and is not touched; keeping the zeros
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_only_pruned_projections_change(tiny_model, criterion):
    dense = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    layers = _layers(tiny_model)
    masks = prune_sparse(
        tiny_model, layers, criterion=criterion, calib_batches=_calib(), progress=False
    )
    pruned_weights = {f"{path}.weight" for path in masks}
    after = tiny_model.state_dict()
    changed = {k for k in dense if not torch.equal(dense[k], after[k])}
    assert changed == pruned_weights
    for path, keep in masks.items():
        w = tiny_model.get_submodule(path).weight
        assert keep.dtype == torch.bool and keep.shape == w.shape
        assert bool((w[~keep] == 0).all())
        if criterion == "wanda":  # Wanda only removes weights, never changes the kept ones
            assert torch.equal(w[keep], dense[f"{path}.weight"][keep])
    assert not tiny_model.training


def test_enforce_masks_after_optimizer_step():
    model = tiny_llama()
    masks = prune_sparse(model, [1, 3], criterion="magnitude", progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for path, keep in masks.items():
        assert int((model.get_submodule(path).weight[~keep] != 0).sum()) > 0
    stepped = {path: model.get_submodule(path).weight.detach().clone() for path in masks}
    enforce_masks(model, masks)
    for path, keep in masks.items():
        w = model.get_submodule(path).weight
        assert bool((w[~keep] == 0).all())
        assert torch.equal(w[keep], stepped[path][keep])


def test_mask_hooks_zero_gradients():
    model = tiny_llama()
    masks = prune_sparse(model, [2], criterion="magnitude", progress=False)
    handles = mask_hooks(model, masks)
    ids = torch.randint(0, 128, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for path, keep in masks.items():
        g = model.get_submodule(path).weight.grad
        assert bool((g[~keep] == 0).all()) and bool((g[keep] != 0).any())
    for h in handles:
        h.remove()


def test_sparsity_report_counts_the_weights():
    model = tiny_llama()
    masks = prune_sparse(model, [1, 2], ratio=0.3, criterion="magnitude", progress=False)
    with torch.no_grad():  # a zero the masks do not know of: the report must see it
        model.get_submodule(module_path(1, "q_proj")).weight[0, :] = 0
    report = sparsity_report(model, masks)
    json.dumps(report)
    assert sparsity_report(model, [1, 2]) == report
    total_z = total_n = 0
    for i in (1, 2):
        lz = ln = 0
        for proj in LINEAR_PROJ:
            w = model.get_submodule(module_path(i, proj)).weight.detach().numpy()
            z = int((w == 0).sum())
            entry = report["modules"][module_path(i, proj)]
            assert entry["zeros"] == z and entry["numel"] == w.size
            lz, ln = lz + z, ln + w.size
        assert report["layers"][str(i)]["zeros"] == lz
        assert report["layers"][str(i)]["sparsity"] == lz / ln  # ratios of exact counts
        total_z, total_n = total_z + lz, total_n + ln
    assert report["pruned"]["sparsity"] == total_z / total_n
    all_n = sum(
        model.get_submodule(module_path(i, p)).weight.numel() for i in range(6) for p in LINEAR_PROJ
    )
    assert report["decoder_linear"]["numel"] == all_n
    assert report["decoder_linear"]["sparsity"] == total_z / all_n


def test_manifest():
    model = tiny_llama()
    prune_sparse(model, [1, 2], pattern="nm", criterion="magnitude", progress=False)
    man = sparse_manifest(model, [2, 1], pattern="nm", criterion="magnitude")
    json.dumps(man)
    assert man["format"] == "loram-pruned/1" and man["method"] == "semi"
    assert man["ratio"] == 0.5 and (man["n"], man["m"]) == (2, 4)
    assert man["layers"] == [1, 2] and man["masks_file"] == MASKS_FILE
    assert man["sparsity"]["pruned"]["sparsity"] == 0.5
    un = sparse_manifest(model, [1, 2], pattern="unstructured", criterion="wanda", ratio=0.55)
    assert un["method"] == "unstructured" and un["ratio"] == 0.55


# ---------------------------------------------------------------------------------------------
# Mask storage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (13, 9), (2, 3, 5), (0,)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(ValueError, match="bytes"):
        unpack_mask(torch.cat([packed, packed.new_zeros(1)]), shape)


def test_save_load_round_trip_and_errors(tmp_path):
    model = tiny_llama()
    masks = prune_sparse(model, [1, 4], ratio=0.55, criterion="magnitude", progress=False)
    path = tmp_path / MASKS_FILE
    save_masks(path, masks)
    assert path.stat().st_size < sum(m.numel() for m in masks.values()) / 4  # packed, not dense
    back = load_masks(path, model)
    assert sorted(back) == sorted(masks)
    assert all(torch.equal(back[k], masks[k]) for k in masks)

    with pytest.raises(FileNotFoundError, match="not found"):
        load_masks(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_masks(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError):
        load_masks(truncated)

    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    name = module_path(1, "q_proj")
    save_file(
        {name: pack_mask(masks[name])},
        str(wrong),
        metadata={"format": "loram-masks/1", "shapes": json.dumps({name: [64, 65]})},
    )
    with pytest.raises(ValueError, match=r"bytes but shape \(64, 65\)"):
        load_masks(wrong)
    other = {name: torch.ones(32, 64, dtype=torch.bool)}
    save_masks(wrong, other)
    with pytest.raises(ValueError, match=r"shape \(32, 64\).*shape \(64, 64\)"):
        load_masks(wrong, model)


def test_inverse_hessian_factor_is_the_damped_reference_and_overwrite_consumes_no_copy():
    """The lean factorisation (damping on the diagonal, intermediates freed early, optionally in
    place) gives exactly the factor of the textbook formula, including the retry path."""
    from loram.prune.sparse import PERCDAMP, _InputStats, _inverse_hessian_chol

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 24, generator=g)
    x[:, 5] = 0.0  # an input that never fires: zero row/column, diagonal set to 1
    st = _InputStats(24, True, torch.device("cpu"))
    st.add(x)
    h = st.hessian()

    def reference(hess, damp):
        hh = hess.clone()
        dead = torch.diag(hh) == 0
        hh[dead, dead] = 1.0
        hh = hh + damp * torch.diag(hh).mean().item() * torch.eye(hh.shape[0])
        lower = torch.linalg.cholesky(hh)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)

    want = reference(h, PERCDAMP)
    assert torch.equal(_inverse_hessian_chol(h, PERCDAMP), want)
    assert torch.equal(h, st.hessian())  # without overwrite the input is left alone
    taken = st.take_hessian()
    assert st.xtx is None and torch.equal(taken, h)
    assert torch.equal(_inverse_hessian_chol(taken, PERCDAMP, overwrite=True), want)
    # not positive definite at the first damping: retried with 10x more until it is
    bad = h.clone()
    bad[0, 0] = -float(torch.diag(h).mean()) * 0.05
    got = _inverse_hessian_chol(bad, PERCDAMP)
    assert torch.isfinite(got).all() and torch.equal(got, torch.triu(got))
